"""Runs as data: find, list, show, compare and plot run folders (see docs/architecture.md, "Run folder").

    from tunelab import runs
    table = runs.list_runs("outputs")                     # one RunSummary per run, newest first
    cmp = runs.compare_runs(["outputs/a", "outputs/b"])   # config / data / metric differences, best marked
    runs.plot_runs(["outputs/a", "outputs/b"], "loss", "loss.png")

`list_runs` reads only each run's manifest.json, so it stays fast with hundreds of runs. Metrics read from
metrics.jsonl skip a torn last line (a run killed mid-write) quietly and other damaged lines with a warning.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from tunelab.errors import TunelabError
from tunelab.files import read_json_object
from tunelab.rundir import live_status, read_metrics, run_status

# Metrics where a lower value is better; every other numeric metric is higher-is-better.
# logps/*: the answers' log-probabilities (preference eval): the chosen / desirable ones up, the rejected down
LOWER_IS_BETTER = {"loss", "train_loss", "eval_loss", "perplexity", "eval_perplexity", "best_eval_loss",
                   "logps/rejected"}
HIGHER_IS_BETTER = {"bleu", "chrf", "rouge_l", "exact_match", "rewards/accuracy", "rewards/margin", "logps/chosen"}
KNOWN_METRICS = ("train_loss", "eval_loss", "perplexity", "bleu", "chrf", "rouge_l", "exact_match")


class RunError(TunelabError):
    """A run folder that cannot be found or read."""


# ---------------------------------------------------------------- finding runs


def is_run_dir(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def iter_run_dirs(runs_dir: str | os.PathLike = "outputs") -> list[Path]:
    """Run folders directly under `runs_dir`, and one level deeper (runs grouped in a folder, e.g. a sweep)."""
    root = Path(runs_dir)
    found: list[Path] = []
    if not root.is_dir():
        return found
    with os.scandir(root) as it:
        for entry in it:
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            p = Path(entry.path)
            if is_run_dir(p):
                found.append(p)
                continue
            with os.scandir(p) as inner:
                found.extend(Path(e.path) for e in inner
                             if e.is_dir() and not e.name.startswith(".") and is_run_dir(Path(e.path)))
    return found


def resolve_run(run: str | os.PathLike, runs_dir: str | os.PathLike = "outputs") -> Path:
    """A run folder given as a path, or as a name under `runs_dir`."""
    p = Path(run)
    for candidate in (p, Path(runs_dir) / p):
        if is_run_dir(candidate):
            return candidate
        if candidate.name.startswith("checkpoint-") and is_run_dir(candidate.parent):
            return candidate.parent
    names = [str(d.relative_to(runs_dir)) for d in iter_run_dirs(runs_dir)]
    close = difflib.get_close_matches(str(run), names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else (
        f"; `tunelab runs list --dir {runs_dir}` shows the runs there" if names else "")
    looked = " and ".join(dict.fromkeys(str(c) for c in (p, Path(runs_dir) / p)))  # once for an absolute path
    raise RunError(f"no run {str(run)!r} (a run folder holds manifest.json; looked at {looked}){hint}")


def newest_run_checkpoint(path: str | os.PathLike) -> Path | None:
    """`outputs/checkpoint-final` as the brief writes it (no such folder): that checkpoint of the newest finished
    run under `outputs/`, or None when `path` exists or does not have that shape."""
    p = Path(path)
    if p.exists() or not p.name.startswith("checkpoint-") or not p.parent.is_dir():
        return None
    found = []
    for run in iter_run_dirs(p.parent):
        try:
            manifest = read_manifest(run)
        except RunError:
            continue
        if run_status(manifest) == "finished" and (run / p.name).is_dir():
            found.append((manifest.get("ended_at") or "", run / p.name))
    return max(found)[1] if found else None


def read_manifest(run: Path) -> dict[str, Any]:
    return read_json_object(Path(run) / "manifest.json", RunError)


def read_config(run: Path) -> dict[str, Any]:
    import yaml

    path = Path(run) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise RunError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise RunError(f"cannot read {path}: a mapping of sections was expected, found {type(data).__name__}")
    return data


def read_evals(run: Path) -> dict[str, dict[str, Any]]:
    """`eval/<name>.json` files of a run, by name; a file that is not an eval record is left out, and sections that
    are not mappings read as absent (`metrics` {}, `base_metrics` None)."""
    out = {}
    for f in sorted((Path(run) / "eval").glob("*.json")):
        try:
            ev = read_json_object(f)
        except TunelabError:
            continue
        for key, empty in (("metrics", {}), ("base_metrics", None), ("tokenizer_choice", None)):
            if not isinstance(ev.get(key), dict):
                ev[key] = empty
        out[f.stem] = ev
    return out


def eval_subject(model: str | None, adapter: str | None, adapter_base: str | None) -> str | None:
    """What an eval scored, in a few words, when it is not a run's final adapter on its own base: `checkpoint-2`,
    `m1` (a merged or other model), `checkpoint-2 on other`; None when it is. Result names and the run tables carry
    it, so that a checkpoint's or another model's number never reads as the run's."""
    def same(a: str, b: str | None) -> bool:
        return b is not None and (a == b or (Path(a).exists() and Path(b).exists()
                                             and Path(a).resolve() == Path(b).resolve()))

    parts = [Path(adapter).name] if adapter and Path(adapter).name != "checkpoint-final" else []
    if model and not (adapter and same(model, adapter_base)):  # no adapter, or one put on another model
        label = Path(model).name if Path(model).exists() else model.replace("/", "-")
        parts.append(f"on {label}" if adapter else label)
    return " ".join(parts) or None


def eval_source(ev: dict[str, Any]) -> str | None:
    """`eval_subject` of an eval record: as recorded, or (a result written before it was) from its model section."""
    m = ev.get("model") if isinstance(ev.get("model"), dict) else {}
    if "subject" in m:
        return m["subject"]
    return eval_subject(*(str(m[k]) if m.get(k) else None for k in ("model", "adapter", "base_model")))


def eval_label(name: str, ev: dict[str, Any]) -> str:
    """An eval's name, with what it scored when that is not the run's final adapter and the name does not say so
    (`val (checkpoint-2)`: a result written before names said it)."""
    source = eval_source(ev)
    return name if not source or source.replace(" ", "-") in name else f"{name} ({source})"


def final_metrics(manifest: dict[str, Any]) -> dict[str, float]:
    """The final metrics of a run: the manifest's `metrics`/`final_metrics` section and top-level metric keys."""
    out: dict[str, float] = {}
    for key in ("final_metrics", "metrics"):
        if isinstance(manifest.get(key), dict):
            out.update({k: v for k, v in manifest[key].items() if isinstance(v, (int, float))})
    for k in KNOWN_METRICS:
        if isinstance(manifest.get(k), (int, float)):
            out.setdefault(k, manifest[k])
    if "loss" in out and "train_loss" not in out:
        out["train_loss"] = out["loss"]
    return out


# ---------------------------------------------------------------- list


@dataclass
class RunSummary:
    name: str
    path: Path
    date: str
    status: str
    method: str
    model: str
    data: str
    steps: int | None
    duration_s: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    started_at: str = ""
    note: str = ""  # why the status reads as it does (stale, unknown, failed), when there is more to say


def _model_name(manifest: dict[str, Any]) -> str:
    for key in ("model", "base_model", "model_name"):
        v = manifest.get(key)
        if isinstance(v, dict):
            v = v.get("name") or v.get("base_model")
        if v:
            v = str(v)
            # a local folder: its name is enough in a table (hub ids such as Qwen/Qwen2.5-0.5B stay whole)
            return Path(v).name if v.startswith(("/", ".", "~")) else v
    return "?"


def _data_name(manifest: dict[str, Any]) -> str:
    """`demo.json (90/10)`: the data source and its train/val record counts."""
    data = manifest.get("data")
    if not isinstance(data, dict):
        return str(data or "?")
    path = data.get("source") or data.get("train") or data.get("folder") or data.get("path")
    n_train, n_val = data.get("train_records"), data.get("val_records")
    name = Path(str(path)).name if path else "?"
    if isinstance(n_train, int):
        name += f" ({n_train}" + (f"/{n_val})" if isinstance(n_val, int) else ")")
    return name


def _number(v: Any) -> float | None:
    """A manifest number, or None for anything else (a hand-edited "12", a null): a table shows it blank."""
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def summarize(run: Path, manifest: dict[str, Any] | None = None, runs_dir: Path | None = None) -> RunSummary:
    m = manifest if manifest is not None else read_manifest(run)
    started = str(m.get("started_at") or "")
    try:
        date = dt.datetime.fromisoformat(started).strftime("%Y-%m-%d %H:%M") if started else ""
    except ValueError:
        date = started[:16]
    name = str(run.relative_to(runs_dir)) if runs_dir is not None else str(m.get("run_name") or run.name)
    steps, (status, note) = m.get("global_step"), live_status(m)
    return RunSummary(name=name, path=run, date=date, status=status,
                      method=str(m.get("method") or "?"), model=_model_name(m), data=_data_name(m),
                      steps=steps if isinstance(_number(steps), int) else None, duration_s=_number(m.get("duration_s")),
                      metrics=final_metrics(m), started_at=started, note=note)


def read_sweep_state(path: Path, error: type[TunelabError] = RunError) -> dict[str, Any]:
    """A sweep.json as `tunelab sweep` writes it, or `error` naming the file when it is not (here, not in sweep.py,
    so that runs need not import the sweep that imports them)."""
    state = read_json_object(path, error)
    entries = state.get("runs")
    if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
        raise error(f"cannot read {path}: its \"runs\" is not a mapping of run entries; move it away (the run "
                    "folders beside it are kept) or pass another --name")
    return state


def load_sweep(output_dir: str | os.PathLike, name: str) -> dict[str, Any]:
    """The state file of `tunelab sweep` (`<output_dir>/<name>/sweep.json`): its runs and their status."""
    path = Path(output_dir) / name / "sweep.json"
    if not path.is_file():
        raise RunError(f"no sweep {name!r} in {output_dir} (looked for {path})")
    return read_sweep_state(path)


def list_runs(runs_dir: str | os.PathLike = "outputs", sweep: str | None = None) -> list[RunSummary]:
    """Every run under `runs_dir`, newest first (reads only manifest.json)."""
    root = Path(runs_dir)
    keep = None
    if sweep:  # a sweep's runs are <root>/<sweep>/<combo> (sweep.json's run_dir is relative to where it ran)
        keep = {(root / sweep / combo).resolve() for combo in load_sweep(root, sweep)["runs"]}
    out = []
    for run in iter_run_dirs(root):
        if keep is not None and run.resolve() not in keep:
            continue
        try:
            out.append(summarize(run, read_manifest(run), root))
        except (RunError, TypeError, ValueError, AttributeError):  # one damaged manifest must not hide the table
            out.append(RunSummary(run.name, run, "", "unreadable", "?", "?", "?", None, None))
    return sorted(out, key=lambda s: s.started_at, reverse=True)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def fmt_num(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def make_console():
    """A rich console; when the output is piped or captured, wide enough that table cells are not squashed."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=240)


def runs_table(summaries: Sequence[RunSummary]):
    from rich.table import Table

    t = Table(title=f"{len(summaries)} run{'s' * (len(summaries) != 1)}")
    for col in ("name", "date", "status", "method", "model", "data", "steps", "train loss", "eval loss",
                "perplexity", "BLEU", "duration"):
        t.add_column(col, justify="right" if col in ("steps", "train loss", "eval loss", "perplexity", "BLEU",
                                                      "duration") else "left")
    colour = {"finished": "green", "failed": "red", "interrupted": "yellow", "running": "cyan", "starting": "cyan",
              "stale": "yellow"}
    for s in summaries:
        m = s.metrics
        t.add_row(s.name, s.date, f"[{colour.get(s.status, 'white')}]{s.status}[/]", s.method, s.model, s.data,
                  fmt_num(s.steps), fmt_num(m.get("train_loss")), fmt_num(m.get("eval_loss")),
                  fmt_num(m.get("perplexity")), fmt_num(m.get("bleu")), fmt_duration(s.duration_s))
    return t


def last_logged(run: Path) -> tuple[int | None, float | None]:
    """The last step metrics.jsonl logged and its elapsed seconds: what a run killed before writing its manifest
    again (stale, no global_step or duration) did reach."""
    steps = [r for r in read_metrics(run) if isinstance(r.get("step"), int)]
    if not steps:
        return None, None
    last = max(steps, key=lambda r: r["step"])
    return last["step"], _number(last.get("elapsed_s"))


# ---------------------------------------------------------------- show


def show_run(run: Path) -> dict[str, Any]:
    """Everything a person wants about one run, as data."""
    manifest = read_manifest(run)
    checkpoints = sorted(p.name for p in Path(run).glob("checkpoint-*") if p.is_dir())
    return {"path": str(run), "summary": summarize(run, manifest), "manifest": manifest, "config": read_config(run),
            "metrics": final_metrics(manifest), "evals": read_evals(run), "checkpoints": checkpoints,
            "logged_steps": sum(1 for r in read_metrics(run) if "loss" in r)}


# ---------------------------------------------------------------- compare


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


_MISSING = object()


@dataclass
class Comparison:
    names: list[str]
    config_diff: dict[str, list[Any]]  # dotted key -> value per run (only keys that differ)
    data: dict[str, list[Any]]  # fingerprint, data, records per run
    data_same: bool
    metrics: dict[str, list[float | None]]  # metric -> value per run
    best: dict[str, list[int]]  # metric -> indices of the best run(s)
    env_diff: dict[str, list[Any]] = field(default_factory=dict)  # seed, dtype, versions, hardware, git commit


ENV_KEYS = ("seed", "dtype", "versions", "hardware", "git_commit", "processes")


def _differing(rows: list[dict[str, Any]], skip: tuple[str, ...] = ()) -> dict[str, list[Any]]:
    out = {}
    for key in sorted(set().union(*rows)):
        if key in skip:
            continue
        values = [r.get(key, _MISSING) for r in rows]
        if any(v != values[0] for v in values[1:]):
            out[key] = [None if v is _MISSING else v for v in values]
    return out


def run_labels(paths: Sequence[Path], runs_dir: str | os.PathLike, names: Sequence[str] | None = None) -> list[str]:
    """Column and legend labels: the runs' names, or, when two are alike (`mine/r2`, `other/r2`), their paths
    relative to `runs_dir`."""
    names = list(names) if names is not None else [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    root = Path(runs_dir).resolve()
    out = []
    for p in paths:
        try:
            out.append(str(Path(p).resolve().relative_to(root)))
        except ValueError:
            out.append(str(p))
    return out


def metric_direction(metric: str) -> str | None:
    """"min" or "max" for a metric whose better direction is known, else None. An eval record's `val:` prefix and
    training's `eval_` prefix name the same metric: `eval_rewards/accuracy` (logged by preference training on the
    held-out split) ranks like `rewards/accuracy` (what `tunelab eval` writes)."""
    leaf = metric.split(":")[-1]
    leaf = leaf.removeprefix("eval_") or leaf
    if leaf in LOWER_IS_BETTER or leaf.endswith("loss") or leaf.endswith("perplexity"):
        return "min"
    if leaf in HIGHER_IS_BETTER:
        return "max"
    return None


def compare_runs(runs: Sequence[str | os.PathLike], runs_dir: str | os.PathLike = "outputs") -> Comparison:
    paths = [resolve_run(r, runs_dir) for r in runs]
    if len(paths) < 2:
        raise RunError("compare needs at least two runs")
    manifests = [read_manifest(p) for p in paths]
    names = run_labels(paths, runs_dir, [str(m.get("run_name") or p.name) for p, m in zip(paths, manifests)])
    configs = [flatten(read_config(p)) for p in paths]
    config_diff = _differing(configs, skip=("output.run_name",))
    env_diff = _differing([flatten({k: m.get(k) for k in ENV_KEYS if k in m}) for m in manifests],
                          skip=("dtype.reason",))
    fps = [m.get("data_fingerprint") for m in manifests]
    data = {"fingerprint": fps, "data": [_data_name(m) for m in manifests]}
    metrics: dict[str, list[float | None]] = {}
    per_run = [dict(final_metrics(m)) for m in manifests]
    for i, p in enumerate(paths):
        for ev_name, ev in read_evals(p).items():
            for k, v in ev["metrics"].items():
                if isinstance(v, (int, float)):
                    per_run[i][f"{eval_label(ev_name, ev)}:{k}"] = v
    order = [k for k in KNOWN_METRICS if any(k in r for r in per_run)]
    order += sorted(k for k in set().union(*per_run) if k not in order)
    best: dict[str, list[int]] = {}
    for k in order:
        values = [r.get(k) for r in per_run]
        metrics[k] = values
        direction = metric_direction(k)
        present = [(v, i) for i, v in enumerate(values) if isinstance(v, (int, float)) and math.isfinite(v)]  # NaN: never best
        if direction and len(present) >= 2:
            target = (min if direction == "min" else max)(v for v, _ in present)
            best[k] = [i for v, i in present if v == target]
    return Comparison(names, config_diff, data, fps[0] is not None and all(f == fps[0] for f in fps), metrics, best,
                      env_diff)


def comparison_tables(cmp: Comparison) -> list:
    from rich.table import Table

    tables = []
    t = Table(title="config differences" if cmp.config_diff else "config: identical (except run name)")
    t.add_column("key")
    for n in cmp.names:
        t.add_column(n)
    for key, values in cmp.config_diff.items():
        t.add_row(key, *[json.dumps(v) if not isinstance(v, str) else v for v in values])
    tables.append(t)
    t = Table(title="data: same fingerprint" if cmp.data_same else "data: DIFFERENT fingerprints")
    t.add_column("")
    for n in cmp.names:
        t.add_column(n)
    for key, values in cmp.data.items():
        t.add_row(key, *[(str(v)[:23] + "…" if key == "fingerprint" and len(str(v)) > 24 else str(v))
                         if v is not None else "?" for v in values])
    tables.append(t)
    if cmp.env_diff:
        t = Table(title="environment differences (seed, precision, versions, hardware)")
        t.add_column("key")
        for n in cmp.names:
            t.add_column(n)
        for key, values in cmp.env_diff.items():
            t.add_row(key, *[str(v) if v is not None else "—" for v in values])
        tables.append(t)
    t = Table(title="metrics (★ best)")
    t.add_column("metric")
    for n in cmp.names:
        t.add_column(n, justify="right")
    for key, values in cmp.metrics.items():
        best = set(cmp.best.get(key, []))
        t.add_row(key, *[("[bold green]★ " + fmt_num(v) + "[/]") if i in best else fmt_num(v)
                         for i, v in enumerate(values)])
    tables.append(t)
    return tables


# ---------------------------------------------------------------- plot


def curve(records: Iterable[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) points of one metric, one per step (a later line for the same step wins)."""
    points: dict[int, float] = {}
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and isinstance(r.get("step"), int):
            points[r["step"]] = float(v)
    return sorted(points.items())


def plot_runs(runs: Sequence[str | os.PathLike], metric: str = "loss", output: str | os.PathLike = "loss.png",
              runs_dir: str | os.PathLike = "outputs", title: str | None = None) -> Path:
    """Overlay `metric` of several runs: train as solid lines, eval (eval_<metric>) dashed in the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [resolve_run(r, runs_dir) for r in runs]
    train_key = metric
    eval_key = metric if metric.startswith("eval_") else f"eval_{metric}"
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    drawn = 0
    labels = run_labels(paths, runs_dir)
    for i, (p, name) in enumerate(zip(paths, labels)):
        recs, colour = read_metrics(p), f"C{i % 10}"
        train = curve((r for r in recs if "eval_loss" not in r or "loss" in r), train_key) \
            if train_key != eval_key else []
        evals = curve(recs, eval_key)
        if train:
            ax.plot(*zip(*train), color=colour, lw=1.5, label=f"{name} train")
            drawn += 1
        if evals:
            ax.plot(*zip(*evals), color=colour, lw=1.5, ls="--", marker="o", ms=3, label=f"{name} eval")
            drawn += 1
    if not drawn:
        plt.close(fig)
        raise RunError(f"no {metric!r} values in the metrics.jsonl of {', '.join(labels)}")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric}: " + ", ".join(labels)[:90])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(output)
    kinds = fig.canvas.get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in kinds:  # matplotlib would add .png to a bare name, or fail on .xyz
        plt.close(fig)
        raise RunError(f"{out}: name the image file with one of {', '.join('.' + k for k in sorted(kinds))}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
