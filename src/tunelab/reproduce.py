"""Repeat a finished run from its own folder and measure how far the repeat lands from the original.

    tunelab reproduce outputs/my-run        # -> outputs/my-run-repro, and the largest loss-curve difference

An interrupted reproduction is continued (from its last checkpoint) by running the same command again.

The run's resolved `config.yaml` is trained again unchanged (same seed, same data settings) into `<name>-repro`
beside it. Before anything runs, the data on disk is fingerprinted exactly as training does it and compared with
the fingerprint in the run's manifest: if the data changed, the run cannot be reproduced and we refuse. On CPU
with the same versions the two loss curves are identical (difference 0); across GPUs or library versions small
differences are expected, and the hardware and versions of both runs are reported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tunelab.errors import TunelabError


class ReproduceError(TunelabError):
    """The run cannot be reproduced as it stands (changed data, unfinished run, missing files)."""


@dataclass
class CurveDiff:
    max_abs_diff: float | None  # over the train-loss points both runs logged
    eval_max_abs_diff: float | None  # over the eval-loss points both runs logged
    steps_compared: int
    only_in_original: list[int] = field(default_factory=list)
    only_in_repro: list[int] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return (self.steps_compared > 0 and self.max_abs_diff == 0 and self.eval_max_abs_diff in (0, None)
                and not self.only_in_original and not self.only_in_repro)


@dataclass
class ReproResult:
    original: Path
    reproduction: Path
    diff: CurveDiff
    final_original: dict[str, float]
    final_repro: dict[str, float]
    notes: list[str] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float | None:
        return self.diff.max_abs_diff


Curves = tuple[dict[int, float], dict[int, float]]  # (train loss, eval loss) by step


def loss_curves(run: Path) -> Curves:
    """The train-loss and eval-loss points a run logged (the final summary line is not a step of its own)."""
    from tunelab.runs import curve, read_metrics

    records = read_metrics(run)
    return dict(curve((r for r in records if not r.get("final")), "loss")), dict(curve(records, "eval_loss"))


def curve_diff(a: Curves, b: Curves) -> CurveDiff:
    """Largest |difference| between two runs' train losses (and eval losses), step by step."""
    (ta, ea), (tb, eb) = a, b
    common = sorted(set(ta) & set(tb))
    ecommon = sorted(set(ea) & set(eb))
    return CurveDiff(
        max_abs_diff=max((abs(ta[s] - tb[s]) for s in common), default=None),
        eval_max_abs_diff=max((abs(ea[s] - eb[s]) for s in ecommon), default=None),
        steps_compared=len(common),
        only_in_original=sorted(set(ta) - set(tb)), only_in_repro=sorted(set(tb) - set(ta)))


def loss_curve_diff(original: Path, repro: Path) -> CurveDiff:
    """How far the loss curves of two run folders lie apart (see curve_diff)."""
    return curve_diff(loss_curves(original), loss_curves(repro))


def data_fingerprint(cfg, run_name: str) -> str:
    """Fingerprint the data on disk exactly as training does: a prepared folder's own fingerprint, or the raw
    files checked afresh by `prepare_dataset(check=True)` with the run's settings and tokenizer (writes nothing)."""
    from tunelab.data.prepare import is_prepared, load_prepared
    from tunelab.model.loading import load_tokenizer
    from tunelab.train.inputs import prepare_as_configured

    src = Path(cfg.data.train)
    if is_prepared(src):
        return load_prepared(src).fingerprint
    tok = load_tokenizer(cfg.model.name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code,
                         chat_template=cfg.model.chat_template)
    try:
        result = prepare_as_configured(cfg, tok, src, None, run_name, check=True, console=lambda *_: None)
    except TunelabError as e:
        raise ReproduceError(f"cannot read the run's training data {cfg.data.train} (relative paths are read from "
                             f"the current folder, {Path.cwd()}):\n{e}") from None
    return result.report["fingerprint"]


def check_reproducible(run: Path, fingerprint_fn: Callable | None = None):
    """The run's config, after checking it finished, its seed and that its data is unchanged on disk."""
    from tunelab.rundir import live_status, resume_command
    from tunelab.runs import read_manifest

    manifest = read_manifest(run)
    status = live_status(manifest)[0]
    if status != "finished":
        hint = f"; continue it with: {resume_command(run)}" if status in ("interrupted", "failed", "stale") \
            else ""
        raise ReproduceError(f"{run} has status {status!r}: only a finished run can be reproduced{hint}")
    cfg = _run_config(run, manifest)
    _same_as_manifest(cfg, run, manifest)
    recorded = manifest.get("data_fingerprint")
    if not recorded:
        raise ReproduceError(f"{run}/manifest.json records no data_fingerprint, so the data cannot be checked")
    now = (fingerprint_fn or data_fingerprint)(cfg, run.name)
    if now != recorded:
        raise ReproduceError(
            f"the data changed since {run.name} was trained, so it cannot be reproduced:\n"
            f"  {cfg.data.train}: fingerprint now {now[:16]}, at training time {recorded[:16]}.\n"
            "Restore the original data (same file, same records), or train a new run on the new data.")
    _same_eval_data(cfg, run, manifest)
    return cfg, manifest


def _same_as_manifest(cfg, run: Path, manifest: dict) -> None:
    """config.yaml says what the repeat trains; the manifest what the original trained. Where both name a setting
    and they differ, the folder was edited after the run and the repeat would not be a repeat."""
    recorded = {"seed": cfg.training.seed, "method": cfg.training.method, "stage": cfg.training.stage,
                "model": cfg.model.name}
    edited = [f"{key} {manifest[key]!r} in manifest.json, {now!r} in config.yaml" for key, now in recorded.items()
              if manifest.get(key) is not None and manifest[key] != now]
    if edited:
        raise ReproduceError(f"{run}: config.yaml was edited after the run ({'; '.join(edited)}), so the repeat "
                             "would train something else; restore the run's config.yaml, or train a new run with "
                             "the new settings")


def _same_eval_data(cfg, run: Path, manifest: dict) -> None:
    """A separate prepared data.eval (outside the data fingerprint) still holds the held-out records the run
    evaluated on: its eval losses drove early stopping and checkpoint-best."""
    from tunelab.data.prepare import is_prepared, load_prepared

    recorded = (manifest.get("data") or {}).get("eval_fingerprint")
    if not recorded or not cfg.data.eval:
        return
    now = load_prepared(cfg.data.eval).fingerprint if is_prepared(cfg.data.eval) else "(not a prepared folder now)"
    if now != recorded:
        raise ReproduceError(f"the eval data changed since {run.name} was trained, so it cannot be reproduced:\n"
                             f"  {cfg.data.eval}: fingerprint now {now[:16]}, at training time {recorded[:16]}.\n"
                             "Restore the original eval data, or train a new run on the new data.")


def _run_config(run: Path, manifest: dict):
    import yaml

    from tunelab.config import ConfigError, load_run_config
    from tunelab.rundir import package_versions

    if not (run / "config.yaml").is_file():
        raise ReproduceError(f"{run} has no config.yaml: the run records what it trained with there, and without it "
                             "the run cannot be repeated")
    try:
        return load_run_config(run / "config.yaml")
    except yaml.YAMLError as e:  # load_run_config parses the file before load_config's check, which says it better
        raise ReproduceError(f"{run / 'config.yaml'} is not valid YAML ({str(e).splitlines()[0]}): the run records "
                             "what it trained with there; restore the file to reproduce it") from None
    except ConfigError as e:
        then, now = (manifest.get("versions") or {}).get("tunelab"), package_versions()["tunelab"]
        if not then or then == now:
            raise
        raise ReproduceError(f"{e}\nThe run was trained by tunelab {then}, and this is tunelab {now}, which does not "
                             f"read its config.yaml as it stands: repeat it with tunelab {then}") from None


def _repro_name(parent: Path, name: str) -> tuple[str, bool]:
    """The folder the repeat goes to, and whether it continues an interrupted repeat there: `<name>-repro`, or the
    next free `-reproN`."""
    from tunelab.rundir import run_status
    from tunelab.runs import RunError, read_manifest

    candidate, k = f"{name}-repro", 2
    while (parent / candidate).exists():
        try:
            if run_status(read_manifest(parent / candidate)) == "interrupted":
                return candidate, True
        except RunError:
            pass
        candidate, k = f"{name}-repro{k}", k + 1
    return candidate, False


def reproduce(run: str | os.PathLike, *, runs_dir: str | os.PathLike = "outputs", name: str | None = None,
              train_fn: Callable | None = None, fingerprint_fn: Callable | None = None) -> ReproResult:
    """Train `run` again from its folder into `<run>-repro` and compare the two loss curves."""
    from tunelab.runs import final_metrics, read_manifest, resolve_run

    original = resolve_run(run, runs_dir)
    if name and (original.parent / name / "manifest.json").exists():  # found before the data is fingerprinted
        taken = "the run itself" if (original.parent / name).resolve() == original.resolve() else "a run"
        raise ReproduceError(f"--name {name}: {original.parent / name} is {taken}; the repeat goes beside the "
                             f"original, so give a name not taken there (or none: {original.name}-repro)")
    cfg, manifest = check_reproducible(original, fingerprint_fn)
    before = loss_curves(original)  # read now: a damaged file is reported before the repeat, not after it
    cfg.output.dir = str(original.parent)
    resume = False
    if name:
        cfg.output.run_name = name
    else:
        cfg.output.run_name, resume = _repro_name(original.parent, original.name)
    if train_fn is None:
        from tunelab.train.recipe import train as train_fn
    from tunelab.train.lifecycle import TrainingInterrupted
    from tunelab.runtime import FIRST_LEVERS, FORMERLY_OPT_IN, LEVERS, OPT_IN, levers_as_recorded

    notes = []
    recorded_dtype = (manifest.get("dtype") or {}).get("name")
    if cfg.model.dtype == "auto" and recorded_dtype:  # `auto` may pick another precision on this machine
        cfg.model.dtype = recorded_dtype
        notes.append(f"model.dtype auto → {recorded_dtype}, the precision the original trained in")
    runtime = manifest.get("runtime") or {}
    off = runtime.get("levers_off")
    if off is None:  # trained before tunelab's CPU speed levers existed: their fast dropout masks would differ
        off = list(LEVERS)
        notes.append("the original predates tunelab's CPU speed levers: reproduced with them off")
    known = runtime.get("levers_known") or FIRST_LEVERS
    on = runtime.get("levers_on") or []
    newer = [x for x in LEVERS if x not in known and x not in off and x not in OPT_IN]
    if newer:  # levers added after the original ran: off, as the original had none of them (opt-in ones are off)
        off = [*off, *newer]
        notes.append(f"levers added since the original ran, reproduced off: {', '.join(newer)}")
    opt_in_then = runtime.get("opt_in", FORMERLY_OPT_IN if "levers_on" in runtime else [])
    was_off = [x for x in FORMERLY_OPT_IN if x in opt_in_then and x in known and x not in on and x not in off]
    if was_off:  # opt-in then, and not asked for: off then
        off = [*off, *was_off]
        notes.append(f"levers opt-in when the original ran and off in it, reproduced off: {', '.join(was_off)}")
    folder = original.parent / cfg.output.run_name
    try:
        with levers_as_recorded(off, on):
            repro = Path(train_fn(cfg, resume=str(folder)) if resume else train_fn(cfg))
    except (KeyboardInterrupt, TrainingInterrupted):  # exit code 130, as an interrupted train
        raise TrainingInterrupted(f"the reproduction {folder} was interrupted; run `tunelab reproduce {original}` "
                                  "again to continue it from its last checkpoint and record the comparison") from None
    rmanifest = read_manifest(repro)
    if rmanifest.get("data_fingerprint") != manifest.get("data_fingerprint"):
        notes.append("the reproduction saw a different data fingerprint than the original")
    for key in ("hardware", "versions"):
        if manifest.get(key) and rmanifest.get(key) and manifest[key] != rmanifest[key]:
            changed = sorted(k for k in set(manifest[key]) | set(rmanifest[key])
                             if manifest[key].get(k) != rmanifest[key].get(k))
            notes.append(f"{key} differ ({', '.join(changed)}): small loss differences are expected")
    result = ReproResult(original, repro, curve_diff(before, loss_curves(repro)), final_metrics(manifest),
                         final_metrics(rmanifest), notes)
    summary = {"original": str(original), "max_abs_diff": result.diff.max_abs_diff,
               "eval_max_abs_diff": result.diff.eval_max_abs_diff, "steps_compared": result.diff.steps_compared,
               "identical": result.diff.identical, "notes": notes}
    from tunelab.rundir import RunDir

    RunDir(repro).update_manifest(reproduction_of=summary)  # the repeat records what it repeated and how closely
    return result
