"""Benchmark `tunelab prepare` against a plain `datasets` baseline on generated Alpaca records.

    python bench/prepare.py                # 100,000 records
    python bench/prepare.py --n 20000 --model /path/to/model_or_tokenizer

Both sides run in their own subprocess, measured the same way: wall time from process start to exit (imports
and tokenizer loading included), the wall and CPU time of the work itself (reported by the child; CPU time is
the fairer figure on a shared machine), and peak RSS (from `os.wait4`, for that child only). Both use the same
tokenizer and chat template:
- tunelab: `prepare_dataset` (read, validate, deduplicate, encode every record with the real chat template and
  loss mask, split, write the folder and report);
- baseline: `datasets.load_dataset("json")` + `map` with `tokenizer.apply_chat_template(..., tokenize=True)`
  (no validation, no loss mask, no report).
A second tunelab run on a tenth of the records shows whether peak memory grows with the file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the a model data train token answer question explain list short long number city river language code "
         "python write story poem summary reason step first second because therefore however example").split()


def generate(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            rec = {"instruction": f"{i}: {text(5, 30)}?", "input": text(0, 20) if i % 3 == 0 else "",
                   "output": text(10, 150) + "."}
            f.write(json.dumps(rec) + "\n")


TUNELAB_CHILD = """
import json, sys, time
t0 = time.perf_counter()
from tunelab.cli.prepare import load_stats_tokenizer
from tunelab.data.prepare import prepare_dataset
tok = load_stats_tokenizer(sys.argv[2])
t1, c1 = time.perf_counter(), time.process_time()
r = prepare_dataset(sys.argv[1], sys.argv[3], tokenizer=tok, max_length=512, console=lambda *a: None)
t2, c2 = time.perf_counter(), time.process_time()
print(json.dumps({"records": r.report["records_accepted"], "work_s": t2 - t1, "cpu_s": c2 - c1, "setup_s": t1 - t0}))
"""

BASELINE_CHILD = """
import json, sys, time
t0 = time.perf_counter()
import datasets
from tunelab.cli.prepare import load_stats_tokenizer
datasets.disable_progress_bars()
tok = load_stats_tokenizer(sys.argv[2])
t1, c1 = time.perf_counter(), time.process_time()
ds = datasets.load_dataset("json", data_files=sys.argv[1], split="train", cache_dir=sys.argv[3])

def encode(r):
    user = r["instruction"] + ("\\n\\n" + r["input"] if r["input"] else "")
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]
    ids = tok.apply_chat_template(msgs, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return {"input_ids": ids, "length": len(ids)}

ds = ds.map(encode, remove_columns=ds.column_names)
t2, c2 = time.perf_counter(), time.process_time()
print(json.dumps({"records": len(ds), "work_s": t2 - t1, "cpu_s": c2 - c1, "setup_s": t1 - t0}))
"""


def measure(code: str, args: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark child failed (exit {os.waitstatus_to_exitcode(status)})")
    result = json.loads(out.strip().splitlines()[-1])
    rss_kb = usage.ru_maxrss  # kilobytes on Linux
    return {**result, "wall_s": wall, "peak_rss_mb": rss_kb / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="records to generate (default 100000)")
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct", help="model or tokenizer folder")
    ap.add_argument("--skip-small", action="store_true", help="skip the memory-growth run on n/10 records")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as tmp:
        tmp = Path(tmp)
        data, small = tmp / "alpaca.jsonl", tmp / "alpaca_small.jsonl"
        generate(data, args.n)
        rows = [("tunelab prepare", args.n, measure(TUNELAB_CHILD, [str(data), args.model, str(tmp / "out")])),
                ("datasets load_dataset+map", args.n,
                 measure(BASELINE_CHILD, [str(data), args.model, str(tmp / "hf-cache")]))]
        if not args.skip_small:
            generate(small, max(1, args.n // 10))
            rows.append(("tunelab prepare (n/10)", max(1, args.n // 10),
                         measure(TUNELAB_CHILD, [str(small), args.model, str(tmp / "out-small")])))
        size_mb = data.stat().st_size / 2**20
    print(f"\n{args.n} generated Alpaca records ({size_mb:.1f} MB JSONL), tokenizer {args.model}\n")
    print(f"{'':28} {'records':>8} {'work s':>7} {'records/s':>10} {'work cpu s':>11} {'records/cpu s':>14} "
          f"{'wall s':>7} {'peak RSS MB':>12}")
    for name, n, m in rows:
        print(f"{name:28} {n:>8} {m['work_s']:>7.1f} {n / m['work_s']:>10.0f} {m['cpu_s']:>11.1f} "
              f"{n / m['cpu_s']:>14.0f} {m['wall_s']:>7.1f} {m['peak_rss_mb']:>12.0f}")


if __name__ == "__main__":
    main()
