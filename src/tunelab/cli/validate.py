"""`tunelab validate FILE...`: check a dataset without writing anything (the same as `tunelab prepare --check`).

    tunelab validate data/raw/my_data.json
    tunelab validate data/raw/*.jsonl --no-tokenizer --max-reject-ratio 0   # CI: fail on any rejected record

Exit codes: 0 usable; 1 not usable (nothing accepted, or too many rejections); 2 a file cannot be read at all.
"""

from __future__ import annotations

import argparse

from tunelab.cli.prepare import add_common_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="FILE", help="raw data: files, folders or globs")
    add_common_arguments(p)


def run(args: argparse.Namespace) -> int:
    from tunelab.cli.prepare import run_prepare

    return run_prepare(args, args.inputs, check=True)
