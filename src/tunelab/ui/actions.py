"""Routes that act: new runs from the form, stop / resume / eval / merge / export / report, datasets, chat.

Each action is an ordinary `tunelab` command started through `Jobs` (its own process, its command shown and
saved), or a call to the same library function the CLI calls (dataset validation, chat generation).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from tunelab import runs
from tunelab.data.prepare import DATA_SUFFIXES as DATA_FILE_SUFFIXES
from tunelab.data.readers import data_suffix
from tunelab.data.text import TEXT_SUFFIXES
from tunelab.errors import TunelabError
from tunelab.rundir import LIVE_STATUSES, pid_alive, run_status
from tunelab.ui import forms, views
from tunelab.ui.jobs import JobError

CONFIG_DIR = "configs"  # where New run saves configs (relative to the working folder)
# what prepare reads (pretraining text too), each also gzip-compressed: data.jsonl.gz (tunelab.data.readers)
DATA_SUFFIXES = tuple(sorted(DATA_FILE_SUFFIXES | TEXT_SUFFIXES))
RUN_ACTIONS = ("stop", "resume", "eval", "merge", "export", "report")


class ConfigRequest(BaseModel):
    values: dict[str, Any] | None = None  # form values (dotted key -> value); or
    yaml: str | None = None  # the YAML text as edited
    config_path: str | None = None


class ActionRequest(BaseModel):
    name: str
    action: str


class CompareRequest(BaseModel):
    names: list[str]


class ValidateRequest(BaseModel):
    path: str
    format: str = "auto"
    model: str | None = None  # a model whose tokenizer gives token statistics; None: no tokenizer


# Chat request limits: far above any context the models trained here take (a longer conversation is cut to fit
# the context anyway), low enough that one request cannot make the server tokenize megabytes.
CHAT_TEXT_CHARS = 100_000  # one prompt, system prompt or earlier turn
CHAT_TURNS = 500  # earlier turns kept per side


class ChatTurn(BaseModel):
    role: str = Field(max_length=16)
    content: str = Field(max_length=CHAT_TEXT_CHARS)


class ChatRequest(BaseModel):
    target: str  # a run name under output.dir, or a model folder inside the working folder
    prompt: str = Field(max_length=CHAT_TEXT_CHARS)
    system: str | None = Field(None, max_length=CHAT_TEXT_CHARS)
    history: dict[Literal["base", "tuned"], Annotated[list[ChatTurn], Field(max_length=CHAT_TURNS)]] = Field(
        default_factory=lambda: {"base": [], "tuned": []})
    max_new_tokens: int = Field(128, ge=1, le=2048)
    temperature: float = Field(0.0, ge=0)


def _ui(request: Request):
    return request.app.state.ui


def add_routes(app: FastAPI) -> None:
    _config_routes(app)
    _run_routes(app)
    _data_routes(app)
    _chat_routes(app)


# ---------------------------------------------------------------- new run


def _prepare(ui, req: ConfigRequest) -> dict[str, Any]:
    """Form values or YAML text -> YAML, the config file path, the `tunelab train` command and any error."""
    if req.yaml is None:
        values = dict(req.values or {})
        if not str(values.get("output.run_name") or "").strip():
            values["output.run_name"] = _default_run_name(values)
        data = forms.values_to_data(values)
        text = forms.to_yaml(data)
    else:
        text = req.yaml
    name = _run_name_in(text) or "run"
    config_path = req.config_path or f"{CONFIG_DIR}/{name}.yaml"
    path = config_file(ui, config_path)
    cfg, error = forms.check_config(text, config_path)
    args = forms.train_command(config_path)
    out = {"yaml": text, "config_path": config_path, "error": error, "command": forms.shown(args), "args": args}
    if cfg is not None and not cfg.output.run_name:
        # fix the name now (as a command-line override, the file stays as written) so the UI knows the folder
        name = _default_run_name({"model.name": cfg.model.name, "training.method": cfg.training.method})
        if req.config_path is None:  # the config file takes the run's name (not configs/run.yaml for every run)
            config_path = f"{CONFIG_DIR}/{name}.yaml"
            path, args = config_file(ui, config_path), forms.train_command(config_path)
            out.update(config_path=config_path)
        args.append(f"output.run_name={name}")
        cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"run_name": name})})
        out.update(command=forms.shown(args), args=args)
    if cfg is not None:
        out["run"] = _run_under_root(ui, cfg)
        problems = [p for p in (_config_conflict(path, config_path, text), _run_folder_problem(ui, cfg)) if p]
        out["error"] = "\n".join(problems) or None
    return out


def config_file(ui, rel: str) -> Path:
    """The config file a new run writes: a .yaml / .yml file under the working folder's configs/, nowhere else
    (the form must never replace a dataset or any other file)."""
    path = views.inside(ui.workdir, rel, "config file")
    if (ui.workdir / CONFIG_DIR).resolve() not in path.parents or path.suffix.lower() not in (".yaml", ".yml"):
        raise views.PathRefused(f"config file {rel!r}: a new run's config is a .yaml or .yml file under "
                                f"{CONFIG_DIR}/")
    return path


def _config_conflict(path: Path, rel: str, text: str) -> str | None:
    """Why `text` cannot be saved as `path`: a file of other content is there (it is never replaced)."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return None  # the same config again: nothing to write
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        pass
    return f"config file {rel} already exists with other content; pick another config file name (it is kept)"


def _run_folder_problem(ui, cfg) -> str | None:
    """What `tunelab train` would refuse about the run folder, said before anything is written."""
    name = cfg.output.run_name  # a plain folder name: the config refuses a path (config.OutputConfig)
    folder = ui.workdir / cfg.output.dir / name
    shown = os.path.join(cfg.output.dir, name)
    try:
        taken = folder.is_dir() and any(folder.iterdir())
    except OSError as e:
        return f"run folder {shown} cannot be read ({e.strerror or e}); pick another output.run_name"
    if taken or folder.exists() and not folder.is_dir():
        return f"run folder {shown} already exists; pick another output.run_name (or resume that run from its page)"
    return None


def _default_run_name(values: dict[str, Any]) -> str:
    from tunelab.rundir import default_run_name

    try:  # the name training would pick, fixed now so the UI knows which folder the run will write
        return default_run_name(_partial_config(values))
    except Exception:  # noqa: BLE001 - an invalid form: validation reports it, any name will do
        return "run"


def _partial_config(values: dict[str, Any]):
    from tunelab.config import Config

    cfg = Config()
    cfg.model.name = str(values.get("model.name") or cfg.model.name)
    cfg.training.method = str(values.get("training.method") or cfg.training.method)
    return cfg


def _run_name_in(text: str) -> str | None:
    import yaml

    try:
        data = yaml.safe_load(text) or {}
        name = (data.get("output") or {}).get("run_name")
    except Exception:  # noqa: BLE001 - invalid YAML: check_config says why
        return None
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)) if name else None


def _run_under_root(ui, cfg) -> str | None:
    """The run's name under the UI's output.dir, or None when the config writes it somewhere else."""
    if not cfg.output.run_name:
        return None
    folder = (ui.workdir / cfg.output.dir / cfg.output.run_name).resolve()
    try:
        return str(folder.relative_to(ui.root))
    except ValueError:
        return None


def _config_routes(app: FastAPI) -> None:
    @app.get("/api/schema")
    def schema(request: Request):
        ui = _ui(request)
        sections = forms.form_schema()
        for s in sections:  # the form starts from this UI's runs folder, so new runs show in its table
            for f in s["fields"]:
                if f["key"] == "output.dir":
                    f["value"] = ui.dir_arg
        return {"sections": sections}

    @app.post("/api/config/render")
    def render(request: Request, req: ConfigRequest):
        return _prepare(_ui(request), req)

    @app.post("/api/train")
    def train(request: Request, req: ConfigRequest):
        ui = _ui(request)
        out = _prepare(ui, req)
        if out["error"]:
            return out
        out["error"] = _save_config(config_file(ui, out["config_path"]), out["config_path"], out["yaml"])
        if not out["error"]:
            out["job"] = ui.jobs.start(out["args"], kind="train", run=out.get("run"))
        return out


def _save_config(path: Path, rel: str, text: str) -> str | None:
    """Write a new config file (never replacing one: `x` mode also covers a file made since the check);
    the error, or None."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x", encoding="utf-8") as f:
            f.write(text)
    except FileExistsError:
        if path.exists():
            return _config_conflict(path, rel, text)
        return f"cannot write config file {rel}: {path.parent} is not a folder"
    except OSError as e:
        return f"cannot write config file {rel}: {e.strerror or e}"
    return None


# ---------------------------------------------------------------- run actions


def _datasets_in(workdir: Path, base: Path) -> list[dict[str, Any]]:
    """Data files and prepared folders directly in `base` (none when it is not a folder)."""
    found = []
    for p in sorted(base.iterdir()) if base.is_dir() else ():
        rel = str(p.relative_to(workdir))
        if p.is_file() and is_data_file(p):
            found.append({"path": rel, "kind": "file", "bytes": p.stat().st_size})
        elif p.is_dir() and (p / "train.jsonl").is_file():
            found.append({"path": rel, "kind": "prepared"})
    return found


def _model_folders(root: Path, depth: int = 4) -> list[Path]:
    """Model folders (a config.json) under `root`, nested ones too (a nested run `a/b` merges into
    models/a/b-merged); a model folder's own sub-folders are not searched."""
    if depth < 0 or not root.is_dir():
        return []
    try:
        subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:  # a folder we may not read: its models are not offered
        return []
    models = [p for p in subs if (p / "config.json").is_file()]
    return sorted(models + [m for p in subs if p not in models for m in _model_folders(p, depth - 1)])


def _merged_dir(name: str) -> str:
    """models/<run name>-merged; a nested run `a/b` merges into models/a/b-merged (not models/a-b-merged, which
    is run `a-b`'s)."""
    return f"models/{name}-merged"


def _merged_from_run(ui, merged: str, name: str) -> None:
    """Export only what tunelab merge made from this run: the folder may be a merge of another run (a same-named
    run removed and made again elsewhere) or not a merge at all."""
    try:
        source = json.loads((ui.workdir / merged / "tunelab.json").read_text(encoding="utf-8"))["merged_from"]
        source = (ui.workdir / str(source)).resolve()
    except (OSError, ValueError, KeyError, TypeError):
        raise JobError(f"{merged} was not written by tunelab merge (no readable tunelab.json with merged_from): "
                       "merge this run first") from None
    run = views.run_path(ui.root, name).resolve()
    if source != run and run not in source.parents:
        raise JobError(f"{merged} holds a merge of {source}, not of run {name}: merge this run first")


def run_command(ui, name: str, action: str) -> tuple[list[str], list[str]]:
    """(tunelab arguments, outputs) of a run action: the same command a person would type."""
    run_arg = ui.run_arg(name)
    merged = _merged_dir(name)
    legacy = f"models/{name.replace('/', '-')}-merged"  # where a nested run's merge went before
    if action == "export" and not (ui.workdir / merged).is_dir() and (ui.workdir / legacy).is_dir():
        merged = legacy  # exported only if its tunelab.json says it was merged from this run (below)
    if action == "resume":
        return ["train", "--resume", run_arg], []
    if action == "eval":
        return ["eval", "--adapter", run_arg, "--compare-base"], ["val"]
    if action == "merge":
        return ["merge", "--adapter", run_arg, "--output", merged], [merged]
    if action == "export":
        if not (ui.workdir / merged).is_dir():
            raise JobError(f"export needs a merged model: merge first (expected {merged})")
        _merged_from_run(ui, merged, name)
        gguf = f"models/{name}.gguf"
        return ["export", "--model", merged, "--format", "gguf", "--output", gguf], [gguf]
    if action == "report":
        report = f"{run_arg}/report.html"
        return ["runs", "report", run_arg, "-o", report], [report]
    raise TunelabError(f"unknown action {action!r}; one of {', '.join(RUN_ACTIONS)}")


def stop_run(ui, name: str) -> dict[str, Any]:
    """SIGINT to the training process, as Ctrl-C: the UI's own job, else the pid the manifest records."""
    path = views.run_path(ui.root, name)
    live = [j for j in ui.jobs.for_run(name) if j.get("kind") == "train" and j["state"] == "running"]
    if live:
        return {"stopped": live[0]["id"], "command": "Ctrl-C (SIGINT) to: " + live[0]["command"],
                "job": ui.jobs.stop(live[0]["id"])}
    manifest = runs.read_manifest(path)
    pid = manifest.get("pid")
    alive = pid_alive(pid, manifest.get("pid_started"))  # False too for a process that got a dead run's pid
    if alive and run_status(manifest) in LIVE_STATUSES:
        started = manifest.get("pid_started")
        ui.jobs.interrupt(pid, started if isinstance(started, (int, float)) else None, name)
        return {"stopped": pid, "command": f"kill -INT {pid}"}
    if alive is False and run_status(manifest) in LIVE_STATUSES:
        raise JobError(f"{name} is not training: its process {pid} is gone (killed?); resume it to continue")
    if run_status(manifest) not in LIVE_STATUSES:
        raise JobError(f"{name} is not training (status {run_status(manifest)}); nothing to stop")
    raise JobError(f"{name} has no training process this UI can reach; press Ctrl-C where it runs")


def _refuse_live_run(ui, name: str) -> None:
    """A run whose recorded training process is alive (started from a terminal, or by another UI) is not resumed
    a second time: that process holds the run folder's lock, and the resume would only fail on it."""
    manifest = runs.read_manifest(views.run_path(ui.root, name))
    pid = manifest.get("pid")
    if run_status(manifest) in LIVE_STATUSES and pid_alive(pid, manifest.get("pid_started")):
        raise JobError(f"{name} is being trained right now (process {pid}); stop it first, then resume")


def _run_routes(app: FastAPI) -> None:
    @app.post("/api/run/action")
    def action(request: Request, req: ActionRequest):
        ui = _ui(request)
        views.run_path(ui.root, req.name)
        if req.action == "stop":
            return stop_run(ui, req.name)
        if req.action == "resume":
            _refuse_live_run(ui, req.name)
        args, outputs = run_command(ui, req.name, req.action)
        kind = "train" if req.action == "resume" else req.action
        job = ui.jobs.start(args, kind=kind, run=req.name, outputs=outputs)
        return {"job": job, "command": job["command"]}

    @app.post("/api/compare/export")
    def compare_export(request: Request, req: CompareRequest):
        """`tunelab runs compare A B ...`: its output, saved with the job, is the exported comparison."""
        ui = _ui(request)
        for n in req.names:
            views.run_path(ui.root, n)
        job = ui.jobs.start(["runs", "compare", *[ui.run_arg(n) for n in req.names]], kind="compare")
        return {"job": job, "command": job["command"]}

    @app.post("/api/jobs/{job_id}/stop")
    def stop_job(request: Request, job_id: str):
        return _ui(request).jobs.stop(job_id)


# ---------------------------------------------------------------- datasets


def _data_routes(app: FastAPI) -> None:
    @app.get("/api/datasets")
    def datasets(request: Request):
        ui = _ui(request)
        found, notes = [], []
        for folder in ("data/raw", "data/processed", "data"):
            try:
                found += _datasets_in(ui.workdir, ui.workdir / folder)
            except OSError as e:  # a folder we may not read is named, the others still listed
                notes.append(f"cannot list {folder}/: {e.strerror or e}")
        # what the upload's file picker offers: what prepare reads, and .gz (pickers match the last suffix only;
        # the upload itself checks the one under it)
        return {"datasets": found, "accept": [*DATA_SUFFIXES, ".gz"], "notes": notes}

    @app.put("/api/datasets/upload")
    async def upload(request: Request, name: str):
        """The file's bytes as the request body, saved under data/raw/ (never replacing a file)."""
        ui = _ui(request)
        clean = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name)[-views.NAME_MAX + 8:].lstrip(".")  # room for -N
        if not clean or not is_data_file(Path(clean)):
            raise TunelabError(f"{name!r}: a dataset file ends in one of {', '.join(DATA_SUFFIXES)} (or one of "
                               "these and .gz)")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > ui.max_upload_bytes:
            raise TooLarge(_too_large(name, ui.max_upload_bytes))
        folder = ui.workdir / "data" / "raw"
        part = folder / f".upload-{secrets.token_hex(8)}.part"  # hidden, not listed, until it is complete
        try:
            folder.mkdir(parents=True, exist_ok=True)
            size = 0
            with open(part, "xb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > ui.max_upload_bytes:
                        raise TooLarge(_too_large(name, ui.max_upload_bytes))
                    f.write(chunk)
            if size == 0:
                raise TunelabError(f"{name!r} is empty: nothing to upload")
            return {"path": str(_link_free_name(part, folder / clean).relative_to(ui.workdir))}
        except OSError as e:  # data/raw is a file, not writable, the disk is full...
            raise TunelabError(f"cannot save {clean!r} in data/raw/: {e.strerror or e}") from None
        finally:
            if folder.is_dir():
                part.unlink(missing_ok=True)

    @app.post("/api/datasets/validate")
    def validate(request: Request, req: ValidateRequest):
        return validate_dataset(_ui(request), req)


def is_data_file(path: Path) -> bool:
    """A file name prepare reads as data: train.jsonl, train.jsonl.gz, corpus.txt."""
    return data_suffix(path) in DATA_SUFFIXES


class TooLarge(TunelabError):
    """A request body over the UI's limit (HTTP 413)."""


def _too_large(name: str, limit: int) -> str:
    return (f"{name!r} is larger than the upload limit of {limit // 2**20} MiB; copy it into data/raw/ instead, or "
            "start tunelab ui with a larger --max-upload-mb")


def _link_free_name(part: Path, target: Path) -> Path:
    """`part` under the name `target`, or NAME-2, NAME-3... when taken (a link never replaces a file); the number
    goes before the whole data suffix (x-2.jsonl.gz: x.jsonl-2.gz would no longer read as JSON Lines)."""
    gz = target.suffix.lower() == ".gz" and data_suffix(target) != ".gz"
    suffix = "".join(target.suffixes[-2:]) if gz else target.suffix
    stem, n = target.name[:len(target.name) - len(suffix)], 1
    while True:
        try:
            os.link(part, target)
            return target
        except FileExistsError:
            n += 1
            target = target.with_name(f"{stem}-{n}{suffix}")


def validate_dataset(ui, req: ValidateRequest) -> dict[str, Any]:
    """`tunelab validate PATH`: the same library call (prepare_dataset with check=True), its printed lines too."""
    import shlex

    from tunelab.cli.prepare import load_stats_tokenizer
    from tunelab.data.prepare import prepare_dataset

    path = views.inside(ui.workdir, req.path, "dataset")
    args = ["validate", req.path, "--format", req.format] + (["--model", req.model] if req.model else
                                                             ["--no-tokenizer"])
    lines: list[str] = []
    cwd_path = str(path)
    try:
        tokenizer = load_stats_tokenizer(req.model) if req.model else None
        result = prepare_dataset([cwd_path], format=req.format, tokenizer=tokenizer, check=True,
                                 console=lines.append)
    except TunelabError as e:
        return {"command": "tunelab " + shlex.join(args), "error": str(e), "output": "\n".join(lines)}
    rep = result.report
    keep = ("records_read", "records_accepted", "records_rejected", "duplicates_removed", "usable", "problems",
            "warnings", "rejected_by_reason", "rejected_examples", "fingerprint")
    return {"command": "tunelab " + shlex.join(args), "report": {k: rep.get(k) for k in keep},
            "output": "\n".join(lines).replace(cwd_path, req.path)}


# ---------------------------------------------------------------- chat


def chat_target(ui, target: str) -> Path:
    """A run (its checkpoint-final) under output.dir, or a model folder inside the working folder."""
    try:
        return views.run_path(ui.root, target)
    except runs.RunError:
        path = views.inside(ui.workdir, target, "model")
        if not path.is_dir():
            raise runs.RunError(f"no run or model folder {target!r}") from None
        return path


def _chat_routes(app: FastAPI) -> None:
    @app.get("/api/chat/targets")
    def targets(request: Request):
        ui = _ui(request)
        found = [r["name"] for r in ui.table.rows() if (ui.root / r["name"] / "checkpoint-final").is_dir()]
        found += [str(p.relative_to(ui.workdir)) for p in _model_folders(ui.workdir / "models")]
        return {"targets": found}

    @app.post("/api/chat")
    async def chat(request: Request, req: ChatRequest):
        from tunelab.ui.chat import stream_pair

        ui = _ui(request)
        target = chat_target(ui, req.target)
        convs = {}
        for side in ("base", "tuned"):
            msgs = ([{"role": "system", "content": req.system}] if req.system else [])
            msgs += [m.model_dump() for m in req.history.get(side, []) if m.role in ("user", "assistant")]
            convs[side] = msgs + [{"role": "user", "content": req.prompt}]
        gen = {"max_new_tokens": req.max_new_tokens, "temperature": req.temperature}
        return StreamingResponse(stream_pair(ui.chat, target, convs, gen, request.is_disconnected),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-store"})
