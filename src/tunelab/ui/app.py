"""The `tunelab ui` web app: FastAPI routes over run folders, plus a static front end (vanilla JS + uPlot).

    from tunelab.ui.app import create_app
    app = create_app("outputs")           # uvicorn.run(app, host="127.0.0.1", port=7860)

Reading routes are views of the files (tunelab.ui.views); acting routes start ordinary `tunelab` commands in
their own processes (tunelab.ui.jobs) and return the command they ran. The app keeps its state on `app.state`
and never trains in-process.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from tunelab import runs
from tunelab.errors import TunelabError
from tunelab.ui import MAX_UPLOAD_MB, actions, views
from tunelab.ui.jobs import JobError, Jobs, NoJob

STATIC = Path(__file__).parent / "static"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]", "::1")
# The largest request body other than a dataset upload (which streams to disk under --max-upload-mb): configs and
# chat turns are far smaller, and every body below this is read into memory whole before it is checked.
BODY_MAX_BYTES = 16 * 2**20
STREAMED = ("/api/datasets/upload",)


class UIState:
    """Everything a route needs, created once per app (design rule 15: state on app.state)."""

    def __init__(self, runs_dir: str, workdir: Path, poll_s: float, max_upload_mb: int):
        self.workdir = workdir.resolve()
        self.max_upload_bytes = max_upload_mb * 2**20
        self.dir_arg = runs_dir  # as the user wrote it: commands shown use it
        self.root = (self.workdir / runs_dir).resolve() if not os.path.isabs(runs_dir) else Path(runs_dir)
        self.jobs = Jobs(self.root / ".ui" / "jobs", self.workdir, self.root)
        self.table = views.RunTable(self.root)
        self.poll_s = poll_s
        from tunelab.ui.chat import ChatModels

        self.chat = ChatModels()

    def run_arg(self, name: str) -> str:
        return os.path.join(self.dir_arg, name)


def create_app(runs_dir: str = "outputs", workdir: str | Path | None = None, token: str | None = None,
               allowed_hosts: tuple[str, ...] | None = None, poll_s: float = 1.0,
               max_upload_mb: int = MAX_UPLOAD_MB) -> FastAPI:
    """`token`: required on every request when set. `allowed_hosts`: Host header names accepted (loopback
    servers pass their names, which stops DNS-rebinding pages from reaching them). `max_upload_mb`: the largest
    dataset upload (streamed to disk, never held in memory)."""
    app = FastAPI(title="tunelab ui", docs_url=None, redoc_url=None, openapi_url=None,
                  default_response_class=FiniteJSONResponse)
    app.state.ui = UIState(runs_dir, Path(workdir or Path.cwd()), poll_s, max_upload_mb)
    _guard(app, token, allowed_hosts)
    app.add_middleware(BodyLimit, limit=BODY_MAX_BYTES)  # outermost: before a body is read
    _errors(app)
    _read_routes(app)
    actions.add_routes(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _guard(app: FastAPI, token: str | None, allowed_hosts: tuple[str, ...] | None) -> None:
    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = (request.headers.get("host") or "").rsplit(":", 1)[0] if "]" not in (
            request.headers.get("host") or "") else request.headers["host"].split("]")[0] + "]"
        if allowed_hosts is not None and host not in allowed_hosts:
            return JSONResponse({"error": f"host {host!r} not allowed"}, 403)
        given = request.query_params.get("token") or request.cookies.get("tunelab_token") or \
            request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if token and not secrets.compare_digest(given.encode(), token.encode()):
            return JSONResponse({"error": "a valid token is required (open the URL printed by tunelab ui)"}, 401)
        # state-changing requests must carry a custom header: a page on another site cannot send one without a
        # CORS preflight, which this server never grants
        if request.method not in ("GET", "HEAD") and request.headers.get("x-tunelab") != "1":
            return JSONResponse({"error": "missing X-Tunelab header"}, 403)
        response = await call_next(request)
        if token and request.query_params.get("token"):
            response.set_cookie("tunelab_token", token, httponly=True, samesite="strict")
        return response


def finite(value: Any) -> Any:
    """`value` with NaN and infinite floats as the strings "NaN", "Infinity", "-Infinity": JSON has no such numbers
    (a run whose loss went NaN, which json.dumps writes into metrics.jsonl and manifests as it is, made every page
    that showed it a 500, and its live stream unparseable); the page shows the word and leaves the point off charts."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


class FiniteJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(finite(content), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


class BodyLimit:
    """Refuses a request body over `limit` bytes (413), declared or chunked, before a route reads it; STREAMED
    routes limit their own. A chunked body is gathered here (at most `limit` bytes, as the route would read it whole
    anyway) and handed on as it came."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in STREAMED:
            return await self.app(scope, receive, send)
        refused = JSONResponse({"error": f"request body larger than {self.limit // 2**20} MiB"}, 413)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await refused(scope, receive, send)
        messages, seen = [], 0
        while not messages or messages[-1]["type"] == "http.request" and messages[-1].get("more_body"):
            messages.append(await receive())
            seen += len(messages[-1].get("body", b""))
            if seen > self.limit:
                return await refused(scope, receive, send)

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def _errors(app: FastAPI) -> None:
    codes = {views.PathRefused: 403, runs.RunError: 404, NoJob: 404, JobError: 409, actions.TooLarge: 413}

    @app.exception_handler(TunelabError)
    async def tunelab_error(_request: Request, exc: TunelabError):
        status = next((c for t, c in codes.items() if isinstance(exc, t)), 400)
        return JSONResponse({"error": str(exc)}, status)


def ui_of(request: Request) -> UIState:
    return request.app.state.ui


def _read_routes(app: FastAPI) -> None:
    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/api/info")
    async def info(request: Request):
        from tunelab import __version__

        ui = ui_of(request)
        return {"version": __version__, "runs_dir": ui.dir_arg, "root": str(ui.root), "workdir": str(ui.workdir)}

    @app.get("/api/runs")
    def run_list(request: Request):  # a plain def: FastAPI runs it in a thread, file reads off the event loop
        ui = ui_of(request)
        return {"runs": ui.table.rows(ui.jobs.latest_by_run())}

    @app.get("/api/run")
    def run_detail(request: Request, name: str):
        ui = ui_of(request)
        views.run_path(ui.root, name)
        return views.run_detail(ui.root, name, ui.run_arg(name), ui.workdir, ui.jobs.for_run(name))

    @app.get("/api/run/file")
    def run_file(request: Request, name: str, path: str):
        ui = ui_of(request)
        target = views.inside(views.run_path(ui.root, name), path, "file")
        if not target.is_file():
            raise runs.RunError(f"no file {path!r} in run {name!r}")
        # a run folder may come from anyone (copied, downloaded): an HTML or SVG file in it is shown without
        # scripts and away from this origin, so it cannot call this server's routes
        return FileResponse(target, headers={"Content-Security-Policy": "sandbox", "X-Content-Type-Options": "nosniff"})

    @app.get("/api/run/events")
    async def run_events(request: Request, name: str, offset: int = Query(0, ge=0)):
        ui = ui_of(request)
        path = views.run_path(ui.root, name)
        return StreamingResponse(_run_events(request, ui, name, path, offset), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.get("/api/compare")
    def compare(request: Request, names: str):
        ui = ui_of(request)
        paths = [views.run_path(ui.root, n) for n in names.split(",") if n]
        cmp = runs.compare_runs([str(p) for p in paths], ui.root)
        return {"names": names.split(","), "labels": cmp.names, "config_diff": cmp.config_diff, "data": cmp.data,
                "data_same": cmp.data_same, "metrics": cmp.metrics, "best": cmp.best, "env_diff": cmp.env_diff,
                "curves": [runs.read_metrics(p) for p in paths]}

    @app.get("/api/jobs")
    def job_list(request: Request):
        return {"jobs": ui_of(request).jobs.all()}

    @app.get("/api/jobs/{job_id}")
    def job(request: Request, job_id: str):
        jobs = ui_of(request).jobs
        return {**jobs.get(job_id), "output": jobs.log(job_id)}

    @app.get("/api/jobs/{job_id}/log")
    def job_log(request: Request, job_id: str):
        jobs = ui_of(request).jobs
        jobs.get(job_id)
        return PlainTextResponse(jobs.log(job_id, max_bytes=10_000_000), headers={
            "Content-Disposition": f'attachment; filename="tunelab-{job_id}.txt"'})


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(finite(data), ensure_ascii=False, default=str)}\n\n"


def _status_payload(ui: UIState, name: str, path: Path) -> dict[str, Any]:
    try:
        manifest = runs.read_manifest(path)
    except runs.RunError as e:
        return {"status": "unreadable", "note": str(e)}
    jobs = [j for j in ui.jobs.for_run(name) if j.get("kind") == "train"]
    status, note = views.live_status(manifest, jobs[0] if jobs else None)
    keys = ("global_step", "total_steps", "started_at", "ended_at", "duration_s", "metrics", "error")
    return {"status": status, "note": note, **{k: manifest.get(k) for k in keys},
            "jobs": [{k: j.get(k) for k in ("id", "kind", "command", "state", "returncode")}
                     for j in ui.jobs.for_run(name)]}


async def _run_events(request: Request, ui: UIState, name: str, path: Path, offset: int):
    """Live run page: new metric lines, status changes and the log tail, as they appear in the files."""
    metrics, log = path / "metrics.jsonl", path / "train.log"
    last_status, last_log, idle = None, None, 0
    yield "retry: 2000\n\n"
    while not await request.is_disconnected():
        records, offset, reset = await asyncio.to_thread(views.metrics_since, metrics, offset)
        if reset:
            records, offset, _ = await asyncio.to_thread(views.metrics_since, metrics, 0)
            yield _sse("reset", {"records": records, "offset": offset})
        elif records:
            yield _sse("metrics", {"records": records, "offset": offset})
        status = await asyncio.to_thread(_status_payload, ui, name, path)
        if status != last_status:
            last_status = status
            yield _sse("status", status)
        log_stamp = views.file_stamp(log)
        if log_stamp != last_log:
            last_log = log_stamp
            yield _sse("log", {"text": views.tail(log)})
        idle += 1
        if idle * ui.poll_s >= 15:  # a comment line keeps proxies from closing a quiet stream
            idle = 0
            yield ": keep-alive\n\n"
        await asyncio.sleep(ui.poll_s)
