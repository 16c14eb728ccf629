"""Process-level settings: glibc's allocator and oneDNN's shape caches for the training verbs, and switches to
measure each speed lever.

glibc's per-thread cache of freed blocks (tcache) keeps the heap from coalescing the memory a training step frees
layer by layer; measured here, a LoRA step with gradient checkpointing grew the heap to 2.4 GiB while 0.2 GiB was in
use (peak RSS 3.6 GiB), and 1.4 GiB without the cache, at the same speed (docs/perf-notes.md). The setting is an
environment variable that glibc reads only at start-up, so `tunelab train` (and the verbs that train) re-execute
themselves once with it. Opt out with TUNELAB_ALLOCATOR=system; nothing happens off Linux/glibc.

Opt-in (`TUNELAB_PERF_ON=trim_heap`): between the forward/backward passes of one optimiser step (gradient
accumulation) the training loops hand the pages of the heap's free blocks back to the kernel (`return_free_heap`,
glibc's malloc_trim): each pass frees its activations layer by layer in an order that leaves gaps the next pass's
differently sized blocks do not fill, and those gaps otherwise stay resident. Measured: ~7% less peak memory for
4-5% less speed at 4 passes per step (docs/perf-notes.md section 10), hence not a default.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
from contextlib import contextmanager
from pathlib import Path

TUNABLE = "glibc.malloc.tcache_count=0"
TRAINING_VERBS = {"train", "demo", "sweep", "reproduce"}
_SENTINEL = "TUNELAB_REEXECUTED"


def allocator_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `environ` (default os.environ) with tunelab's glibc allocator setting added."""
    env = dict(os.environ if environ is None else environ)
    current = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.tcache_count" not in current:
        env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
    return env


def wants_allocator_reexec(verb: str | None) -> bool:
    """True when this process should restart itself with the allocator setting: a training verb, started from
    tunelab's own entry point (console script, `python -m tunelab`, or the brief's train.py), on Linux/glibc, not
    opted out, and not restarted already."""
    own_entry_point = bool(sys.argv) and Path(sys.argv[0]).name in ("tunelab", "__main__.py", "train.py")
    return (verb in TRAINING_VERBS and own_entry_point and sys.platform.startswith("linux")
            and platform.libc_ver()[0] == "glibc" and os.environ.get("TUNELAB_ALLOCATOR", "tunelab") != "system"
            and not os.environ.get(_SENTINEL)
            and "glibc.malloc.tcache_count" not in os.environ.get("GLIBC_TUNABLES", ""))


def reexec_with_allocator_settings(verb: str | None) -> None:
    """Replace this process (same PID, same arguments) by one started with the allocator setting; no return."""
    if not wants_allocator_reexec(verb):
        return
    argv = list(getattr(sys, "orig_argv", []) or [sys.executable, *sys.argv])
    sys.stdout.flush()
    sys.stderr.flush()
    env = allocator_env()
    env[_SENTINEL] = "1"  # never twice, even if something strips GLIBC_TUNABLES on the way
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)


# oneDNN's primitive cache and ideep's (torch's oneDNN wrapper) cache of computations each keep every product shape
# they have run, ~0.3-0.6 MiB apiece whatever the shape (mostly generated kernel code), up to 1,024 entries by
# default. A training run meets a new token count nearly every pass, so both grew with the run: ~25 MiB per
# 2,048-token step here, 0.37 GiB of live heap after 16 steps, until full (docs/perf-notes.md section 11). One pass
# uses 35 (512 tokens) to 61 (2,048 tokens) distinct products, each once per layer, so 64 entries still serve every
# layer of a pass from the cache; 128 held ~0.06-0.1 GiB more at the same speed, 16 thrashed (0.75x; section 12).
# Passes of <= 512 tokens missed no more often at 32 (138-148 creations per step against 102-145 at 64) and peaked
# ~40 MB lower (section 13). Read once, at the process's first oneDNN product.
KERNEL_CACHES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "64"}
SMALL_PASS_TOKENS, SMALL_PASS_ENTRIES = 512, "32"


def bound_kernel_caches(pass_tokens: int | None = None) -> None:
    """Cap oneDNN's and ideep's shape caches for a training process (KERNEL_CACHES; SMALL_PASS_ENTRIES when every
    pass holds at most SMALL_PASS_TOKENS tokens), unless the environment already sets them. Only effective before
    the process's first oneDNN product: the training entry points call it first."""
    small = pass_tokens is not None and pass_tokens <= SMALL_PASS_TOKENS
    for var, value in KERNEL_CACHES.items():
        os.environ.setdefault(var, SMALL_PASS_ENTRIES if small else value)


@functools.cache
def _malloc_trim():
    if not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def return_free_heap() -> None:
    """Give the whole pages inside glibc's free heap blocks back to the kernel (malloc_trim(0)) when the opt-in
    lever trim_heap is on. Nothing changes in the process's data, only which of its free pages stay resident;
    off Linux/glibc a no-op."""
    trim = _malloc_trim() if lever_enabled("trim_heap") else None
    if trim is not None:
        trim(0)


# ---------------------------------------------------------------- switches for measuring each speed lever

LEVERS = ("packed_attention", "fast_dropout", "fused_head", "fused_lora", "logit_buffers", "shared_prompt",
          "lean_layers", "autocast_lora_inputs", "one_row_gemv", "bmm_attention", "trim_heap", "sfc64_dropout",
          "layer_masks", "rebuild_inputs")
# The levers runs recorded before `levers_known` was written to the manifest could have had (tunelab reproduce
# switches every later one off for them: they change results within rounding).
FIRST_LEVERS = ("packed_attention", "fast_dropout", "fused_head", "fused_lora", "logit_buffers")
# Levers that are off unless TUNELAB_PERF_ON names them: trim_heap trades speed for memory (docs/perf-notes.md
# section 10), so it is not a default.
OPT_IN = ("trim_heap",)
# Levers that were opt-in when earlier runs were recorded (their manifests list them in `levers_on` when on, and
# nowhere when off): fused_lora became a default with passes of <= 512 tokens (section 12).
FORMERLY_OPT_IN = ("fused_lora",)


def lever_enabled(name: str) -> bool:
    """False when TUNELAB_PERF_OFF (comma-separated, of LEVERS) names this lever, or, for an OPT_IN lever, unless
    TUNELAB_PERF_ON names it: how bench/train.py measures each lever on its own. packed_attention, fused_head and
    fused_lora change results only within float rounding (fused_lora draws fast_dropout's masks in the same
    order), shared_prompt (a preference pair's prompt through the model once) and lean_layers (norm and SwiGLU
    keeping less for backward) within rounding too, logit_buffers and autocast_lora_inputs not at all; one_row_gemv
    (single-stream bf16 decode products through torch's own matrix-vector kernel, tunelab.decode) rounds each product
    differently in the last bit of some values, bmm_attention (bf16 records attended to with batched products
    instead of SDPA's flash kernel) within bf16 rounding, trim_heap (free heap pages returned between the passes of
    a step) and rebuild_inputs (fused LoRA layers keep what the norm or SwiGLU before them keeps anyway and make
    their input again in backward) not at all; fast_dropout draws its masks from another random stream (same
    statistics), so losses differ from a run without it, sfc64_dropout (fast_dropout's words from numpy's SFC64,
    16-bit levels) from yet another, and layer_masks (a decoder layer's LoRA masks drawn together) from another. The
    manifest records which levers were off (`runtime`), and `tunelab reproduce` switches the same ones off."""
    assert name in LEVERS, name
    if name in _named("TUNELAB_PERF_OFF"):
        return False
    return name not in OPT_IN or name in _named("TUNELAB_PERF_ON")


def _named(var: str) -> frozenset[str]:
    return _split(os.environ.get(var, ""))


@functools.lru_cache(maxsize=16)
def _split(value: str) -> frozenset[str]:
    """The names in a comma-separated setting (cached: masks and layers ask thousands of times a step)."""
    return frozenset(x.strip() for x in value.split(","))


def runtime_info() -> dict:
    """What of this process changes a run's numbers or memory but is not config: for the manifest."""
    return {"levers_off": [name for name in LEVERS if name not in OPT_IN and not lever_enabled(name)],
            "levers_on": [name for name in OPT_IN if lever_enabled(name)], "levers_known": list(LEVERS),
            "opt_in": list(OPT_IN),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
            "kernel_caches": {var: os.environ.get(var) for var in KERNEL_CACHES}}


@contextmanager
def levers_as_recorded(off: list[str], on: list[str] | None = None):
    """Switch exactly these levers off and these opt-in levers on for the duration (in this process): how
    `tunelab reproduce` repeats a run with the levers it had."""
    before = {var: os.environ.get(var) for var in ("TUNELAB_PERF_OFF", "TUNELAB_PERF_ON")}
    os.environ["TUNELAB_PERF_OFF"] = ",".join(off)
    os.environ["TUNELAB_PERF_ON"] = ",".join(on or [])
    try:
        yield
    finally:
        for var, value in before.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
