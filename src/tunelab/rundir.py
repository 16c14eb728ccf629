"""The run folder contract (see docs/architecture.md): creation, manifest, metrics, log.

Every write that another process may read (manifest.json) goes through a temporary file and `os.replace`, so a
kill never leaves a half-written manifest.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from tunelab.config import Config
from tunelab.errors import TunelabError
from tunelab.files import read_json_object

log = logging.getLogger(__name__)

PACKAGES = ("tunelab", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "safetensors")


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: Any) -> None:
    from tunelab.data.prepare import to_json  # a file name that is not UTF-8 (data.train) is escaped, not a crash

    tmp = path.with_name(f".{path.name}.tmp")
    text = to_json(data, indent=2, default=str)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def resume_command(run: Path) -> str:
    """The command that continues `run`, ready to paste into a shell (a path with a space is quoted)."""
    return f"tunelab train --resume {shlex.quote(str(run))}"


def default_run_name(cfg: Config) -> str:
    model = re.sub(r"[^A-Za-z0-9.]+", "-", cfg.model.name.split("/")[-1].split(":")[-1]).strip("-").lower()
    return f"{model}-{cfg.training.method}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def hardware() -> dict[str, Any]:
    import psutil
    import torch

    from tunelab.model.loading import cpu_has_fast_bf16

    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                            "cpu_fast_bf16": cpu_has_fast_bf16(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


STATUSES = ("starting", "running", "finished", "failed", "interrupted")
_OLD_STATUSES = {"completed": "finished", "diverged": "failed"}  # written by tunelab before the run lifecycle
LIVE_STATUSES = ("starting", "running")


def run_status(manifest: dict[str, Any]) -> str:
    """The run's status in today's words (runs made by older versions said completed / diverged)."""
    status = str(manifest.get("status") or "unknown")  # str: a hand-edited list or number is not a dict key
    return _OLD_STATUSES.get(status, status)


def live_status(manifest: dict[str, Any], job: dict[str, Any] | None = None) -> tuple[str, str]:
    """(status shown, note), as `tunelab runs` and the web UI show a run: today's words (run_status); a live status
    whose process is gone (killed, machine restarted) is `stale`, as only a resume continues it. `job`: the web UI's
    record of the command it started for the run (pid, returncode), asked when the manifest names no usable pid."""
    raw, status, note = str(manifest.get("status") or "unknown"), run_status(manifest), ""
    if status in LIVE_STATUSES:
        alive = pid_alive(manifest.get("pid"), manifest.get("pid_started"))
        if alive is None and job is not None:
            alive = job.get("returncode") is None and pid_alive(job.get("pid")) is not False
        if alive is False:
            return "stale", f"manifest says {raw} but its process is gone (killed?); resume it to continue"
    elif status not in STATUSES:
        note = f"status {raw!r} is not one this version knows"
        status = "unknown"
    if status == "failed" and manifest.get("error"):
        note = str(manifest["error"])
    return status, note


def pid_alive(pid: Any, started: Any = None) -> bool | None:
    """Is the process a manifest records (`pid`) alive on this machine? None when `pid` is not a usable process id.
    `started`: the start time recorded with it (`process_started`); a live process that started at another time holds
    a reused pid (the recorded one ended, e.g. killed, machine restarted): not the one recorded, so False."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    except OSError:
        return None
    now = process_started(pid) if isinstance(started, (int, float)) else None
    return now is None or abs(now - started) < 1.0


def process_started(pid: int | None = None) -> float | None:
    """When the process (default: this one) started, in seconds since the epoch; None when it cannot be read."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError, ValueError):
        return None


def owner() -> dict[str, Any]:
    """The manifest fields that name the process working on a run: its pid and when it started (see pid_alive)."""
    return {"pid": os.getpid(), "pid_started": process_started()}


class RunDir:
    """A run folder: config.yaml, manifest.json, metrics.jsonl, train.log, checkpoints."""

    def __init__(self, path: Path, main_process: bool = True):
        self.path = Path(path)
        self.main = main_process
        self._written: dict[str, Any] | None = None  # the manifest as this object last wrote it

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def manifest(self) -> dict[str, Any]:
        """manifest.json ({} before it is written); a damaged one is an error that names it and what to do, except
        in the process writing the run: it goes on from what it wrote last, so that a file damaged under a run
        (a hand edit, a full disk) never stops it from recording its steps and how it ended."""
        if not self.manifest_path.is_file():
            return {}
        try:
            return read_json_object(self.manifest_path)
        except TunelabError as e:
            if self._written is None:
                raise TunelabError(
                    f"{e}\nThe run's record is damaged: restore the file from a copy, or train the run anew "
                    f"(tunelab train --config {self.path / 'config.yaml'} output.run_name=NEW_NAME)") from None
            log.warning("%s; it is written again from what this run recorded", e)
            return dict(self._written)

    def update_manifest(self, **fields: Any) -> None:
        if not self.main:
            return
        data = self.manifest()
        data.update(fields)
        write_json_atomic(self.manifest_path, data)
        self._written = data

    def log_metrics(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, after_step: int) -> None:
        """On resume: drop metric lines logged after the checkpoint we continue from (they will be redone)."""
        path = self.path / "metrics.jsonl"
        if not self.main or not path.is_file():
            return
        keep = [r for r in _parse_lines(path) if _step(r) <= after_step and not r.get("final")]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, path)


def _step(record: dict[str, Any]) -> float:
    """The step a metric line was logged at (0 when it names none); a hand-edited step that is not a number sorts
    after every step, so a resume drops that line rather than fail on it."""
    step = record.get("step", 0)
    return step if isinstance(step, (int, float)) else float("inf")


_warned: set[tuple[str, int]] = set()  # (file, lines skipped) already reported: a report reads its file twice


def _parse_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file. An unterminated last line is one torn by a kill in the middle of an
    append (or still being written): left out quietly. Any other line that is not a JSON object in UTF-8 (a hand
    edit, a damaged disk) is left out too, with one warning that counts them."""
    data = path.read_bytes()
    lines = data.splitlines()
    torn = lines.pop() if lines and not data.endswith((b"\n", b"\r")) else None
    out = [r for r in map(_record, lines) if r is not None]
    bad = sum(1 for line in lines if line.strip()) - len(out)
    if torn is not None and (last := _record(torn)) is not None:  # killed after the object, before its newline
        out.append(last)
    if bad and (str(path), bad) not in _warned:
        _warned.add((str(path), bad))
        log.warning("%s: %d line%s skipped, not a JSON object in UTF-8 (edited or damaged); the other %d are read",
                    path, bad, "s" * (bad != 1), len(out))
    return out


def _record(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError is one
        return None
    return record if isinstance(record, dict) else None


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, in the order logged ([] before the first)."""
    path = Path(run) / "metrics.jsonl"
    return _parse_lines(path) if path.is_file() else []
