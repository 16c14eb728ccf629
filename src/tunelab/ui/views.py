"""What the web UI shows, read from run folders (the files are the single source of truth).

Every function here takes a run folder and returns plain JSON-able data built from `tunelab.runs`; nothing is
cached except by file modification time, so two browser tabs, the CLI and the UI always agree. A run folder that
is half-written, corrupt or from an older tunelab comes back with an `error`/`note` instead of raising.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tunelab import runs
from tunelab.errors import TunelabError
from tunelab.rundir import live_status  # the status rule `tunelab runs` shows too (stale: its process is gone)

NAME_MAX = 255  # bytes in one file name on Linux and macOS file systems
MEMORY_KEYS = ("memory_gib", "rss_gib", "peak_memory_gib", "cuda_memory_gib", "gpu_memory_gib")


class PathRefused(TunelabError):
    """A path parameter that points outside the folder it must stay in."""


def inside(root: Path, rel: str, what: str = "path") -> Path:
    """`root/rel`, refusing absolute paths, `..` and symlinks that lead out of `root`."""
    if not rel or os.path.isabs(rel) or "\\" in rel or any(p in ("..", "") for p in Path(rel).parts) \
            or "\x00" in rel:
        raise PathRefused(f"{what} {rel!r} must be a relative path inside {root}")
    if any(len(os.fsencode(p)) > NAME_MAX for p in Path(rel).parts):  # the OS would say "File name too long"
        raise TunelabError(f"{what} {rel[:40]!r}... has a name longer than {NAME_MAX} bytes")
    base = root.resolve()
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise PathRefused(f"{what} {rel!r} leads outside {root}")
    return target


def run_path(root: Path, name: str) -> Path:
    """The run folder `name` under `root` (output.dir): must stay inside it and hold manifest.json."""
    path = inside(root, name, "run")
    try:
        found = runs.is_run_dir(path)
    except OSError as e:  # a path the OS cannot look up (too long in all, ...)
        raise runs.RunError(f"no run {name[:60]!r}... under {root} ({e.strerror or e})") from None
    if not found:
        raise runs.RunError(f"no run {name!r} under {root}")
    return path


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _finite(v: Any) -> float | None:
    v = _num(v)
    return v if v is not None and math.isfinite(v) else None


class RunTable:
    """The runs table: one row per run folder, re-read only when a run's manifest or metrics file changes."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._cache: dict[Path, tuple[tuple, dict[str, Any]]] = {}

    def rows(self, jobs_by_run: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        jobs_by_run = jobs_by_run or {}
        out, seen = [], set()
        for path in runs.iter_run_dirs(self.root):
            seen.add(path)
            row = self._row(path)
            job = jobs_by_run.get(row["name"])
            # status depends on live processes, so it is recomputed every time (cheap: no file read)
            row = dict(row)
            if "manifest" in row:
                row["status"], row["note"] = live_status(row.pop("manifest"), job)
            out.append(row)
        for gone in set(self._cache) - seen:
            del self._cache[gone]
        return sorted(out, key=lambda r: r.get("created") or "", reverse=True)

    def _row(self, path: Path) -> dict[str, Any]:
        key = tuple(file_stamp(path / f) for f in ("manifest.json", "metrics.jsonl"))
        hit = self._cache.get(path)
        if hit and hit[0] == key:
            return hit[1]
        row = run_row(self.root, path)
        self._cache[path] = (key, row)
        return row


def file_stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
        return st.st_mtime_ns, st.st_size
    except OSError:
        return 0, 0


def best_eval_loss(run: Path, manifest: dict[str, Any]) -> float | None:
    """The lowest eval loss the run logged (only lines mentioning eval_loss are parsed); a NaN eval is no best."""
    best = _finite(manifest.get("best_eval_loss"))
    path = run / "metrics.jsonl"
    if best is None and path.is_file():
        values = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if '"eval_loss"' in line:
                    try:
                        values.append(_finite(json.loads(line).get("eval_loss")))
                    except ValueError:  # a torn last line
                        continue
        values = [v for v in values if v is not None]
        best = min(values) if values else None
    return best if best is not None else _finite(runs.final_metrics(manifest).get("eval_loss"))


def run_row(root: Path, path: Path) -> dict[str, Any]:
    """One row of the runs table; a manifest that cannot be read gives a row that says so."""
    name = str(path.relative_to(root))
    try:
        manifest = runs.read_manifest(path)
        if not isinstance(manifest, dict):
            raise runs.RunError(f"{path / 'manifest.json'} does not hold a JSON object")
        s = runs.summarize(path, manifest, root)
    except (runs.RunError, TypeError, ValueError, AttributeError) as e:
        return {"name": name, "status": "unreadable", "note": str(e), "model": "?", "method": "?", "data": "?"}
    m = s.metrics
    return {"name": name, "manifest": manifest, "model": s.model, "method": s.method, "data": s.data,
            "steps": s.steps if isinstance(s.steps, int) else None, "total_steps": manifest.get("total_steps"),
            "best_eval_loss": best_eval_loss(path, manifest), "perplexity": _num(m.get("perplexity")),
            "bleu": _num(m.get("bleu")), "train_loss": _num(m.get("train_loss")),
            "duration_s": _num(s.duration_s), "created": str(manifest.get("created_at") or s.started_at or _mtime_iso(path))}


def _mtime_iso(path: Path) -> str:
    import datetime as dt

    try:
        return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).isoformat(timespec="seconds")
    except OSError:
        return ""


# ---------------------------------------------------------------- one run


def _section(fn, *args) -> Any:
    """A section of the run page; a broken file gives {"error": ...} for that section only."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - whatever a damaged file raises, the rest of the page still shows
        return {"error": f"{type(e).__name__}: {e}"}


def read_jsonl(path: Path, limit: int = 200) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if not path.is_file():
        return out
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if len(out) >= limit:
                break
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                out.append(row)
    return out


def data_report(run: Path, manifest: dict[str, Any], workdir: Path) -> dict[str, Any] | None:
    """The prepared data's report (read / accepted / rejected) and its rejected records (file, line, reason)."""
    data = manifest.get("data") if isinstance(manifest.get("data"), dict) else {}
    candidates = [run / "data"]
    if data.get("folder"):
        candidates.append(workdir / str(data["folder"]))
    folder = next((c for c in candidates if (c / "report.json").is_file()), None)
    if folder is None:
        return None
    rep = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    keys = ("name", "records_read", "records_accepted", "records_rejected", "duplicates_removed", "usable",
            "problems", "warnings", "rejected_by_reason", "fingerprint")
    rejected = [{k: r.get(k) for k in ("source", "location", "reason", "category", "duplicate_of")}
                for r in read_jsonl(folder / "rejected.jsonl")]
    out = {k: rep.get(k) for k in keys}
    out.update(folder=str(folder), rejected=rejected, token_stats=rep.get("token_stats") and {
        k: v for k, v in rep["token_stats"].items() if k != "histogram"})
    return out


def evals(run: Path) -> list[dict[str, Any]]:
    out = []
    for name, ev in runs.read_evals(run).items():
        out.append({"name": name, "metrics": ev.get("metrics") or {}, "base_metrics": ev.get("base_metrics"),
                    "settings": {k: v for k, v in ev.items() if k not in ("metrics", "base_metrics")},
                    "predictions": read_jsonl(run / "eval" / f"{name}.predictions.jsonl", 100)})
    return out


def artefacts(run: Path, run_arg: str, manifest: dict[str, Any], jobs: list[dict[str, Any]]) -> list[dict]:
    """Each artefact of the run with the CLI command that made it: recorded when the UI ran it, else rebuilt
    from the manifest (marked `recorded: false`)."""
    import shlex

    # the train commands that wrote the checkpoints, oldest first (a stopped run and its resume)
    chain = [j["command"] for j in reversed(jobs) if j.get("kind") == "train"]
    train_job = chain or None
    cfg_path = manifest.get("config_path")
    train_cmd = "\n".join(chain) if chain else (
        f"tunelab train --config {shlex.quote(str(cfg_path))}" if cfg_path else "tunelab train")
    out = []
    for p in sorted(run.glob("checkpoint-*")):
        if p.is_dir():
            resumed = p.name != "checkpoint-final" and manifest.get("resumed_at")
            out.append({"path": p.name, "command": train_cmd, "recorded": bool(train_job),
                        "note": "resumable" if p.name[11:].isdigit() else "", "resumed": bool(resumed)})
    results = runs.read_evals(run)
    for p in sorted((run / "eval").glob("*.json")):
        job = next((j for j in jobs if j.get("kind") == "eval" and p.stem in j.get("outputs", [])), None)
        out.append({"path": f"eval/{p.name}", "recorded": bool(job), "command": job["command"] if job else
                    "tunelab " + shlex.join(eval_args(run, run_arg, p.stem, results.get(p.stem, {})))})
    for p in sorted(run.glob("report.*")):
        out.append({"path": p.name, "recorded": False,
                    "command": f"tunelab runs report {shlex.quote(run_arg)} -o {shlex.quote(run_arg + '/' + p.name)}"})
    for j in jobs:  # outputs written outside the run folder (merged models, GGUF files)
        if j.get("kind") in ("merge", "export", "report"):
            out.extend({"path": o, "command": j["command"], "recorded": True, "outside": True}
                       for o in j.get("outputs", []))
    return out


def eval_args(run: Path, run_arg: str, name: str, ev: dict[str, Any]) -> list[str]:
    """The `tunelab eval` arguments that write `eval/<name>.json` again, from what the result records it scored
    (the final adapter or a checkpoint, on its base or another model; which data and split; a base comparison)."""
    from tunelab.evaluate.runner import _default_name, _safe_name

    m = ev.get("model") if isinstance(ev.get("model"), dict) else {}
    data = ev.get("data") if isinstance(ev.get("data"), dict) else {}
    adapter, subject = m.get("adapter"), runs.eval_source(ev)
    model_only = bool(m.get("model") and not adapter)  # a model scored on this run's data into its eval/
    checkpoint = Path(str(adapter)).name if adapter else ""  # else the run (its checkpoint-final, or itself)
    in_run = checkpoint.startswith("checkpoint-") and checkpoint != "checkpoint-final"
    args = ["eval"] if model_only else ["eval", "--adapter", os.path.join(run_arg, checkpoint) if in_run else run_arg]
    on_other = bool(adapter and subject and (subject.startswith("on ") or " on " in subject))
    if on_other or model_only:  # no adapter, or the adapter put on another model than its base
        args += ["--model", str(m["model"])]
    data_path = str(data.get("path") or run)
    own = data_path in (str(run), str(m.get("run"))) or Path(data_path).resolve() == run.resolve()
    split = str(data.get("split") or "val")
    if not own or model_only:
        args += ["--data", run_arg if own else data_path]
    if model_only:
        args += ["--output-dir", os.path.join(run_arg, "eval")]
    if split == "train":
        args += ["--split", "train"]
    if ev.get("base_metrics") is not None:
        args.append("--compare-base")
        if adapter and not on_other and m.get("base_model") and m.get("model") and m["base_model"] != m["model"]:
            args += ["--base", str(m["base_model"])]
    default = _default_name(str(run) if own else data_path, None if model_only else run, split, subject)
    if name != _safe_name(default):
        args += ["--name", name]
    trained = run / (checkpoint if in_run else "checkpoint-final")  # its tunelab.json: the dtype eval takes
    return args + _setting_args(run, trained if trained.is_dir() else None, ev.get("settings"))


def _setting_args(run: Path, adapter: Path | None, settings: Any) -> list[str]:
    """--metrics / --max-length / --max-new-tokens / --max-samples / --dtype where the result was scored with other
    values than `tunelab eval` takes from the run's config and adapter."""
    import yaml

    from tunelab.evaluate.runner import EVAL_DEFAULTS, eval_defaults, normalize_metrics

    if not isinstance(settings, dict):
        return []
    try:
        defaults = eval_defaults(adapter, run)
        defaults["metrics"] = normalize_metrics(defaults["metrics"])
    except (OSError, ValueError, AttributeError, TypeError, TunelabError, yaml.YAMLError):  # unreadable: eval's own
        defaults = dict(EVAL_DEFAULTS)
    asked = {**settings, "max_length": settings.get("max_length_asked", settings.get("max_length"))}
    if "max_samples" not in settings:  # no generation metric was asked: nothing generated, nothing to repeat
        asked.pop("max_new_tokens", None)
    args = []
    for key in ("metrics", "max_length", "max_new_tokens", "max_samples", "dtype"):
        value = asked.get(key)
        if value is None or value == defaults.get(key):
            continue
        value = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        args += ["--" + key.replace("_", "-"), value]
    return args


def run_detail(root: Path, name: str, run_arg: str, workdir: Path, jobs: list[dict[str, Any]]) -> dict:
    """Everything the run page shows. Each section is read on its own so one broken file breaks one section."""
    path = run_path(root, name)
    try:
        manifest = runs.read_manifest(path)
        manifest = manifest if isinstance(manifest, dict) else {}
        manifest_error = None
    except runs.RunError as e:
        manifest, manifest_error = {}, str(e)
    train_jobs = [j for j in jobs if j.get("kind") == "train"]  # newest first; an eval job says nothing of training
    live = [j for j in train_jobs if j.get("returncode") is None]
    status, note = live_status(manifest, (live or train_jobs or [None])[0]) \
        if not manifest_error else ("unreadable", manifest_error)
    config_file = path / "config.yaml"
    # the records and the offset the live stream continues from come from one read of complete lines: a line
    # written between a read and a separate size check (or still being written) would never reach the page
    metrics, metrics_offset, _ = metrics_since(path / "metrics.jsonl", 0)
    return {
        "name": name, "path": str(path), "run_arg": run_arg, "status": status, "note": note,
        "manifest": manifest, "manifest_error": manifest_error,
        "config_yaml": config_file.read_text(encoding="utf-8", errors="replace") if config_file.is_file() else None,
        "data": _section(data_report, path, manifest, workdir),
        "evals": _section(evals, path),
        "artefacts": _section(artefacts, path, run_arg, manifest, jobs),
        "metrics": metrics,
        "metrics_offset": metrics_offset,
        "log_tail": tail(path / "train.log"),
        "resumable": any(p.name[11:].isdigit() for p in path.glob("checkpoint-*")),
        "jobs": jobs,
    }


def tail(path: Path, max_bytes: int = 8000) -> str:
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - max_bytes))
        return f.read().decode("utf-8", errors="replace")


def metrics_since(path: Path, offset: int) -> tuple[list[dict[str, Any]], int, bool]:
    """(new metric records, new offset, reset): only complete lines after byte `offset`. `reset` is True when
    the file shrank (a resumed run drops the lines after its checkpoint): the caller re-reads from 0."""
    size = file_stamp(path)[1] if path.is_file() else 0  # a folder or device in its place: no metrics
    reset = size < offset
    if reset:
        offset = 0
    if size == offset:
        return [], offset, reset
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read(size - offset)
    except OSError:  # unreadable (permissions, removed meanwhile): nothing new this time
        return [], offset, reset
    end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next poll
    records = []
    for line in chunk[:end].splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records, offset + end, reset
