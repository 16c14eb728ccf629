"""Commands the UI launches: each one an ordinary `tunelab ...` command line, shown, saved and run in its own process.

    jobs = Jobs(Path("outputs/.ui/jobs"), workdir=Path.cwd())
    job = jobs.start(["train", "--config", "configs/a.yaml"], kind="train", run="a")
    jobs.stop(job["id"])            # SIGINT, the same as Ctrl-C: the run checkpoints and prints its resume command

A job is `<state_dir>/<id>.json` (the command, pid, times, exit code) plus `<id>.log` (everything it printed).
The process runs in its own session, so closing the browser or stopping the UI server does not stop it, and a
restarted server finds its jobs again from those files.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.rundir import LIVE_STATUSES, pid_alive, process_started, run_status, write_json_atomic


class JobError(TunelabError):
    """A job that cannot be started or stopped."""


class NoJob(JobError):
    """A job id this UI has no record of (HTTP 404)."""


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def display_command(args: list[str]) -> str:
    """What a person would type: `tunelab train --config configs/a.yaml`."""
    return "tunelab " + shlex.join(args)


class Jobs:
    def __init__(self, state_dir: Path, workdir: Path, runs_root: Path | None = None):
        self.dir = Path(state_dir)
        self.workdir = Path(workdir)
        self.runs_root = runs_root  # the runs folder (output.dir): whose manifests say which runs still train
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._interrupted: dict[tuple[int, float | None], str] = {}  # processes interrupted by interrupt(): when

    def _path(self, job_id: str) -> Path:
        if not job_id.isalnum():
            raise NoJob(f"no job {job_id!r}")
        return self.dir / f"{job_id}.json"

    def start(self, args: list[str], kind: str, run: str | None = None, outputs: list[str] | None = None) -> dict:
        """Run `tunelab ARGS` in the working folder (python -m tunelab: the same install as this server). A train
        job for a run that one of this UI's train jobs is training now is refused (a double click on Start or
        Resume would start a second process on the same run folder, which its lock then fails)."""
        with self._start_lock:  # the check and the start as one step: two requests at once start one job
            busy = self.training(run) if kind == "train" and run is not None else None
            if busy:
                raise JobError(f"{run} is being trained right now by job {busy['id']} ({busy['command']}); stop it "
                               "or wait for it to end")
            return self._start(args, kind, run, outputs)

    def training(self, run: str) -> dict[str, Any] | None:
        """This UI's train job that trains `run` now: running, unless the run's manifest says that process ended
        the run (a stopped run's process still exiting; resuming it now is fine: its lock is already free)."""
        from tunelab.runs import read_manifest

        try:
            manifest = read_manifest(self.runs_root / run) if self.runs_root else {}
        except TunelabError:  # no manifest yet (a new run still starting) or a damaged one
            manifest = {}
        for j in self.for_run(run):
            ended = manifest.get("pid") == j["pid"] and run_status(manifest) not in LIVE_STATUSES
            if j.get("kind") == "train" and j["state"] == "running" and not ended:
                return j
        return None

    def _start(self, args: list[str], kind: str, run: str | None, outputs: list[str] | None) -> dict:
        self.dir.mkdir(parents=True, exist_ok=True)
        job_id = dt.datetime.now().strftime("%Y%m%d%H%M%S") + uuid.uuid4().hex[:6]
        log = self.dir / f"{job_id}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1", TUNELAB_UI_JOB=job_id)
        with open(log, "wb") as out:
            # own session: not killed with the server, and SIGINT to the group reaches torchrun's workers too
            proc = subprocess.Popen([sys.executable, "-m", "tunelab", *args], cwd=self.workdir, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        record = {"id": job_id, "kind": kind, "run": run, "args": args, "command": display_command(args),
                  "cwd": str(self.workdir), "pid": proc.pid, "pid_started": process_started(proc.pid),
                  "started_at": now_iso(), "ended_at": None,
                  "returncode": None, "outputs": outputs or [], "log": log.name}
        write_json_atomic(self._path(job_id), record)
        with self._lock:
            self._procs[job_id] = proc
        threading.Thread(target=self._wait, args=(job_id, proc), daemon=True).start()
        return record

    def _wait(self, job_id: str, proc: subprocess.Popen) -> None:
        code = proc.wait()
        with self._lock:  # one read-modify-write of the record at a time (stop() writes it too)
            record = self.get(job_id)
            record.update(returncode=code, ended_at=now_iso())
            write_json_atomic(self._path(job_id), record)
            self._procs.pop(job_id, None)

    def get(self, job_id: str) -> dict[str, Any]:
        path = self._path(job_id)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise NoJob(f"no job {job_id!r}") from None
        return self._with_liveness(record)

    def _with_liveness(self, record: dict[str, Any]) -> dict[str, Any]:
        # a job started by an earlier server: its exit code is unknown, but whether it still runs is not
        if record.get("returncode") is None and record["id"] not in self._procs \
                and pid_alive(record["pid"], record.get("pid_started")) is False:
            record["state"] = "ended"
        else:
            record["state"] = "running" if record.get("returncode") is None else "ended"
        return record

    def all(self) -> list[dict[str, Any]]:
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.glob("*.json"):
            try:
                out.append(self._with_liveness(json.loads(p.read_text(encoding="utf-8"))))
            except (OSError, ValueError, KeyError):
                continue
        return sorted(out, key=lambda r: r["id"], reverse=True)

    def for_run(self, run: str) -> list[dict[str, Any]]:
        return [j for j in self.all() if j.get("run") == run]

    def latest_by_run(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for j in self.all():  # newest first
            if j.get("run") and j.get("kind") == "train":
                out.setdefault(j["run"], j)
        return out

    def log(self, job_id: str, max_bytes: int = 20000) -> str:
        from tunelab.ui.views import tail

        self._path(job_id)
        return tail(self.dir / f"{job_id}.log", max_bytes)

    def stop(self, job_id: str) -> dict[str, Any]:
        """SIGINT to the job's process group: what Ctrl-C in its terminal would do. Once: a second Ctrl-C aborts
        a run without the checkpoint the first one asked for, so Stop pressed again is refused."""
        with self._lock:
            record = self.get(job_id)
            if record["state"] != "running":
                raise JobError(f"job {job_id} is not running")
            if record.get("stop_sent_at"):
                raise JobError(ALREADY_STOPPING.format(what=f"job {job_id}", since=record["stop_sent_at"]))
            send_sigint(record["pid"])
            record["stop_sent_at"] = now_iso()
            write_json_atomic(self._path(job_id), record)
        return record

    def interrupt(self, pid: int, started: float | None, what: str) -> None:
        """SIGINT to a training process this UI did not start (recorded in a run's manifest), once, as stop()."""
        with self._lock:
            if (pid, started) in self._interrupted:
                raise JobError(ALREADY_STOPPING.format(what=what, since=self._interrupted[(pid, started)]))
            try:
                os.kill(pid, signal.SIGINT)
            except OSError as e:  # another user's process, or gone since
                raise JobError(f"cannot stop process {pid} of {what}: {e.strerror or e}; press Ctrl-C where it "
                               "runs") from None
            self._interrupted[(pid, started)] = now_iso()


ALREADY_STOPPING = ("{what} is already stopping (asked at {since}): it finishes its step and writes a checkpoint "
                    "first. A second Ctrl-C would abort it without that checkpoint; to do that, press Ctrl-C where "
                    "it runs")


def send_sigint(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGINT)
    except ProcessLookupError:
        raise JobError(f"process {pid} is gone") from None
    except PermissionError:
        os.kill(pid, signal.SIGINT)
