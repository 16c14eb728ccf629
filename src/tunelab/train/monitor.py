"""What a person sees while training: the brief's step lines, a live progress bar, train.log and trackers.

    Epoch 1/3:
      Step 100/500 | Loss: 2.345 | LR: 2e-4 | Time: 0:01:23 | ETA: 0:05:12 | 812 tok/s | RSS 1.2 GiB
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError


def hms(seconds: float) -> str:
    return str(dt.timedelta(seconds=int(max(seconds, 0))))


def fmt_lr(lr: float) -> str:
    return f"{lr:.3g}".replace("e-0", "e-")


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
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                     TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                     TextColumn("{task.fields[info]}"), transient=True)
            self.task = self.progress.add_task("train", total=total_steps, info="")

    def __enter__(self) -> "Reporter":
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
            self.progress = None
        if self.log:
            self.log.close()
            self.log = None

    def line(self, text: str = "") -> None:
        if not self.enabled:
            return
        if self.progress:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)
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
    """TensorBoard (default), MLflow and Weights & Biases behind one small interface; main process only."""

    def __init__(self, names: list[str], run_dir: Path, run_name: str, project: str, config: dict[str, Any],
                 mlflow_uri: str | None = None, enabled: bool = True):
        self.tb = self.mlflow = self.wandb = None
        if not enabled:
            return
        names = [n for n in names if n != "none"]
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if "mlflow" in names:
            try:
                import mlflow
            except ImportError:
                raise TunelabError("tracking.report_to includes mlflow: pip install 'tunelab[mlflow]'") from None
            if mlflow_uri:
                mlflow.set_tracking_uri(mlflow_uri)
            mlflow.set_experiment(project)
            mlflow.start_run(run_name=run_name)
            mlflow.log_params(_flatten(config))
            self.mlflow = mlflow
        if "wandb" in names:
            try:
                import wandb
            except ImportError:
                raise TunelabError("tracking.report_to includes wandb: pip install 'tunelab[wandb]'") from None
            self.wandb = wandb.init(project=project, name=run_name, config=config, dir=str(run_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k not in ("step",)}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k if "/" in k else ("eval/" + k[5:] if k.startswith("eval_") else "train/" + k),
                                   v, step)
        if self.mlflow:
            self.mlflow.log_metrics(scalars, step=step)
        if self.wandb:
            self.wandb.log(scalars, step=step)

    def close(self, status: str = "FINISHED") -> None:
        if self.tb:
            self.tb.close()
        if self.mlflow:
            self.mlflow.end_run(status=status)
        if self.wandb:
            self.wandb.finish(exit_code=0 if status == "FINISHED" else 1)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:250]
    return out
