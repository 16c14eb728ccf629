"""tunelab demo: the whole pipeline on the bundled model and the demo data (what `make demo` runs)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default="config.yaml", help="training config (default: config.yaml)")
    p.add_argument("--merged", default="models/merged", help="where the merged model is written")
    p.add_argument("--raw-dir", default="data/raw", help="where the demo datasets are written")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")


def run(args: argparse.Namespace) -> int:
    from tunelab.demo import run_demo

    run_demo(args.config, args.merged, args.overrides, raw_dir=args.raw_dir)
    return 0
