"""Atomic, verifiable, resumable checkpoints.

A checkpoint is written into a hidden temporary folder, every file is fsynced, a `manifest.json` lists each file
with its size and sha256, and only then is the folder renamed to `checkpoint-<step>`. A folder without a manifest,
or whose files do not have its sizes, is never used for resuming; the one chosen to resume from is also checked
against its hashes (`newest_sound_checkpoint`), and a damaged one is moved aside to `checkpoint-<step>.damaged`.
Checkpoints written before hashes were recorded are checked by size only.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shlex
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch

from tunelab.errors import TunelabError
from tunelab.files import as_umask_allows, retry_advice, sha256_file, write_failure
from tunelab.rundir import resume_command

STEP_RE = re.compile(r"^checkpoint-(\d+)$")


def _seal(folder: Path) -> dict[str, Any]:
    """Fsync every file and return the manifest: each file's size and sha256. The hash reads back what was just
    written (from the page cache: about 0.9 GB/s with SHA-NI, under a millisecond for a LoRA checkpoint)."""
    sizes, digests = {}, {}
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            name = str(f.relative_to(folder))
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            sizes[name], digests[name] = f.stat().st_size, sha256_file(f)
    return {"files": sizes, "sha256": digests, "complete": True}


def _manifest(folder: Path) -> tuple[dict[str, int], dict[str, str]] | None:
    """(sizes, sha256s) from a well-formed manifest, sha256s empty for one written before they were recorded; None
    for a missing, torn or foreign one: that checkpoint is not complete, and never an error."""
    try:
        man = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    sizes = man.get("files") if isinstance(man, dict) else None
    digests = man.get("sha256", {}) if isinstance(man, dict) else None
    if not (isinstance(sizes, dict) and sizes and all(type(v) is int for v in sizes.values())):
        return None
    if not (isinstance(digests, dict) and all(isinstance(v, str) for v in digests.values())
            and digests.keys() <= sizes.keys()):
        return None
    return sizes, digests


def is_complete(folder: Path) -> bool:
    """Every file the manifest lists is there with its size (cheap: the hashes are checked only on resume)."""
    man = _manifest(folder)
    return man is not None and all((folder / name).is_file() and (folder / name).stat().st_size == size
                                   for name, size in man[0].items())


def damaged_file(folder: Path) -> str | None:
    """The first file of a complete checkpoint whose content no longer has its recorded sha256; None when all do
    (or the checkpoint predates the hashes)."""
    man = _manifest(folder)
    for name, digest in (man[1] if man else {}).items():
        try:
            if sha256_file(folder / name) != digest:
                return name
        except OSError:  # gone or unreadable since the size check: as unusable as a changed file
            return name
    return None


def newest_sound_checkpoint(run: Path, say: Callable[[str], None] = print, set_aside: bool = True) -> Path | None:
    """The checkpoint to resume from: the newest complete one whose files match their hashes, or None.

    Only the chosen one is hashed (all would be slow). A damaged one is renamed aside (`set_aside`: the main
    process only), so that it is neither picked again nor kept by rotation in place of a good one."""
    damaged = False
    for _, folder in reversed(complete_checkpoints(run)):
        bad = damaged_file(folder)
        if bad is None:
            return folder
        damaged = True
        say(f"warning: {folder.name} is damaged: {bad} no longer matches the checksum saved with it"
            f"{_set_aside(folder) if set_aside else ''}; trying the checkpoint before it")
    if damaged:
        say(f"warning: no undamaged checkpoint is left in {run}: the run starts again from step 0")
    return None


def _set_aside(folder: Path) -> str:
    """Rename a damaged checkpoint to `<name>.damaged` (no longer matched as a checkpoint); words saying where."""
    aside, n = folder.with_name(f"{folder.name}.damaged"), 1
    while aside.exists():  # damaged at this step before, in an earlier attempt
        n += 1
        aside = folder.with_name(f"{folder.name}.damaged-{n}")
    try:
        os.rename(folder, aside)
    except OSError as e:
        return f" (could not move it aside: {e.strerror or e})"
    return f"; moved aside to {aside.name} (look into it, or delete it)"


def complete_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete step checkpoint, oldest first."""
    out = []
    for d in Path(run).glob("checkpoint-*"):
        m = STEP_RE.match(d.name)
        if m and d.is_dir() and is_complete(d):
            out.append((int(m.group(1)), d))
    return sorted(out)


class NotWritten(TunelabError):
    """A checkpoint that was not written: `reason` says why, the message adds what to do about it."""

    def __init__(self, reason: str, advice: str):
        super().__init__(f"{reason}. {advice}")
        self.reason = reason


def check_disk(folder: Path, needed_bytes: int, then: str | None = None) -> None:
    """Refuse a checkpoint of about `needed_bytes` unless that plus a margin (20% + 50 MiB: the estimate's error, and
    what else the run writes meanwhile) is free in the run `folder`; `then`: what to do, said after."""
    free, wanted = shutil.disk_usage(folder).free, needed_bytes * 1.2 + 50 * 2**20
    if free < wanted:
        then = then or f"Free some space (older runs in outputs/) and resume with: {resume_command(folder)}"
        raise NotWritten(f"not enough free disk in {folder} for a checkpoint: it takes about "
                         f"{needed_bytes / 2**20:,.0f} MiB, and one is written only when that plus a margin of 20% + "
                         f"50 MiB ({wanted / 2**20:,.0f} MiB in all) is free; {free / 2**20:,.0f} MiB are free", then)


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


def improves(loss: float, best: float | None) -> bool:
    """Whether an eval loss makes a new checkpoint-best. A NaN or infinite one never does: kept as the best, a NaN
    would also block every later one (nothing compares below NaN) and early stopping would end the run."""
    return math.isfinite(loss) and (best is None or not math.isfinite(best) or loss < best)


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
        why = write_failure(e, run)  # while the partial files still fill the disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise NotWritten(f"could not write {name} in {run}: {why}",
                         f"{_kept(run)}; {retry_advice(why, 'resume with: ' + resume_command(run))}") from None
    as_umask_allows(tmp)  # safetensors writes 0600: an adapter others on the machine could not serve
    old = run / f".{name}.old"
    if final.exists():  # replacing (e.g. checkpoint-best): keep the old one until the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _kept(run: Path) -> str:
    steps = [d.name for _, d in complete_checkpoints(run)]
    others = [n for n in ("checkpoint-best", "checkpoint-final") if is_complete(run / n)]
    if steps:
        return f"The earlier checkpoints are intact ({', '.join(steps + others)})"
    # checkpoint-best holds weights only: a resume cannot continue from it
    return ("No resumable checkpoint was written before it, so a resume starts the run again from step 0"
            + (f" ({', '.join(others)} intact)" if others else ""))


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
    man = tmp / "manifest.json"
    man.write_text(json.dumps(_seal(tmp), indent=2))
    with open(man, "rb") as fh:
        os.fsync(fh.fileno())


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
    with reading(folder / "optimizer.pt") as path:
        optimizer.load_state_dict(torch.load(path, weights_only=True))
    with reading(folder / "scheduler.pt") as path:
        scheduler.load_state_dict(torch.load(path, weights_only=True))
    rng = folder / _rng_file(rank)
    with reading(rng if rng.is_file() else folder / _rng_file(0)) as path:
        set_rng_state(torch.load(path, weights_only=True))
    with reading(folder / "trainer_state.json") as path:
        state = json.loads(path.read_text())
        if not isinstance(state, dict):
            raise ValueError(f"a JSON {type(state).__name__}, not an object")
    return state


@contextmanager
def reading(path: Path) -> Iterator[Path]:
    """Loading a checkpoint file: a file the hashes could not vouch for (a checkpoint saved before they were
    recorded) that fails to load is an error naming it and how to resume without it, not torch's traceback
    (whose words, e.g. about `weights_only`, point the wrong way)."""
    try:
        yield path
    except (TunelabError, MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as e:
        folder, q = path.parent, shlex.quote
        # only torch's first sentence: the rest advises weights_only=False, wrong for a damaged file
        first = re.split(r"(?<=\.)\s|\n", str(e).strip(), maxsplit=1)[0][:200]
        raise TunelabError(
            f"--resume: {path.name} in {folder} could not be loaded ({type(e).__name__}: {first}). If the checkpoint "
            f"is damaged, move it aside and resume from the one before it (or from step 0 when there is none): "
            f"mv {q(str(folder))} {q(str(folder) + '.damaged')} && {resume_command(folder.parent)}"
        ) from e
