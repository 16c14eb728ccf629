"""`tunelab merge --adapter outputs/RUN --output models/merged [--model BASE] [--dtype bf16] [--no-verify]
[--overwrite]`"""

from __future__ import annotations

import argparse

from tunelab.cli import positive


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, help="run folder (its checkpoint-final is used) or checkpoint folder")
    p.add_argument("--output", required=True, help="folder for the merged model (written atomically)")
    p.add_argument("--model", default=None, metavar="BASE",
                   help="base weights to merge into (default: the base the run recorded; e.g. its new place after "
                        "it moved)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="dtype of the saved weights (the merge itself is always done in fp32)")
    p.add_argument("--tolerance", type=positive, default=None,
                   help="max |logit diff| relative to the largest logit (default: 1e-3 fp32, 2e-2 fp16, 1e-1 bf16)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier merged model at --output even if other files were put in it (deleted)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the adapter-vs-merged comparison")


def run(args: argparse.Namespace) -> int:
    import logging

    from tunelab.merge import merge_adapter

    from tunelab.runs import newest_run_checkpoint

    if args.tolerance is not None and not args.verify:
        from tunelab.merge import MergeError

        raise MergeError("--tolerance is the bound of the verification that --no-verify skips: drop one of them")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    adapter = newest_run_checkpoint(args.adapter)
    if adapter is not None:
        print(f"{args.adapter}: using {adapter} (the newest finished run, {adapter.parent.name})")
    report = merge_adapter(adapter or args.adapter, args.output, dtype=args.dtype, verify=args.verify,
                           tolerance=args.tolerance, overwrite=args.overwrite, model=args.model)
    print(report.summary())
    return 0
