"""Smoke tests of the benchmarks: bench/train.py end to end on a tiny model, and the shared measuring helpers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def _alpaca(path: Path, n: int = 48) -> Path:
    recs = [{"instruction": f"Question {i}: what is {i} plus {i}?", "input": "" if i % 2 else f"context {i}",
             "output": f"The answer is {2 * i}. " * (1 + i % 4)} for i in range(n)]
    path.write_text(json.dumps(recs))
    return path


def test_text_table_and_median():
    from common import median_after_warmup, text_table

    t = text_table(["row", "tok/s"], [["a", "1"], ["bbb", "22"]])
    lines = t.splitlines()
    assert lines[0].startswith("| row") and len(lines) == 4 and all(len(x) == len(lines[0]) for x in lines)
    assert median_after_warmup([10.0, 1.0, 2.0, 3.0], 1) == 2.0


def test_run_child_reports_peak_rss(tmp_path):
    from common import run_child

    code = "x = bytearray(200 * 2**20); x[::4096] = b'1' * len(x[::4096]); print('done')"
    res = run_child([sys.executable, "-c", code], log_path=tmp_path / "log")
    assert res.returncode == 0 and "done" in res.output_tail
    assert res.peak_rss_bytes > 200 * 2**20  # the child's own high-water mark, not the parent's
    assert (tmp_path / "log").read_text().strip() == "done"


def test_a_benchmark_stopped_by_sigterm_leaves_no_child_running(tmp_path):
    """`timeout` or `kill` on a benchmark used to leave its row's training process (and what it started) running,
    slowing every measurement after it."""
    import os
    import signal
    import time
    import uuid

    import psutil

    marker = f"tunelab-orphan-check-{uuid.uuid4().hex}"
    script = tmp_path / "bench.py"
    script.write_text(
        f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r})\n"
        "from common import run_child\n"
        f"inner = 'import subprocess, sys, time; subprocess.Popen([sys.executable, \"-c\", \"import time; "
        f"time.sleep(120)  # {marker}\"]); time.sleep(120)  # {marker}'\n"
        "run_child([sys.executable, '-c', inner])\n")
    bench = subprocess.Popen([sys.executable, str(script)])

    def ours():
        return [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]

    deadline = time.time() + 30
    while len(ours()) < 2 and time.time() < deadline:
        time.sleep(0.2)
    assert len(ours()) == 2, "the child and the child's child are running"
    os.kill(bench.pid, signal.SIGTERM)
    assert bench.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.time() + 10
    while ours() and time.time() < deadline:
        time.sleep(0.2)
    left = ours()
    for p in left:
        p.kill()
    assert not left


def test_matmul_peak_positive():
    from common import matmul_peak

    r = matmul_peak("fp32", sizes=(128,), seconds=0.05)
    assert r["gflops"] > 0 and r["n"] == 128


def test_rows_get_the_allocator_setting_only_where_they_should(monkeypatch):
    """A peer must not inherit tunelab's allocator setting from the benchmark's own environment (it lowered
    LLaMA-Factory's peak by 0.55 GiB once), and the tunelab rows get it even when the environment lacks it."""
    import train as bench_train

    for outer in ("glibc.malloc.tcache_count=0:glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2"):
        monkeypatch.setenv("GLIBC_TUNABLES", outer)
        env = {key: bench_train.row_env(key, kind)["GLIBC_TUNABLES"] for key, _, kind, _ in bench_train.VARIANTS}
        tuned = {key for key, value in env.items() if "glibc.malloc.tcache_count=0" in value}
        kinds = {key: kind for key, _, kind, _ in bench_train.VARIANTS}
        assert tuned == {k for k, kind in kinds.items() if kind == "tunelab" and k != "system_malloc"} | {
            "llamafactory-tcache_off"}, outer
        assert all("glibc.malloc.arena_max=2" in value for value in env.values())  # the rest is kept


@pytest.mark.slow
def test_bench_train_smoke(tmp_path, tiny_model_dir):
    """Two steps of the baseline, tunelab's default and one lever on a tiny 2-layer model: table and JSON."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "train.py"), "--model", str(tiny_model_dir), "--steps", "2",
         "--warmup", "0", "--eval-records", "4", "--only", "trl,tunelab-tokens,fp32,padded", "--lr", "1e-3",
         "--dtype", "fp32",
         "--data", str(_alpaca(tmp_path / "alpaca.json")), "--workdir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("| row"):]
    header = table.splitlines()[0]
    for col in ("tok/s", "s/step", "peak RSS GiB", "train loss", "eval loss", "MFU bf16", "MFU fp32"):
        assert col in header
    for key in ("trl", "tunelab-tokens", "fp32", "padded"):
        assert f"| {key}" in table
    cells = [c.strip() for c in next(x for x in table.splitlines() if x.startswith("| fp32 ")).split("|")[1:-1]]
    assert cells[-2] == "—" and cells[-1].endswith("%"), "an fp32 row: MFU against the fp32 peak only"
    assert "matmul peak again after the rows" in proc.stdout
    report = json.loads(out.read_text())
    assert report["settings"]["steps"] == 2 and report["settings"]["dtype"] == "fp32" and report["params"] > 0
    assert report["matmul_peak"]["fp32"]["gflops"] > 0
    rows = {r["key"]: r for r in report["rows"]}
    assert set(rows) == {"trl", "tunelab-tokens", "fp32", "padded"}
    assert 0 < max(rows["tunelab-tokens"]["step_tokens"]) <= 4 * 512, "batch x max_length tokens per step at most"
    for r in rows.values():
        assert r["ok"], r
        assert r["tokens_per_s"] > 0 and r["s_per_step"] > 0 and r["peak_rss_bytes"] > 0
        assert r["final_train_loss"] > 0 and r["eval_loss"] > 0 and r["mfu_fp32"] > 0
        assert len(r["step_times"]) == 2
        assert r["dtype"]["name"] == "fp32", "--dtype fp32: every row in fp32 whatever `auto` picks on this CPU"
    # both sides train the same records with the same masking, both in fp32 (TRL's baseline is fp32; `auto`
    # may pick bf16 on this CPU): same step token counts, similar first losses
    assert rows["trl"]["step_tokens"] == rows["fp32"]["step_tokens"]
    assert rows["trl"]["losses"][0] == pytest.approx(rows["fp32"]["losses"][0], rel=0.02)
