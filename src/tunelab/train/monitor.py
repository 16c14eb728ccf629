"""What a person sees while training: the brief's step lines, a live progress bar, train.log and trackers.

    Epoch 1/3:
      Step 100/500 | Loss: 2.345 | LR: 2e-4 | Time: 0:01:23 | ETA: 0:05:12 | 812 tok/s | RSS 1.2 GiB
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tunelab.errors import TunelabError


def hms(seconds: float) -> str:
    return str(dt.timedelta(seconds=int(max(seconds, 0))))


def fmt_lr(lr: float) -> str:
    """The brief's form: 2e-4, 1.8e-4, 1.57e-4 (three significant digits at most); 0 as 0."""
    if lr == 0 or not math.isfinite(lr) or abs(lr) >= 0.1:
        return f"{lr:.3g}"
    mantissa, exponent = f"{lr:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def rss_gib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


class Reporter:
    """Prints to the terminal (with a rich progress bar when it is one) and appends everything to train.log."""

    def __init__(self, log_path: Path | None, total_steps: int, enabled: bool = True):
        self.enabled = enabled
        self.log = open(log_path, "a", encoding="utf-8") if (log_path and enabled) else None
        self.total = total_steps
        self.start = time.time()
        self.progress = None
        self.task = None
        self.terminal = True  # False once writing to it failed

    def begin(self, total_steps: int) -> None:
        """Training starts: the clock (not counting loading) and, on a terminal, the live progress bar."""
        self.total = total_steps
        self.start = time.time()
        if self.enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                     TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                     TextColumn("{task.fields[info]}"), transient=True)
            self.task = self.progress.add_task("train", total=total_steps, info="")
            self.progress.start()

    def close(self) -> None:
        if self.progress:
            self._to_terminal(self.progress.stop)
            self.progress = None
        if self.log:
            self.log.close()
            self.log = None

    def line(self, text: str = "") -> None:
        if not self.enabled:
            return
        if self.progress:
            self._to_terminal(lambda: self.progress.console.print(text, markup=False, highlight=False))
        else:
            self._to_terminal(lambda: print(text, flush=True))
        if self.log:
            self.log.write(text + "\n")
            self.log.flush()

    def _to_terminal(self, write: Callable[[], Any]) -> None:
        """A terminal that went away (ssh dropped: SIGHUP, then EIO on every write) must not fail the run's
        checkpoint and end: the terminal is dropped, train.log keeps every line."""
        if self.terminal:
            try:
                write()
            except OSError:
                self.terminal = False

    def attach_log(self, log_path: Path) -> None:
        """Append to `log_path` from now on (a run folder's train.log, once the folder exists)."""
        if self.enabled and self.log is None:
            self.log = open(log_path, "a", encoding="utf-8")

    def log_only(self, text: str) -> None:
        if self.log:
            self.log.write(text + "\n")
            self.log.flush()

    def advance(self, step: int, info: str) -> None:
        if self.progress:
            self.progress.update(self.task, completed=step, info=info)

    def step_line(self, step: int, loss: float, lr: float, tokens_per_s: float, start_step: int) -> str:
        elapsed = time.time() - self.start
        done = max(step - start_step, 1)
        eta = elapsed / done * (self.total - step)
        return (f"  Step {step}/{self.total} | Loss: {loss:.3f} | LR: {fmt_lr(lr)} | Time: {hms(elapsed)} | "
                f"ETA: {hms(eta)} | {tokens_per_s:.0f} tok/s | RSS {rss_gib():.1f} GiB")


class Trackers:
    """TensorBoard (default), MLflow and Weights & Biases behind one small interface; main process only.

    Metric names: TensorBoard groups them as train/<name>, eval/<name> and final/<name>; MLflow and W&B get the
    names as logged (loss, lr, eval_loss, final/perplexity, ...). `run_ids` (from a previous `.run_ids`, kept in
    the run's manifest) continues the same MLflow / W&B run when a training run is resumed. `resumed_at`, the
    step a resumed run continues from: the steps after it, logged before the interruption, are logged again, so
    TensorBoard hides the old points (purge_step) and MLflow skips a metric's step it already holds (it cannot
    delete points; resumed runs train the same values). W&B itself ignores steps below its last one.
    """

    def __init__(self, names: list[str], run_dir: Path, run_name: str, project: str, config: dict[str, Any],
                 mlflow_uri: str | None = None, enabled: bool = True, run_ids: dict[str, str] | None = None,
                 resumed_at: int | None = None, say: Callable[[str], None] = print):
        self.tb = self.mlflow = self.wandb = None
        self.run_ids: dict[str, str] = {}
        if not enabled:
            return
        names = [n for n in names if n != "none"]
        run_ids = run_ids or {}
        try:
            if "tensorboard" in names:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                        purge_step=None if resumed_at is None else resumed_at + 1)
            if "mlflow" in names:
                self.mlflow = _MlflowRun(mlflow_uri, Path(run_dir).parent / "mlruns", project, run_name, config,
                                         run_ids.get("mlflow"), resumed_at or 0, say)
                self.run_ids["mlflow"] = self.mlflow.run_id
            if "wandb" in names:
                try:
                    import wandb
                except ImportError:
                    raise TunelabError("tracking.report_to includes wandb: pip install 'tunelab[wandb]' "
                                       "(or remove wandb from tracking.report_to)") from None
                self.wandb = wandb.init(project=project, name=run_name, config=config, dir=str(run_dir),
                                        id=run_ids.get("wandb"), resume="allow" if run_ids.get("wandb") else None)
                self.run_ids["wandb"] = self.wandb.id
        except BaseException:
            self.close("FAILED")
            raise

    def log(self, metrics: dict[str, Any], step: int) -> None:
        scalars = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(_tb_tag(k), v, step)
        if self.mlflow:
            self.mlflow.log(scalars, step)
        if self.wandb:
            self.wandb.log(scalars, step=step)

    def close(self, status: str = "FINISHED") -> None:
        """`status`: FINISHED, FAILED or KILLED (MLflow's run states; W&B gets exit code 0 or 1)."""
        if self.tb:
            self.tb.close()
            self.tb = None
        if self.mlflow:
            self.mlflow.close(status)
            self.mlflow = None
        if self.wandb:
            self.wandb.finish(exit_code=0 if status == "FINISHED" else 1)
            self.wandb = None


def _tb_tag(key: str) -> str:
    """TensorBoard's section/name: loss -> train/loss, eval_loss -> eval/loss, rewards/margin ->
    train/rewards/margin, eval_rewards/margin -> eval/rewards/margin; final/... stays."""
    if key.startswith("final/"):
        return key
    return "eval/" + key[5:] if key.startswith("eval_") else "train/" + key


class _MlflowRun:
    """One MLflow run through an explicit `MlflowClient`: no process-global tracking URI or active run, so
    several runs in one process (tests, sweeps) never log into each other. MLflow is optional work: a store that
    fails during training (a server gone) is said once and logging to it stops, after a bounded wait; the
    training and its metrics.jsonl go on."""

    def __init__(self, uri: str | None, default_dir: Path, project: str, run_name: str, config: dict[str, Any],
                 run_id: str | None = None, resumed_at: int = 0, say: Callable[[str], None] = print):
        try:
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise TunelabError("tracking.report_to includes mlflow: pip install 'tunelab[mlflow]' "
                               "(or remove mlflow from tracking.report_to)") from None
        # Without a URI, keep the runs next to the run folders rather than MLflow's default sqlite:///mlflow.db in
        # the working directory (which needs SQLAlchemy, absent from mlflow-skinny).
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_dir.resolve().as_uri()
        if _is_file_store(uri):
            # MLflow 3 refuses its file store unless asked; a local file store is what tracking.mlflow_tracking_uri
            # documents (file:./mlruns), so ask for it.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri, self.say, self.failed = uri, say, False
        self.logged: set[tuple[str, int]] = set()  # (metric, step) a resumed run already holds past resumed_at
        try:
            self.client = MlflowClient(tracking_uri=uri)
            if urlparse(uri).scheme in ("http", "https"):
                say(f"connecting to MLflow at {uri}")
                self._first_contact()
            if run_id:  # a resumed training run continues its MLflow run
                self.run_id = self._continue(run_id, resumed_at)
            else:
                self.run_id = self._create(project, run_name, config)
        except (MlflowException, ImportError, OSError) as e:  # a store that cannot be used: one line, no traceback
            raise TunelabError(f"MLflow store {uri}: {_first_line(e)}{_database_hint(uri)}; fix "
                               "tracking.mlflow_tracking_uri (or MLFLOW_TRACKING_URI), or remove mlflow from "
                               "tracking.report_to") from None

    def _first_contact(self) -> None:
        """MLflow retries a server it cannot reach with back-off for minutes (7 retries, 120 s each) before it says
        anything: the first request tries once, for 10 s (unless the environment sets these MLflow settings)."""
        from mlflow.exceptions import MlflowException

        try:
            with _http_limits(_FIRST_CONTACT):
                self.client.search_experiments(max_results=1)
        except MlflowException as e:
            reason = _unreachable(e)
            if reason is None:
                raise  # the server answered: a store problem, said as one
            raise TunelabError(f"cannot reach the MLflow server at {self.uri} ({reason}); start it, or "
                               "fix tracking.mlflow_tracking_uri (or MLFLOW_TRACKING_URI), or remove mlflow from "
                               "tracking.report_to") from None

    def _continue(self, run_id: str, resumed_at: int) -> str:
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise TunelabError(f"MLflow run {run_id} is not in store {self.uri}; give the store it was logged to "
                               "(tracking.mlflow_tracking_uri=... or MLFLOW_TRACKING_URI), or resume with "
                               "tracking.report_to without mlflow") from None
        self.client.update_run(run_id, status="RUNNING")
        self.logged = {(key, m.step) for key in run.data.metrics
                       for m in self.client.get_metric_history(run_id, key) if m.step > resumed_at}
        return run_id

    def _create(self, project: str, run_name: str, config: dict[str, Any]) -> str:
        from mlflow.entities import Param

        experiment = self.client.get_experiment_by_name(project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
        run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(k, v) for k, v in _flatten(config).items()]
        for k in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=params[k:k + 100])
        return run_id

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in scalars.items() if (k, step) not in self.logged]
        if metrics and not self.failed:
            self._during_training(lambda: self.client.log_batch(self.run_id, metrics=metrics), f"step {step}")

    def close(self, status: str) -> None:
        if not self.failed:
            self._during_training(lambda: self.client.set_terminated(self.run_id, status=status), "the end")

    def _during_training(self, call: Callable[[], Any], when: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            with _http_limits(_DURING_TRAINING):
                call()
        except (MlflowException, OSError) as e:
            self.failed = True
            self.say(f"warning: MLflow logging failed at {when} ({_unreachable(e) or _first_line(e)}); the run goes "
                     f"on without MLflow (its metrics stay in metrics.jsonl); store {self.uri}")


# MLflow's own defaults retry an unreachable server with back-off for minutes (7 retries, 120 s timeout each)
_FIRST_CONTACT = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_DURING_TRAINING = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextmanager
def _http_limits(limits: dict[str, str]):
    """MLflow's HTTP retry settings for the requests inside (read per request), unless the environment sets them."""
    unset = [k for k in limits if os.environ.get(k) is None]
    os.environ.update({k: limits[k] for k in unset})
    try:
        yield
    finally:
        for k in unset:
            os.environ.pop(k, None)


def _unreachable(e: BaseException) -> str | None:
    """The connection failure in an MLflow error ("[Errno 111] Connection refused", "timed out"), or None when the
    server answered."""
    reason = re.search(r"\[Errno -?\d+\][^'\")]*|timed out", str(e))
    return reason.group(0).strip() if reason else None


def _is_file_store(uri: str) -> bool:
    scheme = urlparse(uri).scheme
    return scheme in ("", "file") or len(scheme) == 1  # a plain path, file:..., or a Windows drive letter


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "message", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _database_hint(uri: str) -> str:
    import importlib.util

    if (urlparse(uri).scheme.split("+")[0] in ("sqlite", "postgresql", "mysql", "mssql")
            and importlib.util.find_spec("sqlalchemy") is None):
        return " (a database store needs the full mlflow package, not mlflow-skinny: pip install mlflow)"
    return ""


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:250]
    return out
