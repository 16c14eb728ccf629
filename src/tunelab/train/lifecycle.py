"""One owner for a run's life: from the moment its folder exists until training ends, whatever happens.

    cfg, life, resume_from = open_run(cfg, resume, main, overrides)
    with life:                      # manifest status: starting → running → finished / failed / interrupted
        ...set up, train, save...

`RunLife` writes the status (and on failure the error) into manifest.json and train.log, closes the log and the
trackers, and restores the signal handlers. A fresh run that fails before anything useful was written (no
checkpoint, no metrics) leaves no folder behind: only the error message. Ctrl-C / SIGTERM before the first step
aborts at once (nothing to save); from the first step on it finishes the step and checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from tunelab.config import Config, load_config, save_config
from tunelab.errors import TunelabError
from tunelab.train import checkpoint as ckpt
from tunelab.train.monitor import Reporter, Trackers
from tunelab.rundir import RunDir, default_run_name, now_iso, read_metrics, run_status

# Settings a resumed run may change: they decide what is logged, evaluated and kept, not what is trained.
SAFE_ON_RESUME = ("training.logging_steps", "training.eval_steps", "training.save_steps", "training.save_total_limit",
                  "training.early_stopping_patience", "training.nan_guard", "training.num_workers", "eval.",
                  "tracking.", "output.")
# What a leftover folder of an aborted start can hold (older tunelab versions kept it); anything else is not ours.
_LEFTOVERS = ("config.yaml", "data", "train.log", "rejected_at_encode.train.jsonl", "rejected_at_encode.val.jsonl")


class TrainingInterrupted(TunelabError):
    exit_code = 130


class TrainingDiverged(TunelabError):
    exit_code = 3


class RunLife:
    """The run folder's owner: status, error, log, trackers and signal handlers (see the module docstring)."""

    def __init__(self, run: RunDir, *, fresh: bool, main: bool):
        self.run, self.fresh, self.main = run, fresh, main
        self.reporter = Reporter(run.path / "train.log" if main else None, 0, enabled=main)
        self.trackers: Trackers | None = None
        self.stop_signal: str | None = None
        self.graceful = False  # True once training steps run: a signal then means "checkpoint and stop"
        self.global_step = 0
        self._old_handlers: dict[int, Any] = {}

    @property
    def path(self) -> Path:
        return self.run.path

    def say(self, text: str = "") -> None:
        self.reporter.line(text)

    # ---- the context

    def __enter__(self) -> "RunLife":
        self._old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.run.update_manifest(status="starting", pid=os.getpid())  # a resumed run loads again too
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        status, error = _outcome(exc)
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        if self.trackers is not None:
            self.trackers.close({"finished": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED"))
        if error:  # the caller (the CLI) shows the message; the log keeps it beside the run
            self.reporter.log_only(f"{'error' if status == 'failed' else 'stopped'}: {error}")
        self.reporter.close()
        if self.main and status != "finished" and self.fresh and not self._has_results():
            shutil.rmtree(self.path, ignore_errors=True)  # nothing useful: no orphan folder, no stale data
            print(f"(nothing was trained; {self.path} was removed)", file=sys.stderr)
        elif self.main:
            failure = None if status != "failed" else "diverged" if isinstance(exc, TrainingDiverged) else "error"
            self.run.update_manifest(status=status, error=error, failure=failure, ended_at=now_iso(),
                                     global_step=self.global_step,
                                     duration_s=_duration(self.run.manifest().get("started_at")))
        if isinstance(exc, KeyboardInterrupt):  # a second Ctrl-C, or one before the first step
            raise TrainingInterrupted(self.resume_hint("aborted")) from None
        return False

    def begin_training(self, total_steps: int, trackers: Trackers) -> None:
        """From here on the run trains: status running, progress bar, graceful stop on a signal."""
        self.trackers = trackers
        self.reporter.begin(total_steps)
        self.run.update_manifest(status="running")
        self.graceful = True

    def end_training(self) -> None:
        """The steps are done: a signal from here on aborts the final evaluation at once (resume redoes it)."""
        self.graceful = False

    def resume_hint(self, what: str) -> str:
        if self.fresh and not self._has_results():
            return f"{what} before anything was trained"
        return f"{what}; resume from the last checkpoint with: tunelab train --resume {self.path}"

    def _on_signal(self, signum, _frame) -> None:
        if not self.graceful or self.stop_signal is not None:  # nothing to save yet, or a second Ctrl-C
            raise KeyboardInterrupt
        self.stop_signal = signal.Signals(signum).name
        self.say(f"\n{self.stop_signal} received: finishing the current step, then writing a checkpoint "
                 "(Ctrl-C again to abort)")

    def _has_results(self) -> bool:
        return bool(ckpt.complete_checkpoints(self.path) or (self.path / "checkpoint-final").is_dir()
                    or read_metrics(self.path))


def _outcome(exc: BaseException | None) -> tuple[str, str | None]:
    if exc is None:
        return "finished", None
    if isinstance(exc, (TrainingInterrupted, KeyboardInterrupt)):
        return "interrupted", str(exc) or "interrupted"
    if isinstance(exc, TunelabError):
        return "failed", str(exc)
    return "failed", f"{type(exc).__name__}: {exc}"


def _duration(started: str | None) -> float | None:
    if not started:
        return None
    import datetime as dt

    return round((dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(started)).total_seconds(), 1)


# ---------------------------------------------------------------- opening a run


def open_run(cfg: Config, resume: str | bool | None, main: bool,
             overrides: list[str] | None = None) -> tuple[Config, RunLife, Path | None]:
    """(config, owner of the run folder, checkpoint to resume from): a new run, or an unfinished one."""
    from tunelab.train.distributed import barrier

    if not resume:
        path = Path(cfg.output.dir) / (cfg.output.run_name or default_run_name(cfg))
        if main:
            _create_run_folder(cfg, path)
        barrier()
        return cfg, RunLife(RunDir(path, main), fresh=True, main=main), None
    run_path = find_resume_run(cfg, resume)
    if not (run_path / "config.yaml").is_file():
        raise TunelabError(f"--resume: {run_path} is not a tunelab run folder (no config.yaml)")
    run = RunDir(run_path, main)
    if run_status(run.manifest()) == "finished":
        raise TunelabError(f"--resume: {run_path} already finished; start a new run instead")
    run_cfg, applied = resume_config(run_path, overrides or [])
    if main and applied:
        save_config(run_cfg, run_path / "config.yaml")
    life = RunLife(run, fresh=False, main=main)
    if applied:
        life.say(f"Changed on resume: {', '.join(applied)}")
    points = ckpt.complete_checkpoints(run_path)
    return run_cfg, life, points[-1][1] if points else None


def _create_run_folder(cfg: Config, path: Path) -> None:
    if (path / "manifest.json").exists():
        raise TunelabError(f"run folder {path} already holds a run; use --resume to continue it or pick another "
                           "output.run_name")
    if path.is_dir() and any(path.iterdir()):
        foreign = [p.name for p in path.iterdir() if p.name not in _LEFTOVERS]
        if foreign:
            raise TunelabError(f"{path} exists and is not a tunelab run (it holds {', '.join(sorted(foreign)[:5])}); "
                               "pick another output.run_name or output.dir")
        shutil.rmtree(path)  # the remains of an aborted start: its prepared data must not be reused
    path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, path / "config.yaml")
    RunDir(path).update_manifest(run_name=path.name, status="starting", created_at=now_iso(), pid=os.getpid())


def find_resume_run(cfg: Config, resume: str | bool) -> Path:
    if isinstance(resume, str) and resume not in ("", "latest"):
        return Path(resume)
    if cfg.output.run_name:
        return Path(cfg.output.dir) / cfg.output.run_name
    runs = sorted((p for p in Path(cfg.output.dir).glob("*/manifest.json")), key=lambda p: p.stat().st_mtime)
    unfinished = [p.parent for p in runs if run_status(json.loads(p.read_text())) != "finished"]
    if not unfinished:
        raise TunelabError(f"--resume: no unfinished run in {cfg.output.dir}; pass --resume RUN_DIR")
    return unfinished[-1]


def resume_config(run_path: Path, overrides: list[str]) -> tuple[Config, list[str]]:
    """The run's own config with the command line's safe overrides applied; the others refused by name."""
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    unsafe = [k for k in keys if not any(k == s or (s.endswith(".") and k.startswith(s)) for s in SAFE_ON_RESUME)]
    if unsafe:
        raise TunelabError(
            f"--resume cannot change {', '.join(unsafe)}: the checkpoint's weights, optimiser state, data order and "
            f"schedule were made with the run's own values ({run_path / 'config.yaml'}). Start a new run to change "
            f"them; on resume only these may change: {', '.join(s.rstrip('.') + ('.*' if s.endswith('.') else '') for s in SAFE_ON_RESUME)}")
    cfg = load_config(run_path / "config.yaml", [o for o in overrides if not o.startswith("output.")])
    return cfg, [o for o in overrides if not o.startswith("output.")]
