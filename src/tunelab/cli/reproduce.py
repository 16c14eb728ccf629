"""tunelab reproduce RUN — train a finished run again from its folder and compare the two loss curves.

Refuses when the data on disk no longer matches the run's fingerprint. The repeat is `<RUN>-repro` beside it.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a run folder, or a run name under --dir")
    p.add_argument("--dir", default="outputs", help="folder that holds the runs (default outputs)")
    p.add_argument("--name", help="name of the new run (default <RUN>-repro)")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 unless the loss curves are identical (for CI on CPU)")


def run(args: argparse.Namespace) -> int:
    from tunelab.reproduce import reproduce

    res = reproduce(args.run, runs_dir=args.dir, name=args.name)
    d = res.diff
    print(f"\nreproduction: {res.reproduction}")
    print(f"train loss: largest difference {d.max_abs_diff!r} over {d.steps_compared} logged steps")
    if d.eval_max_abs_diff is not None:
        print(f"eval loss:  largest difference {d.eval_max_abs_diff!r}")
    if d.only_in_original or d.only_in_repro:
        print(f"steps logged by only one run: original {d.only_in_original}, reproduction {d.only_in_repro}")
    for note in res.notes:
        print(f"note: {note}")
    print("identical loss curves" if d.identical else "the loss curves differ")
    return 1 if args.strict and not d.identical else 0
