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
import shlex
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tunelab.config import Config, load_run_config, save_config
from tunelab.errors import TunelabError
from tunelab.files import read_json_object
from tunelab.train import checkpoint as ckpt
from tunelab.train.monitor import Reporter, Trackers
from tunelab.rundir import (RunDir, default_run_name, now_iso, owner, pid_alive, read_metrics, resume_command,
                            run_status)

# Settings a resumed run may change: they decide what is logged, evaluated and kept, not what is trained.
SAFE_ON_RESUME = ("training.logging_steps", "training.eval_steps", "training.save_steps", "training.save_total_limit",
                  "training.early_stopping_patience", "training.nan_guard", "training.num_workers", "eval.",
                  "tracking.", "output.")


LOCK_NAME = ".run.lock"  # the run folder's lock file (see RunLife._claim_folder)


def _stop_signals() -> list[signal.Signals]:
    """The signals that stop a run cleanly: Ctrl-C, `kill`, and the terminal or ssh session closing (SIGHUP),
    unless the run was started to ignore hang-ups (`nohup`)."""
    hup = getattr(signal, "SIGHUP", None)  # not on Windows
    keep_hup = hup is not None and signal.getsignal(hup) is not signal.SIG_IGN
    return [signal.SIGINT, signal.SIGTERM] + ([hup] if keep_hup else [])


class TrainingInterrupted(TunelabError):
    exit_code = 130


class TrainingDiverged(TunelabError):
    exit_code = 3


class OptionalWorkStopped(Exception):
    """A signal during work the run can do without (generation metrics after checkpoint-final is saved)."""


class RunLife:
    """The run folder's owner: status, error, log, trackers and signal handlers (see the module docstring)."""

    def __init__(self, run: RunDir, *, fresh: bool, main: bool, cfg: Config | None = None):
        self.run, self.fresh, self.main, self.cfg = run, fresh, main, cfg
        self.reporter = Reporter(None, 0, enabled=main)  # the log is attached once the folder is ours
        self.trackers: Trackers | None = None
        self.stop_signal: str | None = None
        # setup: a signal aborts; steps: it checkpoints and stops; finish: it is noted; optional: it stops that work
        self.mode = "setup"
        self.global_step = 0
        self._notes: list[str] = []
        self.unsaved_overrides: list[str] = []  # resume overrides, saved into config.yaml once training begins
        self._old_handlers: dict[int, Any] = {}
        self._lock = None  # the run folder's OS lock (filelock), held by the main process while the run lives

    @property
    def path(self) -> Path:
        return self.run.path

    def say(self, text: str = "") -> None:
        self.reporter.line(text)

    def say_on_enter(self, text: str) -> None:
        """Said (and written to train.log) once the run folder is ours: what opening the run found."""
        self._notes.append(text)

    # ---- the context

    def __enter__(self) -> "RunLife":
        from tunelab.train.distributed import main_process_work

        self._old_handlers = {s: signal.signal(s, self._on_signal) for s in _stop_signals()}
        try:  # the folder is made only once the handlers are ours: no window for an orphan
            with main_process_work():
                if self.main:
                    self._claim_folder()
        except BaseException:
            self._release()
            raise
        if self.main:
            self.reporter.attach_log(self.path / "train.log")
        for note in self._notes:
            self.say(note)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        status, error = _outcome(exc)
        for s in self._old_handlers:  # the run's end is written whatever arrives now
            signal.signal(s, signal.SIG_IGN)
        try:
            self._record_end(status, error, exc)
        except Exception as e:  # noqa: BLE001 - a full disk, a damaged manifest: the run's own error must show
            print(f"warning: could not record the run's end ({status}) in {self.run.manifest_path}: "
                  f"{getattr(e, 'strerror', None) or e}", file=sys.stderr)
        finally:
            self._close_quietly(status, error)
            self._release()
        if isinstance(exc, KeyboardInterrupt):  # a second Ctrl-C, or one before the first step
            raise TrainingInterrupted(self.resume_hint("aborted")) from None
        return False

    def _record_end(self, status: str, error: str | None, exc: BaseException | None) -> None:
        if not self.main:
            return
        if status != "finished" and self.fresh and not self._has_results():
            shutil.rmtree(self.path, ignore_errors=True)  # nothing useful: no orphan folder, no stale data
            print(f"(nothing was trained; {self.path} was removed)", file=sys.stderr)
            return
        failure = None if status != "failed" else "diverged" if isinstance(exc, TrainingDiverged) else "error"
        self.run.update_manifest(status=status, error=error, failure=failure, ended_at=now_iso(),
                                 global_step=self.global_step,
                                 duration_s=_duration(self.run.manifest().get("started_at")))

    def _close_quietly(self, status: str, error: str | None) -> None:
        """Trackers and log closed best-effort: an unreachable MLflow server must not hide the run's own end."""
        if self.trackers is not None:
            try:
                self.trackers.close({"finished": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED"))
            except Exception as e:  # noqa: BLE001 - reported, never raised over the run's own outcome
                print(f"warning: closing the trackers failed: {type(e).__name__}: {e}", file=sys.stderr)
        if error and self.path.is_dir():  # the caller (the CLI) shows the message; the log keeps it beside the run
            self.reporter.log_only(f"{'error' if status == 'failed' else 'stopped'}: {error}")
        self.reporter.close()

    def _claim_folder(self) -> None:
        """Make (fresh) or take (resumed) the run folder, holding its lock until the run ends: a second process
        on the same folder (two `--resume` at once, two fresh runs given one name) is refused, not mixed in."""
        if self.fresh:
            self.run.path = _create_run_folder(self.cfg, self.path, self._lock_folder)
        else:  # locked by open_run
            self.run.update_manifest(status="starting", **owner())

    def _lock_folder(self, path: Path) -> None:
        from filelock import FileLock, Timeout

        lock = FileLock(path / LOCK_NAME, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise TunelabError(f"{path} is being trained right now by another process; wait for it to end or stop it "
                               "(Ctrl-C where it runs: it saves a checkpoint), then resume") from None
        self._lock = lock

    def _release(self) -> None:
        """The signal handlers back to what they were, and the folder's lock freed."""
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        self._old_handlers = {}
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def begin_training(self, total_steps: int, start_step: int) -> None:
        """From here on the run trains: trackers started, status running, progress bar, graceful stop on a signal.

        A resumed run continues the MLflow / W&B runs its manifest names (also one resumed from step 0), and its
        trackers drop what was logged after `start_step` before the interruption, since it is logged again.
        Resume overrides are saved only now, once setup (the trackers' stores among it) has worked with them: a
        wrong tracking.mlflow_tracking_uri must not stay in config.yaml and break every later plain --resume."""
        t_cfg = self.cfg.tracking
        self.trackers = Trackers(t_cfg.report_to, self.path, self.path.name, t_cfg.project, self.cfg.to_dict(),
                                 t_cfg.mlflow_tracking_uri, enabled=self.main,
                                 run_ids=self.run.manifest().get("tracking"),
                                 resumed_at=None if self.fresh else start_step, say=self.say)
        self.run.update_manifest(tracking=self.trackers.run_ids)
        if self.unsaved_overrides and self.main:
            save_config(self.cfg, self.path / "config.yaml")
            self.unsaved_overrides = []
        self.reporter.begin(total_steps)
        self.run.update_manifest(status="running")
        self.mode = "steps"

    def end_training(self) -> None:
        """The steps are done: a first signal now only says the final evaluation and checkpoint are being made."""
        self.mode = "finish"

    @contextmanager
    def optional_work(self) -> Iterator[None]:
        """Work after checkpoint-final that a signal skips (raising OptionalWorkStopped in it) instead of aborting
        the run: a Ctrl-C during the generation metrics leaves a finished run without them."""
        self.mode = "optional"
        try:
            yield
        finally:
            self.mode = "finish"

    def announce_stop(self) -> None:
        """Said from the loop, not from the signal handler (a handler must not write to a file it may interrupt)."""
        what = ("finishing the current step, then writing a checkpoint" if self.mode == "steps" else
                "the steps are done: finishing the final evaluation and checkpoint-final")
        self.say(f"\n{self.stop_signal} received: {what} (Ctrl-C again to abort)")

    def resume_hint(self, what: str) -> str:
        if self.fresh and not self._has_results():
            return f"{what} before anything was trained"
        if not (ckpt.complete_checkpoints(self.path) or (self.path / "checkpoint-final").is_dir()):
            return f"{what} before the first checkpoint; start it again from step 0 with: {resume_command(self.path)}"
        return f"{what}; resume from the last checkpoint with: {resume_command(self.path)}"

    def _on_signal(self, signum, _frame) -> None:
        if self.mode == "setup" or self.stop_signal is not None:  # nothing to save yet, or a second Ctrl-C
            raise KeyboardInterrupt
        self.stop_signal = signal.Signals(signum).name
        if self.mode == "optional":
            raise OptionalWorkStopped

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
    if not resume:
        path = Path(cfg.output.dir) / (cfg.output.run_name or default_run_name(cfg))
        return cfg, RunLife(RunDir(path, main), fresh=True, main=main, cfg=cfg), None  # made on entering
    run_path = find_resume_run(cfg, resume)
    if not (run_path / "config.yaml").is_file():
        raise TunelabError(f"--resume: {run_path} is not a tunelab run folder (no config.yaml)")
    life = RunLife(RunDir(run_path, main), fresh=False, main=main)
    if main:  # held from here: two resumes at once would both pick (and set aside) checkpoints, then both train
        life._lock_folder(run_path)
    try:
        return _resumed(life, overrides or [])
    except BaseException:
        life._release()
        raise


def _resumed(life: RunLife, overrides: list[str]) -> tuple[Config, RunLife, Path | None]:
    manifest = life.run.manifest()
    if run_status(manifest) == "finished":
        raise TunelabError(f"--resume: {life.path} already finished; start a new run instead")
    if _live(manifest):  # two processes writing one folder would mix their steps and checkpoints
        raise TunelabError(f"--resume: {life.path} is being trained right now by process {manifest['pid']}; stop it "
                           f"first (Ctrl-C where it runs, or kill -INT {manifest['pid']}: it saves a checkpoint), "
                           "then resume")
    life.cfg, applied = resume_config(life.path, overrides)
    life.unsaved_overrides = applied
    if applied:
        life.say_on_enter(f"Changed on resume: {', '.join(applied)}")
    return life.cfg, life, ckpt.newest_sound_checkpoint(life.path, life.say_on_enter, set_aside=life.main)


def _create_run_folder(cfg: Config, path: Path, lock) -> Path:
    """Make and lock the folder of a fresh run, then write its config and manifest; returns the folder. A default
    name taken meanwhile (two runs started in the same second) moves on to `<name>-2`; on a failure (a full disk)
    nothing of it is left to block the next attempt."""
    made = _make_folder(path, unique=not cfg.output.run_name)
    path = made or path
    done = []  # how far the start got: what a failure has to undo
    try:
        lock(path)
        done.append("locked")
        _refuse_taken(path)
        done.append("writing")
        save_config(cfg, path / "config.yaml")
        RunDir(path).update_manifest(run_name=path.name, status="starting", created_at=now_iso(), **owner())
    except BaseException as e:
        _unmake(path, made is not None, done)
        if isinstance(e, OSError):
            raise TunelabError(f"cannot start the run in {path}: {e.strerror or e} (free some space, or pick "
                               "another output.dir)") from None
        raise
    return path


def _make_folder(path: Path, unique: bool) -> Path | None:
    """`path` (or, when `unique`, the first free `<path>-N`), made now; None when it existed already (a folder of
    the user's, or a run: `_refuse_taken` tells which)."""
    for n in range(1, 1000):
        candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            if not unique:
                return None
        except OSError as e:  # e.g. output.dir names a file, a read-only or full disk
            raise TunelabError(f"cannot make the run folder {candidate}: {e.strerror or e} (check output.dir)") \
                from None
    raise TunelabError(f"no free run name next to {path}; pick one with output.run_name")


def _refuse_taken(path: Path) -> None:
    if not path.is_dir():
        raise TunelabError(f"cannot make the run folder {path}: a file of that name exists (check output.dir)")
    if (path / "manifest.json").exists():
        raise TunelabError(f"run folder {path} already holds a run; use --resume to continue it or pick another "
                           "output.run_name")
    if any(p.name != LOCK_NAME for p in path.iterdir()):  # never ours (tunelab removes what a failed start made)
        raise TunelabError(f"{path} exists and holds no tunelab run (e.g. files of your own, or what an older "
                           "tunelab left after a failed start); pick another output.run_name, or remove the folder "
                           f"if it is not needed: rm -r {shlex.quote(str(path))}")


def _unmake(path: Path, made: bool, done: list[str]) -> None:
    """Undo a fresh start that failed: the folder if this run made it, else only what it wrote in it (and the lock
    file it made in a folder of the user's)."""
    if made:
        shutil.rmtree(path, ignore_errors=True)
        return
    for name in ("config.yaml", "manifest.json", ".manifest.json.tmp") if "writing" in done else ():
        (path / name).unlink(missing_ok=True)
    if "locked" in done and not (path / "manifest.json").exists():
        (path / LOCK_NAME).unlink(missing_ok=True)


def find_resume_run(cfg: Config, resume: str | bool) -> Path:
    if isinstance(resume, str) and resume not in ("", "latest"):
        return Path(resume)
    if cfg.output.run_name:
        return Path(cfg.output.dir) / cfg.output.run_name
    candidates = []
    for p in Path(cfg.output.dir).glob("*/manifest.json"):
        try:
            manifest = read_json_object(p)
        except TunelabError:
            continue  # a torn or foreign manifest is not a run to resume
        if run_status(manifest) != "finished" and not _live(manifest):
            candidates.append((p.stat().st_mtime, p.parent))
    if not candidates:
        raise TunelabError(f"--resume: no unfinished run in {cfg.output.dir} that is not running now; pass "
                           "--resume RUN_DIR")
    return max(candidates)[1]


def _live(manifest: dict[str, Any]) -> bool:
    """A run another process on this machine is training right now (its recorded pid is alive)."""
    pid = manifest.get("pid")
    return (run_status(manifest) in ("starting", "running") and pid != os.getpid()
            and bool(pid_alive(pid, manifest.get("pid_started"))))


def resume_config(run_path: Path, overrides: list[str]) -> tuple[Config, list[str]]:
    """The run's own config with the command line's safe overrides applied; the others refused by name.

    An override that repeats the run's own value changes nothing and is accepted (e.g. the same command again)."""
    own = load_run_config(run_path / "config.yaml")
    changing = [o for o in overrides if not o.startswith("output.")
                and load_run_config(run_path / "config.yaml", [o]).to_dict() != own.to_dict()]
    unsafe = _unsafe_on_resume([o.split("=", 1)[0].strip() for o in changing])
    if unsafe:
        raise TunelabError(
            f"--resume cannot change {', '.join(unsafe)}: the checkpoint's weights, optimiser state, data order and "
            f"schedule were made with the run's own values ({run_path / 'config.yaml'}). Start a new run to change "
            f"them; on resume only these may change: {', '.join(s.rstrip('.') + ('.*' if s.endswith('.') else '') for s in SAFE_ON_RESUME)}")
    return (load_run_config(run_path / "config.yaml", changing) if changing else own), changing


def _unsafe_on_resume(keys: list[str]) -> list[str]:
    return [k for k in keys if not any(k == s or (s.endswith(".") and k.startswith(s)) for s in SAFE_ON_RESUME)]


def config_file_overrides(cfg: Config, config_file: str, resume: str | bool, overrides: list[str]) -> list[str]:
    """`--config FILE --resume`: the settings where FILE (`cfg`: FILE + `overrides`) differs from the run's own
    config.yaml, as overrides (the resume applies them: only safe ones remain) beside the command line's own. A
    difference that would change what is trained is refused naming FILE, instead of being dropped without a word
    (the run's own config rules a resumed run)."""
    from tunelab.runs import flatten

    run_path = find_resume_run(cfg, resume)
    if not (run_path / "config.yaml").is_file():
        return []  # open_run says what is wrong with the folder
    own = flatten(load_run_config(run_path / "config.yaml").to_dict())
    given = flatten(cfg.to_dict())
    named = {o.split("=", 1)[0].strip() for o in overrides}  # the command line's: resume_config judges them
    changed = {k: v for k, v in given.items()
               if k in own and own[k] != v and k not in named and not k.startswith("output.")}
    unsafe = _unsafe_on_resume(list(changed))
    if unsafe:
        shown = "; ".join(f"{k}: {json.dumps(changed[k])} there, {json.dumps(own[k])} in the run" for k in unsafe)
        raise TunelabError(
            f"--resume with --config {config_file}: the file would change what the run trains ({shown}). A resumed "
            f"run keeps its own settings ({run_path / 'config.yaml'}): resume without --config, or start a new run "
            "to train with the file's")
    return [f"{k}={json.dumps(v)}" for k, v in changed.items()]
