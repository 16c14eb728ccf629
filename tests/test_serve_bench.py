"""bench/serve.py end to end on the tiny model: it starts `tunelab serve`, drives it with openai clients, writes rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openai")
pytest.importorskip("uvicorn")
REPO = Path(__file__).resolve().parents[1]


def test_bench_serve_runs_and_reports_every_level(tiny_model_dir, tmp_path):
    out = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "serve.py"), "--model", str(tiny_model_dir),
                           "--dtype", "fp32", "--clients", "1,3", "--max-tokens", "3", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert [r["label"] for r in report["rows"]] == ["sequential (16 in a row)", "1 concurrent", "3 concurrent"]
    assert all(r["tokens"] > 0 and r["tok_s"] > 0 and r["p95_ttft_s"] <= r["p95_latency_s"] for r in report["rows"])
    assert "float32" in report["server"] and "| 3 concurrent |" in proc.stdout
