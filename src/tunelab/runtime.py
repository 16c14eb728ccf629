"""Process-level settings: glibc's allocator for the training verbs, and switches to measure each speed lever.

glibc's per-thread cache of freed blocks (tcache) keeps the heap from coalescing the memory a training step frees
layer by layer; measured here, a LoRA step with gradient checkpointing grew the heap to 2.4 GiB while 0.2 GiB was in
use (peak RSS 3.6 GiB), and 1.4 GiB without the cache, at the same speed (docs/perf-notes.md). The setting is an
environment variable that glibc reads only at start-up, so `tunelab train` (and the verbs that train) re-execute
themselves once with it. Opt out with TUNELAB_ALLOCATOR=system; nothing happens off Linux/glibc.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.tcache_count=0"
TRAINING_VERBS = {"train", "demo", "sweep", "reproduce"}


def allocator_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `environ` (default os.environ) with tunelab's glibc allocator setting added."""
    env = dict(os.environ if environ is None else environ)
    current = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.tcache_count" not in current:
        env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
    return env


def wants_allocator_reexec(verb: str | None) -> bool:
    started_from_a_file = bool(sys.argv) and sys.argv[0] not in ("", "-c")  # not a REPL or `python -c`
    return (verb in TRAINING_VERBS and started_from_a_file and sys.platform.startswith("linux")
            and platform.libc_ver()[0] == "glibc" and os.environ.get("TUNELAB_ALLOCATOR", "tunelab") != "system"
            and "glibc.malloc.tcache_count" not in os.environ.get("GLIBC_TUNABLES", ""))


def reexec_with_allocator_settings(verb: str | None) -> None:
    """Replace this process (same PID, same arguments) by one started with the allocator setting; no return."""
    if not wants_allocator_reexec(verb):
        return
    argv = list(getattr(sys, "orig_argv", []) or [sys.executable, *sys.argv])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], allocator_env())


# ---------------------------------------------------------------- switches for measuring each speed lever

LEVERS = ("packed_attention", "fast_dropout", "fused_head")


def lever_enabled(name: str) -> bool:
    """False when TUNELAB_PERF_OFF (comma-separated, of LEVERS) names this lever: how bench/train.py measures each
    lever on its own. Every lever gives the same results within float rounding; switching one off only costs time."""
    assert name in LEVERS, name
    return name not in {x.strip() for x in os.environ.get("TUNELAB_PERF_OFF", "").split(",")}
