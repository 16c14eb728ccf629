"""Fixtures for the web UI tests: run folders written by hand, an app over tmp_path, a live server, a browser."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the UI tests need the ui extra: pip install -e '.[test,ui]'")

CHROMIUM = os.environ.get("TUNELAB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def make_run(root: Path, name: str, status: str = "finished", metrics: list[dict] | None = None,
             config: str | None = "training:\n  epochs: 1\n", **manifest) -> Path:
    """A run folder as training leaves it (manifest.json, config.yaml, metrics.jsonl), written by hand."""
    run = root / name
    run.mkdir(parents=True)
    data = {"run_name": name, "status": status, "method": "lora", "model": "tiny", "global_step": 3,
            "total_steps": 3, "started_at": "2026-01-01T10:00:00+00:00", "data": {"source": "d.jsonl",
                                                                                "train_records": 9}, **manifest}
    (run / "manifest.json").write_text(json.dumps(data))
    if config is not None:
        (run / "config.yaml").write_text(config)
    rows = metrics if metrics is not None else [
        {"step": s, "loss": 3.0 - s / 2, "lr": 1e-4, "grad_norm": 1.0, "tokens_per_s": 100.0, "elapsed_s": s}
        for s in (1, 2, 3)] + [{"step": 3, "eval_loss": 2.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


@pytest.fixture
def workdir(tmp_path) -> Path:
    (tmp_path / "outputs").mkdir()
    return tmp_path


@pytest.fixture
def client(workdir):
    from fastapi.testclient import TestClient

    from tunelab.ui.app import create_app

    with TestClient(create_app("outputs", workdir=workdir, poll_s=0.2), headers={"X-Tunelab": "1"}) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn in a thread, as `tunelab ui` runs it, on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                   timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def tiny_dataset(workdir: Path) -> str:
    """A small Alpaca file with one record that validation rejects (empty instruction)."""
    raw = workdir / "data" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": f"What is {i} plus {i}?", "input": "", "output": f"{i} plus {i} is {2 * i}."}
            for i in range(24)] + [{"instruction": "", "output": ""}]
    (raw / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return "data/raw/tiny.jsonl"


def wait_for(predicate, what: str, limit_s: float = 300, every: float = 0.5):
    """Poll until `predicate()` is truthy (a safety limit only: no test asserts a duration)."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"gave up waiting for {what}")


@pytest.fixture
def no_dtype_second_pass():
    # `make test` runs model tests again with `auto` forced to the other dtype; these runs pin fp32, so a second
    # pass would repeat the same minutes for nothing
    if os.environ.get("TUNELAB_AUTO_DTYPE"):
        pytest.skip("the UI runs pin model.dtype: fp32; the other-dtype pass adds nothing")
