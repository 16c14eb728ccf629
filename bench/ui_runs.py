"""How fast the `tunelab ui` runs page is with 1,000 run folders (a benchmark, not a test).

    python bench/ui_runs.py [--runs 1000] [--metric-lines 200]

Writes N run folders (manifest.json, config.yaml, metrics.jsonl with train and eval lines) into a temporary
folder, then measures: the /api/runs answer cold (every manifest and metrics file read) and warm (files
unchanged: only stat calls), and, when Chromium and Playwright are installed, the time from opening the runs page
to the table holding every row. Prints the CPU, since the machine matters (see docs/machine-notes.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_runs(root: Path, n: int, lines: int) -> None:
    rng = random.Random(0)
    statuses = ["finished"] * 6 + ["failed", "interrupted", "completed", "running"]
    for i in range(n):
        run = root / f"run-{i:04d}"
        run.mkdir(parents=True)
        manifest = {"run_name": run.name, "status": rng.choice(statuses), "method": rng.choice(["lora", "dora"]),
                    "model": "bundled:smollm2-135m-instruct", "global_step": lines, "total_steps": lines,
                    "started_at": f"2026-01-{1 + i % 28:02d}T{i % 24:02d}:00:00+00:00", "duration_s": 60.0 + i,
                    "data": {"source": "data/raw/demo.json", "train_records": 90, "val_records": 10},
                    "metrics": {"train_loss": rng.uniform(1, 2), "eval_loss": rng.uniform(1, 2),
                                "perplexity": rng.uniform(3, 8), "bleu": rng.uniform(10, 40)}}
        (run / "manifest.json").write_text(json.dumps(manifest))
        (run / "config.yaml").write_text(f"lora:\n  r: {rng.choice([8, 16, 32])}\n")
        rows = [{"step": s, "loss": 2 - s / lines, "lr": 2e-4, "grad_norm": 1.0, "tokens_per_s": 150.0,
                 "elapsed_s": s * 0.5} for s in range(1, lines + 1)]
        rows += [{"step": s, "eval_loss": 2.1 - s / lines} for s in range(10, lines + 1, 10)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def browser_render_s(app, n: int) -> float | None:
    import shutil as sh

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    chromium = sh.which("chromium") or sh.which("chromium-browser")
    if chromium is None:
        return None
    from tests.ui.conftest import LiveServer

    with LiveServer(app) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        best = float("inf")
        for _ in range(3):
            page.goto("about:blank")  # a full load each time, not a hash change on an open page
            t0 = time.perf_counter()
            page.goto(server.url + "/#/runs")
            page.wait_for_function(f"() => document.querySelectorAll('#runs-table tbody tr').length === {n}",
                                   timeout=60_000)
            best = min(best, time.perf_counter() - t0)
        browser.close()
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--metric-lines", type=int, default=200)
    args = ap.parse_args()
    from fastapi.testclient import TestClient

    from tunelab.ui.app import create_app

    tmp = Path(tempfile.mkdtemp(prefix="tunelab-ui-bench-"))
    try:
        write_runs(tmp / "outputs", args.runs, args.metric_lines)
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else \
            platform.processor()
        print(f"CPU: {cpu}; {args.runs} runs x {args.metric_lines} metric lines")
        app = create_app("outputs", workdir=tmp)
        client = TestClient(app)
        t0 = time.perf_counter()
        n = len(client.get("/api/runs").json()["runs"])
        cold = time.perf_counter() - t0
        warm = timed(lambda: client.get("/api/runs").json())
        print(f"/api/runs cold (reads every manifest + metrics): {cold * 1000:.0f} ms for {n} runs")
        print(f"/api/runs warm (unchanged files: stat only):   {warm * 1000:.0f} ms")
        page = browser_render_s(create_app("outputs", workdir=tmp), n)
        print("browser: page open to all rows drawn:          " +
              (f"{page * 1000:.0f} ms" if page is not None else "skipped (no Chromium/Playwright)"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
