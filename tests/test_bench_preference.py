"""Smoke test of bench/preference.py on the tiny 2-layer model: TRL's trainers and tunelab's preference recipe,
each in its own process; the table, the JSON and the fp32 loss equality of the dpo rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _files(folder: Path) -> tuple[Path, Path]:
    qs = [f"Question {i}: what is {i} plus {i}?" for i in range(24)]
    pairs = [{"conversations": [{"from": "human", "value": q}],
              "chosen": {"from": "gpt", "value": f"The answer is {2 * i}. " * (1 + i % 3)},
              "rejected": {"from": "gpt", "value": "No idea." if i % 2 else f"Maybe {i}, or {3 * i}, who knows."}}
             for i, q in enumerate(qs)]
    kto = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"It is {2 * i}." if i % 2
                                                           else "No idea."}], "label": bool(i % 2)}
           for i, q in enumerate(qs)]
    (folder / "pairs.json").write_text(json.dumps(pairs))
    (folder / "kto.json").write_text(json.dumps(kto))
    return folder / "pairs.json", folder / "kto.json"


@pytest.mark.slow
def test_bench_preference_smoke(tmp_path, tiny_model_dir):
    pairs, kto = _files(tmp_path)
    out = tmp_path / "pref.json"
    rows = ["trl-dpo-fp32", "tunelab-dpo-fp32", "tunelab-orpo", "trl-kto", "tunelab-kto"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "preference.py"), "--model", str(tiny_model_dir), "--steps", "3",
         "--warmup", "1", "--batch-size", "2", "--lr", "1e-3", "--max-length", "128", "--data", str(pairs),
         "--kto-data", str(kto), "--only", ",".join(rows), "--workdir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "auto dtype" in proc.stdout and "load average" in proc.stdout
    table = proc.stdout[proc.stdout.index("| row"):]
    for col in ("pairs/s", "tok/s", "x base", "s/step", "peak RSS GiB", "RSS / base", "final loss", "|d loss| vs TRL"):
        assert col in table.splitlines()[0]
    for key in rows:
        assert f"| {key}" in table
    report = json.loads(out.read_text())
    got = {r["key"]: r for r in report["rows"]}
    assert set(got) == set(rows)
    for r in got.values():
        assert r["ok"], r
        assert r["pairs_per_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_rss_bytes"] > 0
        assert len(r["step_times"]) == 3 and r["final_train_loss"] is not None
    # same pairs, same order, same precision: the losses of every step agree (step 1 of dpo is log 2 on both sides)
    a, b = got["trl-dpo-fp32"]["losses"], got["tunelab-dpo-fp32"]["losses"]
    assert len(a) == len(b) == 3 and abs(a[0] - 0.6931) < 1e-3
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3, (a, b)
    assert got["trl-dpo-fp32"]["dtype"]["name"] == got["tunelab-dpo-fp32"]["dtype"]["name"] == "fp32"
