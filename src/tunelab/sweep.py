"""Sweeps: a grid of config variations, trained one after another as separate runs grouped under one sweep.

    tunelab sweep --config config.yaml --grid lora.r=8,16 --grid training.learning_rate=1e-4,2e-4

Layout: `<output.dir>/<sweep>/sweep.json` lists the grid and every combination; each combination is an ordinary
run folder `<output.dir>/<sweep>/<combo>` (e.g. `r8-learning_rate1e-4`), so `tunelab runs list/compare` see them.
Running the same command again continues the sweep: completed (and diverged) runs are skipped, an interrupted or
failed run is resumed from its last complete checkpoint, and the rest are trained. The sweep name defaults to the
config file's name plus a hash of the grid, so the same command always finds the same sweep. A `--name` is a plain
folder name; reusing it with another grid, other overrides or another resolved config (checked against the runs'
own config.yaml) is refused rather than mixing results. `--metric` must be one whose direction is known (runs.LOWER_IS_BETTER / HIGHER_IS_BETTER, with or without
training's `eval_` prefix, or a name ending in loss/perplexity), and is checked before anything trains; `output.*`
is set per run by the sweep, so it cannot be a grid axis (and `output.run_name` cannot be an override; `output.dir`
can, it is where the sweep folder goes). One process at a time works on a sweep: a second command on a running
sweep is refused (a file lock in its folder, `.sweep.lock`, freed when the first ends, however it ends).
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tunelab.errors import TunelabError
from tunelab.files import read_json_object

DONE = ("finished", "diverged")  # a diverged run would diverge again: it is a result, not a gap


class SweepError(TunelabError):
    """A sweep that cannot start or continue as asked."""


def split_values(text: str) -> list[str]:
    """`8,16` -> [8, 16]; commas inside brackets stay: `[q_proj,v_proj],all-linear` -> 2 values."""
    values, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            values.append(cur.strip())
            cur = ""
        else:
            cur += ch
    values.append(cur.strip())
    return [v for v in values if v]


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    from tunelab.config import is_key, key_hint

    grid, problems = [], []
    for item in items:
        key, sep, values = item.partition("=")
        vals = split_values(values)
        if not sep or not key.strip() or not vals:
            problems.append(f"  - {item!r}: a grid axis looks like section.key=v1,v2 (e.g. lora.r=8,16)")
            continue
        grid.append((key.strip(), vals))
        problems += [f"  - {key.strip()}: the value {v} is given twice" for v in dict.fromkeys(vals)
                     if vals.count(v) > 1]
    keys = [k for k, _ in grid]
    problems += [f"  - {k}: unknown key{key_hint(k)}" for k in dict.fromkeys(keys) if not is_key(k)]
    problems += [f"  - {k}: given twice" for k in sorted({k for k in keys if keys.count(k) > 1})]
    problems += [f"  - {k}: the sweep sets output.dir and output.run_name of each run itself (pass output.dir=... "
                 "as an override to choose where the sweep goes)" for k in keys if k.startswith("output.")]
    if problems or not grid:
        raise SweepError("bad --grid:\n" + ("\n".join(problems) or "  - no --grid axis given"))
    return grid


def combo_name(assignment: Sequence[tuple[str, str]]) -> str:
    """`[(lora.r, 8), (training.learning_rate, 1e-4)]` -> `r8-learning_rate1e-4` (full keys if leaves clash)."""
    leaves = [k.split(".")[-1] for k, _ in assignment]
    use_full = len(set(leaves)) < len(leaves)
    parts = [f"{k if use_full else k.split('.')[-1]}{v}" for k, v in assignment]
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", "-".join(parts)).strip("_")


def combinations(grid: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    """(name, overrides) of every point of the grid, in a stable order (the first axis varies slowest). Names are
    unique: values that differ only in characters a folder name cannot hold (`a b`, `a_b`) get -2, -3, ..."""
    out, names = [], set()
    for values in itertools.product(*[vals for _, vals in grid]):
        assignment = [(k, v) for (k, _), v in zip(grid, values)]
        name, n = combo_name(assignment), 2
        while name.lower() in names:  # lower: two folders that differ in case are one on macOS and Windows
            name, n = f"{combo_name(assignment)}-{n}", n + 1
        names.add(name.lower())
        out.append((name, [f"{k}={v}" for k, v in assignment]))
    return out


def default_sweep_name(config: str | None, grid: list[tuple[str, list[str]]], overrides: Sequence[str]) -> str:
    """`<config stem>-sweep-<hash>` of the grid, the overrides and the config's text: the same command finds the
    same sweep again, and an edited config starts a new one instead of mixing results."""
    stem = Path(config).stem if config else "defaults"
    path = Path(config).expanduser() if config else None
    text = path.read_text(encoding="utf-8") if path and path.is_file() else ""
    digest = hashlib.sha256(json.dumps([grid, list(overrides), text]).encode()).hexdigest()[:6]
    return f"{stem}-sweep-{digest}"


def check_name(name: str) -> str:
    """A sweep name is one plain folder under output.dir: `runs list` finds runs one level below a group folder."""
    if not name or name in (".", "..") or name.startswith(".") or re.search(r"[/\\]", name):
        raise SweepError(f"--name {name!r}: give a plain folder name (no '/', no leading '.'); the sweep goes in "
                         "output.dir/<name>")
    return name


def check_metric(metric: str) -> str:
    """The metric must be one we know the direction of, or the ranking would be a guess (or empty after hours)."""
    from tunelab.runs import HIGHER_IS_BETTER, LOWER_IS_BETTER, metric_direction

    if metric_direction(metric) is None:
        known = sorted(LOWER_IS_BETTER | HIGHER_IS_BETTER)
        close = difflib.get_close_matches(metric, known + [f"eval_{k}" for k in known], n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise SweepError(f"--metric {metric!r}: not a metric the sweep can rank by; {hint}"
                         f"use one of {', '.join(known)} (each also with an eval_ prefix, as training logs them), "
                         "or a name ending in loss or perplexity")
    return metric


def trained_from_another_config(folder: Path, cfgs: dict[str, Any]) -> dict[str, list[str]]:
    """The combinations whose run folder holds a config.yaml other than the one the sweep would train now, with the
    dotted keys that differ (the output section aside: the sweep sets it per run). The runs' own config.yaml is what
    their results came from, so this is the one check that a sweep continues the config it was started with; a key
    a newer tunelab adds reads back as its default on both sides, so an upgrade alone does not stop a sweep."""
    from tunelab.config import load_run_config
    from tunelab.runs import flatten

    changed = {}
    for combo, cfg in cfgs.items():
        path = folder / combo / "config.yaml"
        if not path.is_file():
            continue
        try:
            ran = flatten(load_run_config(path).to_dict())
        except TunelabError:  # unreadable: resuming or skipping it will say so
            continue
        want = flatten(cfg.to_dict())
        keys = sorted(k for k in set(ran) | set(want)
                      if not k.startswith("output.") and ran.get(k) != want.get(k))
        if keys:
            changed[combo] = keys
    return changed


def sweep_dir(output_dir: str | os.PathLike, name: str) -> Path:
    return Path(output_dir) / name


def _save(path: Path, state: dict[str, Any]) -> None:
    from tunelab.rundir import write_json_atomic

    write_json_atomic(path, state)


@dataclass
class SweepRow:
    combo: str
    run_dir: Path
    status: str
    value: float | None
    overrides: list[str]
    error: str | None = None


@dataclass
class SweepResult:
    name: str
    folder: Path
    metric: str
    rows: list[SweepRow]  # sorted by the metric, best first; runs without a value last
    trained: list[str]
    skipped: list[str]


def _manifest(run_dir: Path) -> dict[str, Any] | None:
    try:
        return read_json_object(run_dir / "manifest.json")
    except TunelabError:
        return None


def _status(run_dir: Path) -> str | None:
    """The run's status, with a run that failed by diverging told apart (it is a result, not a gap)."""
    from tunelab.rundir import run_status

    manifest = _manifest(run_dir)
    if manifest is None:
        return None
    diverged = manifest.get("status") == "diverged" or manifest.get("failure") == "diverged"
    return "diverged" if diverged else run_status(manifest)


def run_sweep(config: str | None, grid: Sequence[str], *, metric: str = "eval_loss", name: str | None = None,
              overrides: Sequence[str] = (), train_fn: Callable | None = None,
              say: Callable[[str], None] = print) -> SweepResult:
    """Train every point of `grid` (dotted key=v1,v2 axes) on top of `config` + `overrides`, one at a time."""
    from tunelab.config import ConfigError, load_config, repeated_overrides

    check_metric(metric)
    if name is not None:
        check_name(name)
    if any(o.partition("=")[0].strip() == "output.run_name" for o in overrides):
        raise SweepError("output.run_name cannot be an override: each run of a sweep is named after its combination")
    for warning in repeated_overrides(overrides):
        say(f"warning: {warning}")
    axes = parse_grid(grid)
    both = [k for k, _ in axes if any(o.partition("=")[0].strip() == k for o in overrides)]
    if both:
        raise SweepError(f"{', '.join(both)}: both a --grid axis and an override (the grid's values would replace "
                         "the override in every run); keep one of them")
    combos = combinations(axes)
    # Validate every combination before training any: a typo in the last one must not surface hours later.
    cfgs, problems = {}, {}
    for combo, ovr in combos:
        try:
            cfgs[combo] = load_config(config, list(overrides) + ovr)
        except ConfigError as e:
            problems.setdefault(str(e), []).append(combo)  # a mistake in the config: said once, not per run
    if problems:
        raise SweepError("the sweep has invalid combinations:\n" + "\n".join(
            f"{'every combination' if len(names) == len(combos) > 1 else ', '.join(names)}: {said}"
            for said, names in problems.items()))
    _refuse_same_config(cfgs)
    base = next(iter(cfgs.values()))
    name = name or default_sweep_name(config, axes, overrides)
    folder = sweep_dir(base.output.dir, name)
    with _sweep_lock(folder, name):
        return _run_locked(config, axes, combos, cfgs, folder, name, metric, overrides, train_fn, say)


def _refuse_same_config(cfgs: dict[str, Any]) -> None:
    """Two grid values that read as the same setting (`1e-4,0.0001`, `8,8.0`) would train one config twice."""
    seen: dict[str, str] = {}
    same = []
    for combo, cfg in cfgs.items():
        key = json.dumps(cfg.to_dict(), sort_keys=True)
        if key in seen:
            same.append(f"  - {seen[key]} and {combo}")
        seen.setdefault(key, combo)
    if same:
        raise SweepError("these combinations train the same config (their grid values read as the same setting); "
                         "drop the repeated values from --grid:\n" + "\n".join(same))


@contextmanager
def _sweep_lock(folder: Path, name: str):
    """One process at a time continues a sweep: a second one would train the same combinations beside the first
    and overwrite its sweep.json. An OS file lock in the sweep's folder, released when the process ends, even
    killed (every check that can refuse the sweep has run before: no folder is made for a refused one)."""
    from filelock import FileLock, Timeout

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # output.dir names a file, a read-only place, ...
        raise SweepError(f"cannot make the sweep folder {folder}: {e.strerror or e} (check output.dir)") from None
    lock = FileLock(folder / ".sweep.lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise SweepError(f"sweep {name!r} in {folder} is running now in another process; wait for it to end (or stop "
                         "it with Ctrl-C where it runs), then run the command again") from None
    try:
        yield
    finally:
        lock.release()


def _run_locked(config, axes, combos, cfgs, folder: Path, name: str, metric: str, overrides: Sequence[str],
                train_fn: Callable | None, say: Callable[[str], None]) -> SweepResult:
    from tunelab.rundir import now_iso
    from tunelab.runs import read_sweep_state

    state_path = folder / "sweep.json"
    state = read_sweep_state(state_path, SweepError) if state_path.is_file() else {
        "name": name, "config": config, "grid": [f"{k}={','.join(v)}" for k, v in axes],
        "overrides": list(overrides), "metric": metric, "created_at": now_iso(), "runs": {}}
    if state.get("grid") != [f"{k}={','.join(v)}" for k, v in axes] or state.get("overrides") != list(overrides):
        raise SweepError(f"sweep {name!r} in {folder} was started with another grid ({state.get('grid')}, overrides "
                         f"{state.get('overrides')}); pass --name to start a new sweep")
    changed = trained_from_another_config(folder, cfgs)
    if changed:
        combo, keys = next(iter(changed.items()))
        raise SweepError(f"sweep {name!r} in {folder} was started from another config ({state.get('config')} as it "
                         f"was then, with its overrides): {combo}/config.yaml differs in {', '.join(keys)}; its "
                         "results are not this config's. Pass another --name to start a new sweep")
    state.pop("config_hash", None)  # written by earlier versions; the runs' config.yaml is what is checked now
    state["metric"] = metric
    for combo, ovr in combos:
        state["runs"].setdefault(combo, {"overrides": ovr, "run_dir": str(folder / combo), "status": "pending"})
    _save(state_path, state)
    if train_fn is None:
        from tunelab.train.recipe import train as train_fn

    trained, skipped = [], []
    for i, (combo, ovr) in enumerate(combos, 1):
        entry, run_dir = state["runs"][combo], folder / combo
        status = _status(run_dir)
        if status in DONE:
            entry["status"] = status
            skipped.append(combo)
            say(f"[{i}/{len(combos)}] {combo}: already {status}, skipped")
            continue
        cfg = cfgs[combo]
        cfg.output.dir, cfg.output.run_name = str(folder), combo
        resume = str(run_dir) if status is not None else None
        say(f"[{i}/{len(combos)}] {combo}: {'resuming' if resume else 'training'} ({' '.join(ovr)})")
        entry.update(status="running", started_at=now_iso())
        _save(state_path, state)
        try:
            train_fn(cfg, resume=resume) if resume else train_fn(cfg)
        except KeyboardInterrupt:
            entry["status"] = "interrupted"
            _save(state_path, state)
            raise SweepError(f"sweep {name} interrupted during {combo}; run the same command again to continue "
                             "(finished runs are skipped)") from None
        except Exception as e:  # one bad combination (divergence, out of memory) does not end the sweep
            if type(e).__name__ == "TrainingInterrupted":
                entry["status"] = "interrupted"
                _save(state_path, state)
                raise SweepError(f"sweep {name} interrupted during {combo}; run the same command again to "
                                 "continue (finished runs are skipped)") from None
            entry.update(status=_status(run_dir) or "failed", error=f"{type(e).__name__}: {e}"[:500])
            say(f"  {combo} did not complete: {entry['error']}")
        else:
            entry.update(status=_status(run_dir) or "finished", error=None)
            trained.append(combo)
        entry["ended_at"] = now_iso()
        _save(state_path, state)
    result = SweepResult(name, folder, metric, sweep_rows(folder, state, metric), trained, skipped)
    state["ranking"] = [r.combo for r in result.rows if r.value is not None]  # runs without the metric are unranked
    _save(state_path, state)
    return result


def sweep_rows(folder: Path, state: dict[str, Any], metric: str) -> list[SweepRow]:
    from tunelab.runs import metric_direction, final_metrics

    rows = []
    for combo, entry in state["runs"].items():
        run_dir = folder / combo
        value = final_metrics(_manifest(run_dir) or {}).get(metric)
        rows.append(SweepRow(combo, run_dir, _status(run_dir) or str(entry.get("status", "pending")), value,
                             [str(o) for o in entry.get("overrides") or []], entry.get("error")))
    sign = -1 if metric_direction(metric) == "max" else 1
    return sorted(rows, key=lambda r: (r.value is None, sign * r.value if r.value is not None else 0))


def sweep_table(result: SweepResult):
    from rich.table import Table

    from tunelab.runs import fmt_num

    ranked = any(r.value is not None for r in result.rows)
    t = Table(title=f"sweep {result.name} — sorted by {result.metric} (best first)" if ranked else
              f"sweep {result.name} — not ranked: no run recorded a final {result.metric}")
    for col in ("rank", "run", *[o.split("=")[0] for o in (result.rows[0].overrides if result.rows else [])],
                "status", result.metric):
        t.add_column(col, justify="right" if col in ("rank", result.metric) else "left")
    for i, r in enumerate(result.rows, 1):
        t.add_row(str(i) if r.value is not None else "", r.combo, *[o.split("=", 1)[1] for o in r.overrides],
                  r.status, fmt_num(r.value))
    return t
