"""The dashboard off the happy path: compressed data, wrong form values, damaged run folders, jobs that fail or
collide, and what a request may reach."""

from __future__ import annotations

import gzip
import json

import pytest

from tests.ui.conftest import make_run


def _alpaca_lines(n: int = 12) -> bytes:
    rows = [{"instruction": f"What is {i} plus {i}?", "input": "", "output": f"{2 * i}."} for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_gzip_and_text_data_files_are_uploaded_listed_and_validated(client, workdir):
    """The readers read train.jsonl.gz as it is, but the UI refused its upload (suffix .gz) and never listed it; a
    second upload of the same name became x.jsonl-2.gz, whose suffix no longer says JSON Lines."""
    body = gzip.compress(_alpaca_lines())
    first = client.put("/api/datasets/upload", params={"name": "x.jsonl.gz"}, content=body)
    assert first.status_code == 200 and first.json()["path"] == "data/raw/x.jsonl.gz"
    second = client.put("/api/datasets/upload", params={"name": "x.jsonl.gz"}, content=body)
    assert second.json()["path"] == "data/raw/x-2.jsonl.gz"
    assert client.put("/api/datasets/upload", params={"name": "corpus.txt"}, content=b"some text\n").status_code == 200
    res = client.put("/api/datasets/upload", params={"name": "x.gz"}, content=body)
    assert res.status_code == 400 and ".jsonl" in res.json()["error"]
    listed = {d["path"] for d in client.get("/api/datasets").json()["datasets"]}
    assert {".jsonl", ".txt", ".gz"} <= set(client.get("/api/datasets").json()["accept"])  # the file picker's
    assert listed == {"data/raw/x.jsonl.gz", "data/raw/x-2.jsonl.gz", "data/raw/corpus.txt"}
    report = client.post("/api/datasets/validate", json={"path": "data/raw/x-2.jsonl.gz"}).json()["report"]
    assert report["records_read"] == 12 and report["records_accepted"] == 12


def test_a_form_value_that_is_not_yaml_is_reported_not_a_500(client):
    """`[q_proj` typed into a YAML-typed field (lora.target_modules) was a 500 (yaml ParserError); the command
    line reads it as text and validation names the field, as here."""
    for route in ("/api/config/render", "/api/train"):
        res = client.post(route, json={"values": {"lora.target_modules": "[q_proj", "output.run_name": "r"}})
        assert res.status_code == 200
        assert "lora.target_modules" in res.json()["error"] and "job" not in res.json()


def test_a_run_whose_metrics_file_is_not_a_file_still_shows(client, workdir):
    """metrics.jsonl replaced by a folder was a 500 (IsADirectoryError) on the run page and ended its live stream."""
    run = make_run(workdir / "outputs", "r")
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()
    res = client.get("/api/run", params={"name": "r"})
    assert res.status_code == 200 and res.json()["metrics"] == [] and res.json()["status"] == "finished"
    assert client.get("/api/runs").json()["runs"][0]["name"] == "r"


def _long_job(client, run: str) -> dict:
    """A train job of this UI that keeps running (a tunelab process that waits), recorded for `run`."""
    from tests.ui.conftest import wait_for

    jobs = client.app.state.ui.jobs
    job = jobs.start(["ui", "--dir", "outputs", "--port", "0", "--no-browser"], kind="train", run=run)
    wait_for(lambda: "tunelab ui:" in jobs.log(job["id"]), "the process to start", 120)
    return job


def _stop(client, job: dict) -> None:
    from tests.ui.conftest import wait_for

    client.post(f"/api/jobs/{job['id']}/stop")
    wait_for(lambda: client.app.state.ui.jobs.get(job["id"])["state"] == "ended", "the job to stop", 60)


def test_a_run_is_not_trained_twice_at_once(client, workdir):
    """Resume pressed twice, or Start pressed again before the first process made the run folder, started a second
    `tunelab train` on the same run folder; it only failed later, on the folder's lock, as a failed job."""
    import os

    from tunelab.rundir import process_started

    make_run(workdir / "outputs", "r", status="stopped")
    job = _long_job(client, "r")
    fresh = _long_job(client, "n")  # a new run whose process has not made its folder yet
    try:
        res = client.post("/api/run/action", json={"name": "r", "action": "resume"})
        assert res.status_code == 409 and "being trained right now by job" in res.json()["error"]
        # stopped from the page: the manifest says its process ended the run while that process still exits, and
        # Resume pressed at once is taken (the run folder's lock is free by then)
        jobs, manifest = client.app.state.ui.jobs, workdir / "outputs" / "r" / "manifest.json"
        for status, training in (("interrupted", None), ("running", job["id"])):
            manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "status": status, "pid": job["pid"]}))
            assert (jobs.training("r") or {}).get("id") == training
        res = client.post("/api/train", json={"values": {"output.run_name": "n", "output.dir": "outputs"}})
        assert res.status_code == 409 and "n is being trained right now" in res.json()["error"]
    finally:
        _stop(client, job)
        _stop(client, fresh)
    assert [j["id"] for j in client.get("/api/jobs").json()["jobs"]] == [fresh["id"], job["id"]]
    # a run trained by a process of its own (a terminal), as its manifest records it
    make_run(workdir / "outputs", "t", status="running", pid=os.getpid(), pid_started=process_started())
    res = client.post("/api/run/action", json={"name": "t", "action": "resume"})
    assert res.status_code == 409 and f"process {os.getpid()}" in res.json()["error"]
    assert len(client.get("/api/jobs").json()["jobs"]) == 2


def test_request_bodies_have_a_size_limit(client, workdir):
    """Any JSON route read a body of any size into memory (a 1 GB POST to /api/config/render was parsed whole);
    now a body over the limit is a 413, declared or chunked, while uploads keep their own, larger limit."""
    from tunelab.ui.app import BODY_MAX_BYTES

    big = b'{"yaml": "' + b"x" * BODY_MAX_BYTES + b'"}'
    res = client.post("/api/config/render", content=big, headers={"content-type": "application/json"})
    assert res.status_code == 413 and "larger than 16 MiB" in res.json()["error"]
    chunks = iter([big[i:i + 2**20] for i in range(0, len(big), 2**20)])  # no Content-Length
    res = client.post("/api/config/render", content=chunks, headers={"content-type": "application/json"})
    assert res.status_code == 413 and "larger than 16 MiB" in res.json()["error"]
    assert client.post("/api/config/render", json={"yaml": "{}"}).status_code == 200
    res = client.put("/api/datasets/upload", params={"name": "big.jsonl"}, content=b"x" * (BODY_MAX_BYTES + 1))
    assert res.status_code == 200


def test_run_files_are_served_without_scripts_and_unknown_jobs_are_404(client, workdir):
    """An HTML file in a run folder (a run copied from someone else) was served as a page of this origin: its
    scripts could call the UI's routes, start processes included. A job id that does not exist was a 409."""
    run = make_run(workdir / "outputs", "r")
    (run / "x.html").write_text("<script>fetch('/api/train', {method: 'POST'})</script>")
    res = client.get("/api/run/file", params={"name": "r", "path": "x.html"})
    assert res.status_code == 200 and res.headers["content-security-policy"] == "sandbox"
    assert res.headers["x-content-type-options"] == "nosniff"
    for res in (client.get("/api/jobs/nosuchjob"), client.post("/api/jobs/nosuchjob/stop"),
                client.get("/api/jobs/nosuchjob/log")):
        assert res.status_code == 404 and res.json()["error"] == "no job 'nosuchjob'"


def test_stop_signals_only_a_run_that_is_training(client, workdir):
    """Stop on a finished run whose recorded process still lives (train() called from a notebook kernel that goes
    on) sent that process SIGINT; on a killed run it said to press Ctrl-C where it runs, though nothing runs."""
    import subprocess

    from tunelab.rundir import process_started

    alive = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        make_run(workdir / "outputs", "done", pid=alive.pid, pid_started=process_started(alive.pid))
        res = client.post("/api/run/action", json={"name": "done", "action": "stop"})
        assert res.status_code == 409 and "not training (status finished)" in res.json()["error"]
        assert alive.poll() is None  # not interrupted
        make_run(workdir / "outputs", "killed", status="running", pid=dead.pid)
        res = client.post("/api/run/action", json={"name": "killed", "action": "stop"})
        assert res.status_code == 409 and "is gone (killed?); resume it" in res.json()["error"]
        assert client.get("/api/run", params={"name": "killed"}).json()["status"] == "stale"
    finally:
        alive.kill()
        alive.wait()


def test_an_upload_that_cannot_be_saved_says_why(client, workdir):
    """data/raw being a file (or not writable) made an upload a 500 (FileExistsError / PermissionError)."""
    (workdir / "data").mkdir()
    (workdir / "data" / "raw").write_text("not a folder")
    res = client.put("/api/datasets/upload", params={"name": "a.jsonl"}, content=b"{}\n")
    assert res.status_code == 400 and res.json()["error"].startswith("cannot save 'a.jsonl' in data/raw/: ")
    assert (workdir / "data" / "raw").read_text() == "not a folder"


def test_a_running_eval_job_does_not_keep_a_dead_run_live(client, workdir):
    """A run whose manifest records no pid (an older tunelab) and whose train job failed showed `running` on its
    page while an eval job of it ran, because the page asked the newest job of any kind; its live stream said
    `stale`."""
    import os

    from tunelab.rundir import process_started

    make_run(workdir / "outputs", "r", status="running")
    jobs = workdir / "outputs" / ".ui" / "jobs"
    jobs.mkdir(parents=True)
    for job_id, kind, code in (("20260101000000aaaaaa", "train", 1), ("20260101000001bbbbbb", "eval", None)):
        (jobs / f"{job_id}.json").write_text(json.dumps({
            "id": job_id, "kind": kind, "run": "r", "args": [kind], "command": f"tunelab {kind}", "pid": os.getpid(),
            "pid_started": process_started(), "started_at": "2026-01-01T00:00:00+00:00", "returncode": code}))
    assert client.get("/api/run", params={"name": "r"}).json()["status"] == "stale"
    assert client.get("/api/runs").json()["runs"][0]["status"] == "stale"


def test_a_yaml_config_without_a_run_name_gets_its_own_config_file(client, workdir):
    """YAML edited without output.run_name was always saved as configs/run.yaml, so the second such run was refused
    ("configs/run.yaml already exists with other content") though its run had a name of its own."""
    (workdir / "configs").mkdir()
    (workdir / "configs" / "run.yaml").write_text("training:\n  epochs: 3\n")
    out = client.post("/api/config/render", json={"yaml": "training:\n  epochs: 2\n"}).json()
    assert out["error"] is None and out["config_path"] == f"configs/{out['run']}.yaml"
    assert out["args"] == ["train", "--config", out["config_path"], f"output.run_name={out['run']}"]


def test_stop_pressed_twice_does_not_abort_the_run(client, workdir):
    """Each Stop sent SIGINT: a second press (an impatient double click) was the second Ctrl-C, which aborts the run
    without the checkpoint the first one asked for."""
    import os
    import subprocess
    import sys

    from tunelab.rundir import process_started

    code = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('ready', flush=True); " \
           "time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"ready\n"
        started = process_started(proc.pid)
        jobs = workdir / "outputs" / ".ui" / "jobs"
        jobs.mkdir(parents=True)
        (jobs / "20260101000000aaaaaa.json").write_text(json.dumps({
            "id": "20260101000000aaaaaa", "kind": "train", "run": "r", "args": ["train"], "command": "tunelab train",
            "pid": proc.pid, "pid_started": started, "started_at": "2026-01-01T00:00:00+00:00", "returncode": None}))
        assert client.post("/api/jobs/20260101000000aaaaaa/stop").status_code == 200
        res = client.post("/api/jobs/20260101000000aaaaaa/stop")
        assert res.status_code == 409 and "already stopping" in res.json()["error"]
        # a run trained by a process this UI did not start, stopped from its page
        make_run(workdir / "outputs", "t", status="running", pid=proc.pid, pid_started=started)
        assert client.post("/api/run/action", json={"name": "t", "action": "stop"}).status_code == 200
        res = client.post("/api/run/action", json={"name": "t", "action": "stop"})
        assert res.status_code == 409 and "already stopping" in res.json()["error"]
        assert proc.poll() is None and os.getpgid(proc.pid) == proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_a_run_whose_loss_went_nan_still_shows(client, workdir):
    """metrics.jsonl and the manifest hold `NaN` as json.dumps writes it; the runs table, the run page and compare
    were 500s (JSON has no NaN) and the live stream sent `NaN`, which the browser's JSON.parse refuses."""
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": float("nan"), "grad_norm": float("inf")}]
    make_run(workdir / "outputs", "nan", metrics=rows, metrics_final={"train_loss": float("nan")},
             train_loss=float("nan"))
    make_run(workdir / "outputs", "ok")

    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))

    res = client.get("/api/runs")
    assert res.status_code == 200 and {r["name"]: r for r in strict(res.text)["runs"]}["nan"]["train_loss"] == "NaN"
    res = client.get("/api/run", params={"name": "nan"})
    assert res.status_code == 200 and strict(res.text)["metrics"][1] == {"step": 2, "loss": "NaN",
                                                                         "grad_norm": "Infinity"}
    assert client.get("/api/compare", params={"names": "nan,ok"}).status_code == 200
    with client.stream("GET", "/api/run/events", params={"name": "nan"}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:") and '"records"' in line:
                assert strict(line[5:])["records"][1]["loss"] == "NaN"
                break


def test_a_job_stops_on_sigint_even_when_the_dashboard_ignores_it(tiny_model_dir):
    """`nohup tunelab ui &` passes SIGINT on ignored to the jobs it starts, and Python then installs no Ctrl-C
    handler: Stop (a SIGINT) left an eval, merge or export running (training sets its own). A chat waiting at its
    prompt stands for them here."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    from tests.ui.conftest import wait_for

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNELAB_UI_JOB": "test"}
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "infer", "--model", str(tiny_model_dir), "--dtype",
                             "fp32"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        wait_for(lambda: any(x.startswith("commands:") for x in lines), "the chat's prompt", 120)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0  # Ctrl-C at the prompt ends the chat
    finally:
        proc.kill()


def test_merge_and_export_of_runs_whose_names_differ_only_by_a_slash(client, workdir):
    """Runs `a/b` and `a-b` both merged into models/a-b-merged: the second merge replaced the first (tunelab merge
    replaces its own output), and Export of `a-b` then exported run `a/b`'s weights under a-b's name."""
    from tunelab.ui.actions import run_command
    from tunelab.ui.jobs import JobError

    ui = client.app.state.ui
    for name in ("a/b", "a-b"):
        make_run(workdir / "outputs", name)
    merges = {name: run_command(ui, name, "merge")[1][0] for name in ("a/b", "a-b")}
    assert merges == {"a/b": "models/a/b-merged", "a-b": "models/a-b-merged"}
    merged = workdir / "models" / "a-b-merged"
    merged.mkdir(parents=True)
    (merged / "tunelab.json").write_text(json.dumps({"merged_from": "outputs/a/b/checkpoint-final"}))
    with pytest.raises(JobError, match="holds a merge of .*a/b/checkpoint-final, not of run a-b: merge this run"):
        run_command(ui, "a-b", "export")
    (merged / "tunelab.json").write_text(json.dumps({"merged_from": str(workdir / "outputs/a-b/checkpoint-final")}))
    assert run_command(ui, "a-b", "export") == (
        ["export", "--model", "models/a-b-merged", "--format", "gguf", "--output", "models/a-b.gguf"],
        ["models/a-b.gguf"])
    (merged / "tunelab.json").unlink()  # a folder tunelab merge did not write
    with pytest.raises(JobError, match="not written by tunelab merge"):
        run_command(ui, "a-b", "export")
    # a nested run merged before this change (models/a-b-merged) is still exported, once its record says so
    (merged / "tunelab.json").write_text(json.dumps({"merged_from": str(workdir / "outputs/a/b/checkpoint-final")}))
    assert run_command(ui, "a/b", "export")[0][:3] == ["export", "--model", "models/a-b-merged"]
    nested = workdir / "models" / "a" / "b-merged"
    nested.mkdir(parents=True)
    (nested / "config.json").write_text("{}")
    (merged / "config.json").write_text("{}")
    assert client.get("/api/chat/targets").json()["targets"] == ["models/a/b-merged", "models/a-b-merged"]


def test_a_nan_eval_loss_is_not_the_best(workdir):
    """A run whose first eval went NaN showed NaN as its best eval loss (min() keeps a leading NaN), hiding the
    finite evals after it."""
    from tunelab.ui.views import best_eval_loss

    rows = [{"step": 1, "eval_loss": float("nan")}, {"step": 2, "eval_loss": 2.5}, {"step": 3, "eval_loss": 3.0}]
    run = make_run(workdir / "outputs", "n", metrics=rows)
    assert best_eval_loss(run, {"best_eval_loss": float("nan")}) == 2.5
    assert best_eval_loss(run, {}) == 2.5


def test_an_unreadable_data_folder_is_named_not_a_500(client, workdir, monkeypatch, capsys):
    """A data/ sub-folder the UI's user may not read (another user's, or a mount gone stale) made the whole
    dataset list a 500, so the New run page showed nothing; and `tunelab ui --dir FILE` started a dashboard on
    a file."""
    import errno
    from pathlib import Path

    from tunelab.cli import main

    (workdir / "data" / "raw").mkdir(parents=True)
    (workdir / "data" / "raw" / "a.jsonl").write_bytes(_alpaca_lines(2))
    (workdir / "data" / "processed").mkdir()
    real = Path.iterdir

    def iterdir(self):  # as chmod 0 would, for a user who is not root (the suite may run as root)
        if self.name == "processed":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    res = client.get("/api/datasets")
    assert res.status_code == 200
    assert [d["path"] for d in res.json()["datasets"]] == ["data/raw/a.jsonl"]
    assert res.json()["notes"] == ["cannot list data/processed/: Permission denied"]
    assert main(["ui", "--dir", str(workdir / "data" / "raw" / "a.jsonl"), "--no-browser"]) == 2
    assert "is a file: give the folder" in capsys.readouterr().err
