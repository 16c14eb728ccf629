"""tunelab train --config config.yaml [section.key=value ...] [--resume [RUN_DIR]] [--num-processes N]"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

from tunelab.cli import positive_int


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

    for warning in repeated_overrides(args.overrides) if "LOCAL_RANK" not in os.environ else []:  # launcher once
        print(f"warning: {warning}", file=sys.stderr)
    if args.num_processes > 1 and "LOCAL_RANK" not in os.environ:
        return _launch(args)
    return train_from_args(args.config, args.overrides, args.resume)


def _launch(args: argparse.Namespace) -> int:
    """torchrun with N local workers; what can be checked before they start is checked here, once."""
    from tunelab.config import load_config
    from tunelab.train.distributed import require_run_name

    require_run_name(load_config(args.config, args.overrides), args.resume, args.num_processes)
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
    from tunelab.config import ignored_settings, load_config
    from tunelab.train.recipe import train

    cfg = load_config(config, overrides)
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
