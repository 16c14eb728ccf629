"""tunelab sweep --config F --grid lora.r=8,16 --grid training.learning_rate=1e-4,2e-4 [--metric eval_loss]

Trains every combination one after another as separate runs under `<output.dir>/<sweep>/`; run the same command
again to continue an interrupted sweep (completed runs are skipped). Ends with the runs sorted by --metric.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config every run starts from")
    p.add_argument("--grid", "-g", action="append", default=[], metavar="KEY=V1,V2",
                   help="one axis of the grid (repeat for more axes), e.g. lora.r=8,16")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides applied to every run")
    p.add_argument("--metric", default="eval_loss", help="final metric to rank by (default eval_loss; bleu, ...)")
    p.add_argument("--name", help="sweep name (default <config>-sweep-<hash of the grid>: re-running continues it)")


def run(args: argparse.Namespace) -> int:
    from tunelab.runs import make_console
    from tunelab.sweep import run_sweep, sweep_table

    console = make_console()
    result = run_sweep(args.config, args.grid, metric=args.metric, name=args.name, overrides=args.overrides,
                       say=lambda line: console.print(line, markup=False))
    console.print(sweep_table(result))
    console.print(f"sweep folder: {result.folder} (tunelab runs list --dir {result.folder.parent} "
                  f"--sweep {result.name})")
    return 0 if all(r.status in ("finished", "diverged") for r in result.rows) else 1
