"""tunelab train --config config.yaml [section.key=value ...] [--resume [RUN_DIR]] [--num-processes N]"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

from tunelab.cli import positive_int

if TYPE_CHECKING:
    from tunelab.config import Config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config (see docs/config.md); defaults apply without one")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. training.epochs=1 lora.r=8")
    p.add_argument("--resume", nargs="?", const="latest", metavar="RUN_DIR",
                   help="continue from the newest complete checkpoint of RUN_DIR (default: the config's run, or "
                        "the newest unfinished run in output.dir)")
    p.add_argument("--num-processes", type=positive_int, default=1, metavar="N",
                   help="train with N processes on this machine through torchrun (DDP; gloo on CPU). For several "
                        "machines or FSDP/DeepSpeed use `accelerate launch -m tunelab train ...`")


def run(args: argparse.Namespace) -> int:
    if args.resume and "=" in args.resume and not os.path.exists(args.resume):  # `--resume training.eval_steps=5`
        args.overrides, args.resume = [args.resume, *args.overrides], "latest"
    from tunelab.config import repeated_overrides

    launching = args.num_processes > 1 and "LOCAL_RANK" not in os.environ  # its rank 0 says it, under any launcher
    for warning in repeated_overrides(args.overrides) if os.environ.get("LOCAL_RANK", "0") == "0" and not launching \
            else []:
        print(f"warning: {warning}", file=sys.stderr)
    if launching:
        return _launch(args)
    return train_from_args(args.config, args.overrides, args.resume)


def _launch(args: argparse.Namespace) -> int:
    """torchrun with N local workers; what can be checked before they start is checked here, once."""
    from tunelab.train.distributed import require_run_name

    require_run_name(_config(args.config, args.overrides, args.resume)[0], args.resume, args.num_processes)
    cmd = [sys.executable, "-c", "import sys; from tunelab.train.distributed import torchrun; "
           "sys.exit(torchrun(sys.argv[1:]))", "--standalone", f"--nproc_per_node={args.num_processes}",
           "-m", "tunelab", "train"]
    cmd += (["--config", args.config] if args.config else []) + list(args.overrides)
    cmd += ["--resume", args.resume] if args.resume else []
    # own process group, so Ctrl-C / SIGTERM reach torchrun and every worker (each checkpoints and stops)
    proc = subprocess.Popen(cmd, start_new_session=True)

    def forward(signum, _frame):
        os.killpg(proc.pid, signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    return proc.wait()


def train_from_args(config: str | None, overrides: list[str], resume: str | None = None) -> int:
    from tunelab.config import ignored_settings
    from tunelab.train.recipe import train

    cfg, resume = _config(config, overrides, resume)
    for warning in ignored_settings(cfg) if os.environ.get("LOCAL_RANK", "0") == "0" else []:
        print(f"warning: {warning}", file=sys.stderr)
    if not resume:
        train(cfg, config_path=config)
        return 0
    # the run's own config.yaml rules: settings safe mid-run (from --config or the command line) are applied, the
    # others refused by name; the manifest keeps naming the file the run was started from
    from tunelab.train.lifecycle import config_file_overrides

    from_file = config_file_overrides(cfg, config, resume, overrides) if config else []
    train(cfg, resume=resume, overrides=from_file + list(overrides))
    return 0


def _config(config: str | None, overrides: list[str], resume: str | None) -> tuple[Config, str | None]:
    """The config to train, and the run to resume. `--resume` without --config: the overrides are checked against the
    run's own config.yaml, not the defaults (`training.early_stopping_patience=5` for a run with eval_steps 50)."""
    from tunelab.config import load_config, load_run_config
    from tunelab.train.lifecycle import find_resume_run

    if not resume or config:
        return load_config(config, overrides), resume
    located = load_config(None, [o for o in overrides if o.split("=", 1)[0].strip().startswith("output.")])
    run = find_resume_run(located, resume)
    if not (run / "config.yaml").is_file():
        return load_config(None, overrides), resume  # open_run says what is wrong with the folder
    return load_run_config(run / "config.yaml", overrides), str(run)
