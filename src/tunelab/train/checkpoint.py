"""Atomic, verifiable, resumable checkpoints.

A checkpoint is written into a hidden temporary folder, every file is fsynced, a `manifest.json` lists each file
with its size, and only then is the folder renamed to `checkpoint-<step>`. A folder without a manifest, or whose
files do not match it, is never used for resuming.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import TunelabError
from tunelab.files import as_umask_allows

STEP_RE = re.compile(r"^checkpoint-(\d+)$")


def _fsync_tree(folder: Path) -> dict[str, int]:
    sizes = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            sizes[str(f.relative_to(folder))] = f.stat().st_size
    return sizes


def is_complete(folder: Path) -> bool:
    man = folder / "manifest.json"
    if not man.is_file():
        return False
    try:
        files = json.loads(man.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items())


def complete_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete step checkpoint, oldest first."""
    out = []
    for d in Path(run).glob("checkpoint-*"):
        m = STEP_RE.match(d.name)
        if m and d.is_dir() and is_complete(d):
            out.append((int(m.group(1)), d))
    return sorted(out)


def check_disk(folder: Path, needed_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed_bytes * 1.2 + 50 * 2**20:
        raise TunelabError(f"not enough free disk in {folder} for a checkpoint: about {needed_bytes / 2**20:.0f} MiB "
                           f"needed, {free / 2**20:.0f} MiB free. Free some space (older runs in outputs/) and "
                           "resume with --resume")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def all_rng_states() -> list[dict[str, Any]]:
    """Every process's RNG state, by rank (a collective: all processes call it). Each resumes its own stream: the
    processes' streams part once their draws depend on their own batches (torch's dropout, CUDA's Philox)."""
    state = rng_state()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [state]
    states: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


def _rng_file(rank: int) -> str:
    return "rng_state.pt" if rank == 0 else f"rng_state_{rank}.pt"


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run: Path, name: str, save_model, *, optimizer=None, scheduler=None,
                    trainer_state: dict[str, Any] | None = None, estimate_bytes: int = 0,
                    rng_states: list[dict[str, Any]] | None = None) -> Path:
    """Write `run/name` atomically. `save_model(folder)` writes the weights (adapter or full model) and tokenizer;
    with `trainer_state`, the RNG states too (`rng_states`: every process's, from `all_rng_states`)."""
    run = Path(run)
    check_disk(run, estimate_bytes)
    final = run / name
    tmp = run / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        _write_files(tmp, save_model, optimizer, scheduler, trainer_state, rng_states)
    except Exception as e:  # disk full (torch reports it as a RuntimeError), quota, I/O: the others are untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise TunelabError(f"could not write {name} in {run}: {_why(e, run)}. The previous checkpoints are intact; "
                           f"free some space and resume with: tunelab train --resume {run}") from None
    as_umask_allows(tmp)  # safetensors writes 0600: an adapter others on the machine could not serve
    old = run / f".{name}.old"
    if final.exists():  # replacing (e.g. checkpoint-best): keep the old one until the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _why(e: Exception, run: Path) -> str:
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    try:
        full = full or shutil.disk_usage(run).free < 64 * 2**20
    except OSError:
        pass
    return ("the disk is full" + (f" ({type(e).__name__}: {e})" if not isinstance(e, OSError) else "")
            if full else f"{type(e).__name__}: {e}")


def _write_files(tmp: Path, save_model, optimizer, scheduler, trainer_state: dict[str, Any] | None,
                 rng_states: list[dict[str, Any]] | None) -> None:
    save_model(tmp)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if trainer_state is not None:
        for rank, state in enumerate(rng_states or [rng_state()]):
            torch.save(state, tmp / _rng_file(rank))
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    sizes = _fsync_tree(tmp)
    (tmp / "manifest.json").write_text(json.dumps({"files": sizes, "complete": True}, indent=2))
    _fsync_tree(tmp)


def rotate(run: Path, keep: int) -> None:
    for _, folder in complete_checkpoints(run)[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)
    for leftover in Path(run).glob(".checkpoint-*.tmp"):  # half-written by a killed process
        shutil.rmtree(leftover, ignore_errors=True)
    for old in Path(run).glob(".checkpoint-*.old"):  # a kill between the two renames of a replacement
        final = old.with_name(old.name[1:-4])
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)


def load_training_state(folder: Path, optimizer, scheduler, rank: int = 0) -> dict[str, Any]:
    """Optimiser, schedule and this process's RNG state (rank 0's where the checkpoint holds no state of `rank`:
    a run resumed with more processes than it saved, or saved before states were kept per process)."""
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    rng = folder / _rng_file(rank)
    set_rng_state(torch.load(rng if rng.is_file() else folder / _rng_file(0), weights_only=True))
    return json.loads((folder / "trainer_state.json").read_text())
