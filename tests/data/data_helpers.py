"""Plain helpers shared by the data tests (imported by name: tests/data is on sys.path)."""

from __future__ import annotations

import json


def jsonl(records) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def alpaca(i: int, **extra) -> dict:
    return {"instruction": f"question {i}", "input": "", "output": f"answer {i}", **extra}


def quiet(*_args) -> None:
    pass


def shared_file(rel: str):
    """A file under ../shared/data, or skip (the same rule as shared_file in tests/conftest.py)."""
    from pathlib import Path

    import pytest

    path = Path(__file__).resolve().parents[2].parent / "shared" / "data" / rel
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path
