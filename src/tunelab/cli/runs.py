"""tunelab runs list|show|compare|plot|report

    tunelab runs list [--dir outputs] [--sweep NAME]
    tunelab runs show RUN
    tunelab runs compare RUN RUN [...]             # config and data differences, metrics side by side (★ best)
    tunelab runs plot RUN [...] --metric loss -o loss.png
    tunelab runs report RUN [-o report.html]       # Markdown (default) or HTML

RUN is a run folder or a run name under --dir.
"""

from __future__ import annotations

import argparse
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default="outputs", help="folder that holds the runs (output.dir; default outputs)")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="a table of every run, newest first")
    ls.add_argument("--sweep", help="only the runs of this sweep")
    ls.add_argument("--dir", default=argparse.SUPPRESS, help="folder that holds the runs")
    for action, help_text, many in (("show", "everything about one run", False),
                                    ("compare", "config/data differences and metrics side by side", True),
                                    ("plot", "overlaid metric curves of runs", True),
                                    ("report", "a Markdown or HTML report of a run", False)):
        sp = sub.add_parser(action, help=help_text)
        sp.add_argument("runs", nargs="+" if many else 1, metavar="RUN")
        sp.add_argument("--dir", default=argparse.SUPPRESS, help="folder that holds the runs")
        if action == "plot":
            sp.add_argument("--metric", default="loss", help="loss (train + eval), lr, grad_norm, perplexity, ...")
            sp.add_argument("-o", "--output", default="loss.png", help="image file (default loss.png)")
        if action == "report":
            sp.add_argument("-o", "--output", help="report file (.md or .html; default <run>/report.md)")
            sp.add_argument("--format", choices=["md", "html"], help="default: from -o, else md")
            sp.add_argument("--samples", type=int, default=5, help="sample answers shown (default 5)")
            sp.add_argument("--force", action="store_true", help="replace an -o file that is not a run report")


def run(args: argparse.Namespace) -> int:
    from tunelab import runs
    from tunelab.runs import make_console

    console = make_console()
    if args.action == "list":
        if os.path.exists(args.dir) and not os.path.isdir(args.dir):
            raise runs.RunError(f"--dir {args.dir} is a file: give the folder that holds the runs (output.dir)")
        summaries = runs.list_runs(args.dir, sweep=args.sweep)
        if not summaries:
            console.print(f"no runs in {args.dir}" + ("" if os.path.isdir(args.dir) else
                                                      " (no such folder: runs go to output.dir, default outputs)"))
            return 0
        console.print(runs.runs_table(summaries))
    elif args.action == "show":
        _show(console, runs.show_run(runs.resolve_run(args.runs[0], args.dir)))
    elif args.action == "compare":
        for table in runs.comparison_tables(runs.compare_runs(args.runs, args.dir)):
            console.print(table)
    elif args.action == "plot":
        console.print(f"wrote {runs.plot_runs(args.runs, args.metric, args.output, args.dir)}")
    elif args.action == "report":
        from tunelab.evaluate.report import write_run_report

        out = write_run_report(args.runs[0], args.output, args.format, args.samples, args.dir, force=args.force)
        console.print(f"wrote {out}")
    return 0


def _show(console, info: dict) -> None:
    import yaml
    from rich.table import Table

    from tunelab import runs
    from tunelab.evaluate.report import eval_table
    from tunelab.runs import fmt_duration, fmt_num

    s, m = info["summary"], info["manifest"]
    t = Table(title=f"run {s.name}", show_header=False)
    dtype = m.get("dtype")
    status = f"{s.status}: {s.note}" if s.note else s.status  # stale: what happened and how to continue
    for k, v in (("folder", info["path"]), ("status", status), ("started", s.date),
                 ("duration", fmt_duration(s.duration_s)), ("method", s.method), ("model", s.model),
                 ("data", s.data), ("data fingerprint", m.get("data_fingerprint")), ("seed", m.get("seed")),
                 ("steps", fmt_num(s.steps) if s.steps is not None else _last_logged(info["path"])), ("dtype", f"{dtype.get('name', '?')}"
                                               + (f" ({dtype['reason']})" if dtype.get("reason") else "")
                                               if isinstance(dtype, dict) else dtype),
                 ("git commit", m.get("git_commit")), ("checkpoints", ", ".join(info["checkpoints"]))):
        t.add_row(k, str(v if v is not None else ""))
    console.print(t)
    if info["metrics"]:
        console.print(eval_table(info["metrics"], title="final metrics"))
    for name, ev in info["evals"].items():
        console.print(eval_table(ev["metrics"], ev["base_metrics"], title=f"eval/{runs.eval_label(name, ev)}"))
    console.print("config.yaml:")
    console.print(yaml.safe_dump(info["config"], sort_keys=False, allow_unicode=True), markup=False)


def _last_logged(run: str) -> str:
    """A killed run's manifest holds no step count: the last step its metrics.jsonl logged."""
    from pathlib import Path

    from tunelab.runs import last_logged

    step = last_logged(Path(run))[0]
    return "" if step is None else f"{step} (last logged)"
