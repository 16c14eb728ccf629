"""Measuring helpers shared by the benchmarks: child processes with their peak RSS, matmul peaks, data, tables.

- `run_child(argv)`: run one measurement in its own process and return its exit code, wall time and peak RSS
  (the child's own high-water mark from `os.wait4`, i.e. getrusage of that child only, plus a psutil poll of the
  child's process tree as a cross-check), so each variant's memory is clean of the others'.
- `matmul_peak(dtype)`: the best GFLOP/s of square matrix multiplies in this process, at torch's thread count:
  the ceiling that model-FLOPs utilisation is measured against.
- `alpaca_records(n)`: the Alpaca demo from `../shared/data/llamafactory/alpaca_en_demo.json` when present, else
  records generated here (deterministic).
- `preference_records(kind)`: LLaMA-Factory's `dpo_en_demo.json` (pairs) or `kto_en_demo.json` (labelled answers)
  from the same folder when present, else pairs / labelled answers generated here in the same forms.

Benchmarks import this module as `bench.common` (run them from the repository root) or as `common` (run as
scripts: their own folder is first on sys.path).
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "llamafactory"
SHARED_ALPACA = SHARED_DATA / "alpaca_en_demo.json"
SHARED_PREFERENCE = {"pairs": SHARED_DATA / "dpo_en_demo.json", "kto": SHARED_DATA / "kto_en_demo.json"}
GIB = 2**30


# ---------------------------------------------------------------- child processes and their memory


@dataclass
class ChildResult:
    returncode: int
    wall_s: float
    peak_rss_bytes: int  # ru_maxrss of the child (os.wait4): its own resident high-water mark
    polled_peak_rss_bytes: int  # highest sum of RSS over the child and its descendants seen by polling
    output_tail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _exit_on_sigterm(signum, _frame):
    raise SystemExit(128 + signum)


def run_child(argv: Sequence[str], *, env: dict[str, str] | None = None, poll_s: float = 0.2,
              log_path: Path | None = None, timeout_s: float | None = None, echo: bool = False) -> ChildResult:
    """Run `argv` as a child process; its stdout+stderr go to `log_path` (and the terminal with echo=True).

    Peak RSS comes from the kernel's accounting of that one child (`os.wait4` → ru_maxrss, KiB on Linux), which
    catches short spikes a poll would miss; a psutil poll every `poll_s` adds the child's own children, if any.
    The child (and its children) goes with this process: Ctrl-C, SIGTERM (`timeout`, `kill`) or an error here
    leaves no orphan training on and slowing the next measurement.
    """
    import psutil

    log = open(log_path, "w", encoding="utf-8", buffering=1) if log_path else None
    start = time.perf_counter()
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, bufsize=1)
    ps = psutil.Process(proc.pid)
    polled = [0]
    done = threading.Event()

    def poll():
        while not done.is_set():
            polled[0] = max(polled[0], _tree_rss(ps))
            done.wait(poll_s)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    tail: list[str] = []
    timer = threading.Timer(timeout_s, proc.kill) if timeout_s else None
    if timer:
        timer.start()
    main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main else None
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if log:
                log.write(line)
            if echo:
                sys.stdout.write(line)
            tail.append(line)
            del tail[:-60]
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        try:
            victims = [*ps.children(recursive=True), ps]
        except psutil.Error:
            victims = [ps]
        for p in victims:
            try:
                p.kill()
            except psutil.Error:
                pass
        proc.wait()
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, old_term)
        done.set()
        if timer:
            timer.cancel()
        if log:
            log.close()
    poller.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ChildResult(proc.returncode, time.perf_counter() - start, usage.ru_maxrss * 1024, polled[0],
                       "".join(tail))


def step_timer(times: list[float]):
    """A transformers `TrainerCallback` that appends the seconds of each optimiser step to `times`, each step timed
    from the end of the previous one (the first from the start of training)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            times.append(now - self.t)
            self.t = now

    return StepTimer()


def current_peak_rss_bytes() -> int:
    """This process's own resident high-water mark."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------- compute ceiling


def matmul_peak(dtype: str = "fp32", sizes: Sequence[int] = (256, 1024, 2048), seconds: float = 1.5) -> dict[str, Any]:
    """Best GFLOP/s of an (n x n) by (n x n) product in `dtype` (fp32 | bf16 | fp16), a few repetitions per size.

    It goes through `torch.nn.functional.linear` (x @ W.T), the kernel a model's linear layers use: on some CPUs
    `torch.matmul` takes a much slower path for bf16 than `linear` does.
    """
    import torch
    import torch.nn.functional as F

    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    best, best_n = 0.0, None
    for n in sizes:
        a = torch.randn(n, n).to(tdt)
        b = torch.randn(n, n).to(tdt)
        t0 = time.perf_counter()
        F.linear(a, b)  # warm-up: kernel selection, first-touch of the output
        if time.perf_counter() - t0 > seconds:  # a slow path (e.g. bf16 without AMX/AVX512-BF16): stop growing
            best, best_n = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9), best_n or n
            break
        t_end = time.perf_counter() + seconds / len(sizes)
        reps = 0
        while time.perf_counter() < t_end or reps < 2:
            t0 = time.perf_counter()
            F.linear(a, b)
            dt = max(time.perf_counter() - t0, 1e-9)
            if 2 * n**3 / dt / 1e9 > best:
                best, best_n = 2 * n**3 / dt / 1e9, n
            reps += 1
    return {"dtype": dtype, "gflops": best, "n": best_n, "threads": torch.get_num_threads()}


def model_params(model_dir: str | Path) -> int:
    """Parameters stored in a model folder's safetensors (tied embeddings are stored, and counted, once)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n
    return total


# ---------------------------------------------------------------- data

_WORDS = ("the a model data train token answer question explain list short long number city river language code "
          "python write story poem summary reason step first second because therefore however example").split()


def alpaca_records(n: int | None = None, seed: int = 0) -> tuple[list[dict[str, str]], str]:
    """(records, source): the shared Alpaca demo when present, else `n or 1000` generated Alpaca records."""
    if SHARED_ALPACA.is_file():
        recs = json.loads(SHARED_ALPACA.read_text(encoding="utf-8"))
        return (recs[:n] if n else recs), str(SHARED_ALPACA)
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))

    recs = [{"instruction": f"{i}: {text(5, 30)}?", "input": text(0, 20) if i % 3 == 0 else "",
             "output": text(10, 200) + "."} for i in range(n or 1000)]
    return recs, f"generated ({len(recs)} records, seed {seed})"


def preference_records(kind: str, n: int = 300, seed: int = 0) -> tuple[list[dict[str, Any]], str]:
    """(records, source) for kind "pairs" (dpo / orpo / simpo) or "kto": the shared LLaMA-Factory demo when present,
    else `n` generated records in its forms (ShareGPT `conversations` + `chosen` / `rejected`; KTO `messages` +
    `label`), deterministic."""
    path = SHARED_PREFERENCE[kind]
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8")), str(path)
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))

    if kind == "pairs":  # the chosen answer polite and on topic, the rejected one curt or rambling
        recs = [{"conversations": [{"from": "human", "value": f"{i}: {text(5, 40)}?"}],
                 "chosen": {"from": "gpt", "value": "Certainly. " + text(10, 120) + "."},
                 "rejected": {"from": "gpt", "value": "No." if i % 2 else text(40, 160)}} for i in range(n)]
    else:
        recs = [{"messages": [{"role": "user", "content": f"{i}: {text(5, 40)}?"},
                              {"role": "assistant", "content": ("Certainly. " + text(10, 120) + ".") if i % 3
                               else "No."}], "label": bool(i % 3)} for i in range(n)]
    return recs, f"generated ({len(recs)} {'pairs' if kind == 'pairs' else 'labelled answers'}, seed {seed})"


# ---------------------------------------------------------------- small statistics and formatting


def median_after_warmup(values: Sequence[float], warmup: int) -> float | None:
    kept = list(values[warmup:]) or list(values)
    return statistics.median(kept) if kept else None


def fmt_bytes(n: float | None) -> str:
    return "—" if not n else f"{n / GIB:.2f} GiB"


def fmt(x: Any, spec: str = ".1f", none: str = "—") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return none
    return format(x, spec)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A plain fixed-width table (also valid Markdown): first column left-aligned, the rest right-aligned."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    align = align or ("l" + "r" * (len(headers) - 1))

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w)
                                 for c, w, a in zip(cells, widths, align)) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":") if a == "r" else "-" * w for w, a in zip(widths, align)) + " |"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def machine_summary() -> dict[str, Any]:
    import platform

    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from tunelab.model.loading import choose_dtype, cpu_has_fast_bf16

    choice = choose_dtype("auto")
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "fast_bf16_cpu": cpu_has_fast_bf16(), "cpu_kind": cpu_kind(), "auto_dtype": choice.name,
            "auto_dtype_reason": choice.reason,
            "load_avg": os.getloadavg(), "torch": torch.__version__, "python": platform.python_version()}


def cpu_kind() -> str:
    """AMX, AVX512-BF16 or AVX2-only: the three CPU kinds these machines come as (see machine-notes)."""
    try:
        flags = set(next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags")).split())
    except (OSError, StopIteration):
        return "unknown"
    if "amx_bf16" in flags:
        return "AVX512-BF16 + AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return "AVX2" if "avx2" in flags else "no AVX2"
