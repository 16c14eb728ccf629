"""Helpers for the data tests: write small hand-made files in every container and encoding."""

from __future__ import annotations

import json
import tempfile
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



def _keep_hypothesis_out_of_the_repository() -> None:
    """Hypothesis caches what it learns in ./.hypothesis, from the moment a test module is collected: move that
    to the temp folder before any is (tests must not add files to the repository)."""
    try:
        from hypothesis.configuration import set_hypothesis_home_dir
    except ImportError:  # not installed: the property tests skip themselves
        return
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "tunelab-hypothesis")


_keep_hypothesis_out_of_the_repository()
