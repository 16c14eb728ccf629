"""Model folders that do not load as they should: damaged files, no chat template, an adapter's base replaced or
moved or of another shape. Each must end in one ModelLoadError that names the folder, the file and what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


def _cli_error(capsys, *argv: str) -> str:
    from tunelab.cli import main

    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_a_truncated_weights_file_or_a_missing_tokenizer_json_is_named(tiny_model_dir, tmp_path, capsys):
    """A truncated model.safetensors was a SafetensorError traceback, a missing tokenizer.json a ValueError about
    sentencepiece, in every verb."""
    cut = tmp_path / "cut"
    shutil.copytree(tiny_model_dir, cut)
    with open(cut / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    err = _cli_error(capsys, "infer", "--model", str(cut), "--prompt", "hi")
    assert f"could not load the model from {cut}: {cut / 'model.safetensors'} is truncated or damaged" in err
    assert "copy or download the folder again" in err
    notok = tmp_path / "notok"
    shutil.copytree(tiny_model_dir, notok)
    (notok / "tokenizer.json").unlink()
    err = _cli_error(capsys, "infer", "--model", str(notok), "--prompt", "hi")
    assert f"could not load the tokenizer from {notok}: {notok / 'tokenizer.json'} is missing" in err


def _without_chat_template(model_dir: Path, to: Path) -> Path:
    shutil.copytree(model_dir, to)
    (to / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((to / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (to / "tokenizer_config.json").write_text(json.dumps(config))
    return to


def test_infer_refuses_a_model_without_a_chat_template_before_the_first_prompt(tiny_model_dir, tmp_path, capsys):
    """It was transformers' ValueError traceback ("Cannot use chat template functions ...") on the first prompt."""
    plain = _without_chat_template(tiny_model_dir, tmp_path / "plain")
    for argv in (["--prompt", "hi"], ["--compare", "--prompt", "hi"]):
        err = _cli_error(capsys, "infer", "--model", str(plain), "--max-new-tokens", "2", *argv)
        assert err.startswith(f"error: {plain} has no chat template") and "chat_template.jinja" in err
