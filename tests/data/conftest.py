"""Helpers for the data tests: write small hand-made files in every container and encoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture
def write(tmp_path):
    """write(name, content): bytes as is, str as UTF-8, list/dict as a JSON document; returns the path."""

    def _write(name: str, content) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_bytes(content.encode("utf-8"))
        else:
            path.write_text(json.dumps(content, ensure_ascii=False, indent=2), encoding="utf-8")
        return path

    return _write
