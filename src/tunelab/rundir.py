"""The run folder contract (see docs/architecture.md): creation, manifest, metrics, log.

Every write that another process may read (manifest.json) goes through a temporary file and `os.replace`, so a
kill never leaves a half-written manifest.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from tunelab.config import Config

PACKAGES = ("tunelab", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "safetensors")


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def run_status(manifest: dict[str, Any]) -> str:
    """The run's status in today's words (runs made by older versions said completed / diverged)."""
    status = manifest.get("status") or "unknown"
    return _OLD_STATUSES.get(status, status)


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

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text()) if self.manifest_path.is_file() else {}

    def update_manifest(self, **fields: Any) -> None:
        if not self.main:
            return
        data = self.manifest()
        data.update(fields)
        write_json_atomic(self.manifest_path, data)

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
        keep = [r for r in _parse_lines(path) if r.get("step", 0) <= after_step and not r.get("final")]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, path)


def _parse_lines(path: Path) -> list[dict[str, Any]]:
    """JSON lines, skipping a line torn by a kill in the middle of an append."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def read_metrics(run: Path) -> list[dict[str, Any]]:
    path = Path(run) / "metrics.jsonl"
    return _parse_lines(path) if path.is_file() else []
