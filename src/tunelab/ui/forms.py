"""The New-run form: fields from the config schema, values to YAML, and the CLI's own validation.

The form is generated from `tunelab.config.Config` (the same field descriptions and defaults docs/config.md is
generated from). Form values travel as the CLI's dotted overrides (`training.epochs=1`) through
`config.apply_overrides`, and a config is checked by `config.load_config` on the file it will be saved as, so the
error text — key, line, "did you mean" — is exactly what `tunelab train --config FILE` prints.
"""

from __future__ import annotations

import shlex
import tempfile
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from tunelab.config import Config, ConfigError, apply_overrides, load_config


def _kind(annotation: Any) -> tuple[str, list[Any], bool]:
    """(input kind, choices, nullable) for a field annotation."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    nullable = type(None) in args
    inner = [a for a in args if a is not type(None)]
    if origin is typing.Literal:
        return "choice", list(args), False
    if nullable and len(inner) == 1:
        kind, choices, _ = _kind(inner[0])
        return kind, choices, True
    if annotation is bool:
        return "bool", [], False
    if annotation in (int, float, str):
        return annotation.__name__, [], False
    if origin is list and typing.get_origin(args[0]) is typing.Literal:
        return "multi", list(typing.get_args(args[0])), False
    return "yaml", [], nullable  # lists, dicts, unions: typed as YAML (`[q_proj, v_proj]`, `all-linear`)


def form_schema() -> list[dict[str, Any]]:
    """Sections of fields: key, kind, choices, default, help — all from config.py."""
    sections = []
    for section, sfield in Config.model_fields.items():
        model: type[BaseModel] = sfield.annotation
        fields = []
        for name, f in model.model_fields.items():
            default = f.default_factory() if f.default_factory else f.default
            kind, choices, nullable = _kind(f.annotation)
            fields.append({"key": f"{section}.{name}", "kind": kind, "choices": choices, "nullable": nullable,
                           "default": default, "help": f.description or ""})
        sections.append({"name": section, "fields": fields})
    return sections


DEFAULTS = {f["key"]: f["default"] for s in form_schema() for f in s["fields"]}


def as_override_value(value: Any) -> str:
    """A form value as the text after `key=` on the command line."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def values_to_data(values: dict[str, Any]) -> dict[str, Any]:
    """Form values (key -> text or value) to a config mapping holding only what differs from the defaults,
    as a preset does. Empty text on a nullable field means null; unknown keys are kept so validation names them."""
    overrides = []
    for key, value in values.items():
        if value is None or (isinstance(value, str) and value.strip() == ""):
            if DEFAULTS.get(key, object()) is None:
                continue
            value = "null"
        text = as_override_value(value)
        # read as the command line reads `key=text` (`[q_proj` stays text, for validation to name)
        if key in DEFAULTS and apply_overrides({}, [f"v={text}"])["v"] == DEFAULTS[key]:
            continue
        overrides.append(f"{key}={text}")
    return apply_overrides({}, overrides)


def to_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True) if data else "{}\n"


def check_config(text: str, source: str) -> tuple[Config | None, str | None]:
    """(config, None) or (None, the message `tunelab train --config SOURCE` would print for this text)."""
    with tempfile.TemporaryDirectory(prefix="tunelab-ui-") as tmp:
        path = Path(tmp) / Path(source).name
        path.write_text(text, encoding="utf-8")
        try:
            return load_config(path), None
        except ConfigError as e:
            return None, str(e).replace(str(path), source)


def train_command(config_path: str) -> list[str]:
    return ["train", "--config", config_path]


def shown(args: list[str]) -> str:
    return "tunelab " + shlex.join(args)
