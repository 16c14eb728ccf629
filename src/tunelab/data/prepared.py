"""Reading a folder `tunelab prepare` wrote (`tunelab.data.prepare`): its records, report and fingerprint, and
whether its files were edited since it wrote them (their sha256 is in report.json)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data.readers import DataError
from tunelab.files import sha256_file

__all__ = ["PreparedData", "PREPARED_FILES", "is_prepared", "load_prepared"]


@dataclass
class PreparedData:
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    report: dict[str, Any]
    fingerprint: str
    folder: Path | None = None
    edited: list[str] = field(default_factory=list)  # files changed since prepare wrote them, in words


PREPARED_FILES = ("train.jsonl", "val.jsonl")  # the records training reads: hashed when written and when read


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e}); re-run tunelab prepare") from None
                if not isinstance(rec, dict) or not (isinstance(rec.get("messages"), list)
                                                     or isinstance(rec.get("text"), str)):
                    raise DataError(f"{path}:{n}: not a prepared record (no 'messages'); re-run tunelab prepare")
                out.append(rec)
    return out


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _own_report(folder: Path) -> dict[str, Any] | None:
    """The report.json `prepare_dataset` wrote in `folder` (it records tunelab_prepare_version), else None."""
    try:
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and "tunelab_prepare_version" in report else None


def is_prepared(folder: str | Path) -> bool:
    """A folder `prepare_dataset` wrote: told by its own report.json, not by train.jsonl alone (a raw dataset in the
    Hugging Face layout holds train.jsonl / test.jsonl too)."""
    folder = Path(folder)
    return (folder / "train.jsonl").is_file() and _own_report(folder) is not None


def load_prepared(folder: str | Path) -> PreparedData:
    """The train/val records, report and fingerprint of a folder written by `prepare_dataset`."""
    folder = Path(folder)
    report = _own_report(folder) if (folder / "train.jsonl").is_file() else None
    if report is None:
        raise DataError(f"{folder} is not a prepared dataset (it needs train.jsonl and the report.json tunelab "
                        f"prepare writes); create one with: tunelab prepare --input FILE --output {folder}")
    train = _read_jsonl(folder / "train.jsonl")
    val = _read_jsonl(folder / "val.jsonl") if (folder / "val.jsonl").is_file() else []
    if not train:
        raise DataError(f"{folder}/train.jsonl holds no records"
                        + (": " + "; ".join(report.get("problems", [])) if report.get("problems") else ""))
    fingerprint, edited = _content_fingerprint(folder, report)
    return PreparedData(train, val, report, fingerprint, folder, edited)


def _content_fingerprint(folder: Path, report: dict[str, Any]) -> tuple[str, list[str]]:
    """(fingerprint, files edited since prepare wrote them, in words). Untouched files keep the fingerprint prepare
    recorded (of its inputs, options and tokenizer), so runs and `tunelab reproduce` of the raw files agree with
    it; an edit gives a fingerprint of the files as they are, which no run recorded before the edit. A folder
    prepared before the files' hashes were recorded keeps its recorded fingerprint, unchecked."""
    fingerprint, recorded = report.get("fingerprint", ""), report.get("output_sha256")
    if not isinstance(recorded, dict):
        return fingerprint, []
    now = {name: sha256_file(folder / name) if (folder / name).is_file() else None for name in PREPARED_FILES}
    edited = [f"{name} (sha256 {str(recorded.get(name))[:12]}… when prepared, "
              + (f"{digest[:12]}… now)" if digest else "gone now)")
              for name, digest in now.items() if digest != recorded.get(name)]
    if not edited:
        return fingerprint, []
    return "sha256:" + hashlib.sha256(json.dumps([fingerprint, now]).encode()).hexdigest(), edited
