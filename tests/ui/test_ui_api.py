"""The UI's HTTP API over hand-written run folders: statuses, safety, robustness, the form and its validation."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from tests.ui.conftest import make_run, wait_for


def rows(client) -> dict[str, dict]:
    return {r["name"]: r for r in client.get("/api/runs").json()["runs"]}


def test_runs_table_shows_every_status_and_old_names(client, workdir):
    out = workdir / "outputs"
    make_run(out, "done", "finished")
    make_run(out, "old", "completed")                       # older runs: completed = finished
    make_run(out, "nan", "diverged", error="loss is nan")   # older runs: diverged = failed
    make_run(out, "boom", "failed", error="CUDA out of memory")
    make_run(out, "odd", "paused-by-martians")
    make_run(out, "ghost", "running", pid=2**22 + 12345)    # says running, its process is gone
    make_run(out, "alive", "running", pid=os.getpid())
    make_run(out, "sweep/r1", "interrupted")                # grouped one level deeper
    r = rows(client)
    assert {k: v["status"] for k, v in r.items()} == {
        "done": "finished", "old": "finished", "nan": "failed", "boom": "failed", "odd": "unknown",
        "ghost": "stale", "alive": "running", "sweep/r1": "interrupted"}
    assert r["boom"]["note"] == "CUDA out of memory"
    assert "paused-by-martians" in r["odd"]["note"]
    assert r["done"]["best_eval_loss"] == 2.5 and r["done"]["steps"] == 3


def test_broken_run_folders_show_as_such(client, workdir):
    out = workdir / "outputs"
    (out / "torn").mkdir()
    (out / "torn" / "manifest.json").write_text('{"status": "runn')          # half-written
    (out / "list").mkdir()
    (out / "list" / "manifest.json").write_text("[1, 2]")                    # not an object
    make_run(out, "nocfg", "running", config=None, pid=os.getpid(),
             metrics=[{"step": 1, "loss": 2.0}]).joinpath("metrics.jsonl").open("a").write('{"step": 2, "lo')
    make_run(out, "badeval", "finished").joinpath("eval").mkdir()
    (out / "badeval" / "eval" / "val.json").write_text("{not json")
    r = rows(client)
    assert r["torn"]["status"] == "unreadable" and r["list"]["status"] == "unreadable"
    torn = client.get("/api/run", params={"name": "torn"}).json()
    assert torn["status"] == "unreadable" and torn["manifest_error"]
    nocfg = client.get("/api/run", params={"name": "nocfg"}).json()
    assert nocfg["config_yaml"] is None and [m["step"] for m in nocfg["metrics"]] == [1]
    assert client.get("/api/run", params={"name": "badeval"}).status_code == 200


@pytest.mark.parametrize("name", ["../outside", "/etc", "a/../../outside", "..", "link/x", "link"])
def test_path_parameters_cannot_leave_output_dir(client, workdir, name):
    make_run(workdir, "outside")                         # a real run folder, but not under output.dir
    (workdir / "outputs" / "link").symlink_to(workdir / "outside")
    for url in ("/api/run", "/api/run/events", "/api/run/file"):
        res = client.get(url, params={"name": name, "path": "manifest.json"})
        assert res.status_code in (403, 404), (url, res.status_code)
    res = client.post("/api/run/action", json={"name": name, "action": "resume"})
    assert res.status_code in (403, 404)
    assert not list((workdir / "outputs").glob(".ui/jobs/*.json"))  # nothing was started


def test_file_and_dataset_paths_stay_inside(client, workdir):
    make_run(workdir / "outputs", "r")
    (workdir.parent / "secret.txt").write_text("secret")
    for path in ("../../secret.txt", "/etc/passwd", "../manifest.json"):
        assert client.get("/api/run/file", params={"name": "r", "path": path}).status_code == 403
    assert client.get("/api/run/file", params={"name": "r", "path": "config.yaml"}).text.startswith("training")
    res = client.post("/api/datasets/validate", json={"path": "../secret.txt"})
    assert res.status_code == 403
    res = client.post("/api/config/render", json={"yaml": "{}", "config_path": "../evil.yaml"})
    assert res.status_code == 403
    up = client.put("/api/datasets/upload", params={"name": "../../x.jsonl"}, content=b'{"a": 1}\n')
    assert up.json()["path"] == "data/raw/x.jsonl"


def test_form_is_generated_from_the_config_schema(client):
    from tunelab.config import LoraConfig, TrainingConfig

    fields = {f["key"]: f for s in client.get("/api/schema").json()["sections"] for f in s["fields"]}
    assert fields["lora.r"]["default"] == 16 and fields["lora.r"]["help"] == LoraConfig.model_fields["r"].description
    assert fields["training.method"]["choices"] == ["lora", "qlora", "dora", "full"]
    assert fields["training.packing"]["kind"] == "bool"
    assert fields["output.dir"]["value"] == "outputs"
    assert set(fields) >= {f"training.{k}" for k in TrainingConfig.model_fields}


def test_form_values_become_minimal_yaml_and_the_train_command(client):
    out = client.post("/api/config/render", json={"values": {
        "model.name": "bundled:smollm2-135m-instruct", "lora.r": "8", "training.epochs": "1",
        "training.packing": True, "data.eval": "", "output.run_name": "my-run"}}).json()
    assert out["error"] is None
    assert out["yaml"] == "lora:\n  r: 8\ntraining:\n  epochs: 1\noutput:\n  run_name: my-run\n"
    assert out["command"] == "tunelab train --config configs/my-run.yaml" and out["run"] == "my-run"


def test_validation_errors_are_the_clis(client, workdir, monkeypatch, capsys):
    from tunelab.cli import main

    text = "lora:\n  alpah: 16\ntraining:\n  epochs: -1\n  learning_rate: fast\n"
    ui = client.post("/api/config/render", json={"yaml": text, "config_path": "configs/x.yaml"}).json()
    (workdir / "configs").mkdir()
    (workdir / "configs" / "x.yaml").write_text(text)
    monkeypatch.chdir(workdir)
    assert main(["train", "--config", "configs/x.yaml"]) == 2
    cli = capsys.readouterr().err
    assert cli.strip() == f"error: {ui['error']}"
    assert "did you mean lora.alpha?" in ui["error"] and "3 problems" in ui["error"]


def test_token_and_write_guards(workdir):
    from fastapi.testclient import TestClient

    from tunelab.ui.app import create_app

    c = TestClient(create_app("outputs", workdir=workdir, token="s3cret", allowed_hosts=("testserver",)))
    assert c.get("/api/runs").status_code == 401
    assert c.get("/").status_code == 401
    assert c.get("/api/runs", params={"token": "wrong"}).status_code == 401
    assert c.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/", params={"token": "s3cret"}).status_code == 200
    assert c.get("/api/runs").status_code == 200  # the cookie set by the first visit
    assert c.post("/api/config/render", json={"yaml": "{}"}).status_code == 403  # no X-Tunelab header
    evil = TestClient(create_app("outputs", workdir=workdir, allowed_hosts=("127.0.0.1",)))
    assert evil.get("/api/runs").status_code == 403  # Host: testserver (a DNS-rebinding page)


def test_ui_refuses_a_public_host_without_token(capsys):
    from tunelab.cli import main

    assert main(["ui", "--host", "0.0.0.0", "--no-browser"]) == 2
    assert "--token" in capsys.readouterr().err
    assert main(["ui", "--host", "0.0.0.0", "--no-token", "--no-browser"]) == 2
    assert main(["ui", "--token", "t", "--no-token", "--no-browser"]) == 2
    assert "not both" in capsys.readouterr().err


def test_ui_on_loopback_needs_the_random_token_it_prints(client):
    """Without --token, loopback was open to every user of the machine, and the UI starts processes as the one who
    ran it; now a random token is in the printed URL (as Jupyter's), and --no-token drops it knowingly."""
    import re

    import httpx

    jobs = client.app.state.ui.jobs
    for extra, needs_token in (([], True), (["--no-token"], False)):
        job = jobs.start(["ui", "--dir", "outputs", "--port", "0", "--no-browser", *extra], kind="ui")
        line = wait_for(lambda: re.search(r"tunelab ui: (http://127\.0\.0\.1:\d+/)(\?token=(\S+))?",
                                          jobs.log(job["id"])), "the server to start", 120)
        try:
            base, token = line.group(1), line.group(3)
            assert (token is not None) == needs_token and (token is None or len(token) >= 20)
            assert httpx.get(base + "api/runs", timeout=30).status_code == (401 if needs_token else 200)
            if needs_token:
                assert httpx.get(base + "api/runs?token=wrong", timeout=30).status_code == 401
                assert httpx.get(f"{base}api/runs?token={token}", timeout=30).status_code == 200
        finally:
            client.post(f"/api/jobs/{job['id']}/stop")
            wait_for(lambda: jobs.get(job["id"])["state"] == "ended", "the job to stop", 60)


def test_metrics_tail_reads_complete_lines_and_notices_a_truncation(tmp_path):
    from tunelab.ui.views import metrics_since

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    recs, offset, reset = metrics_since(path, 0)
    assert [r["step"] for r in recs] == [1, 2] and not reset
    with path.open("a") as f:
        f.write('ss": 1.0}\n')
    recs, offset, _ = metrics_since(path, offset)
    assert recs == [{"step": 3, "loss": 1.0}]
    path.write_text('{"step": 1}\n')  # a resumed run drops the lines after its checkpoint
    recs, offset, reset = metrics_since(path, offset)
    assert reset and recs == [{"step": 1}]


def test_run_events_stream_new_points(client, workdir):
    run = make_run(workdir / "outputs", "live", "running", pid=os.getpid(), metrics=[{"step": 1, "loss": 2.0}])
    offset = (run / "metrics.jsonl").stat().st_size
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 2, "loss": 1.5}) + "\n")
    events = []
    with client.stream("GET", "/api/run/events", params={"name": "live", "offset": offset}) as res:
        for line in res.iter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
            if line.startswith("data: ") and events[-1] == "metrics":
                assert json.loads(line[6:])["records"] == [{"step": 2, "loss": 1.5}]
                break
    assert "metrics" in events


def test_a_job_is_a_cli_command_in_its_own_session(client, workdir):
    """Launched processes outlive the page (own session); stop sends SIGINT; command and output are saved."""
    jobs = client.app.state.ui.jobs
    job = jobs.start(["ui", "--dir", "outputs", "--port", "0", "--no-browser"], kind="ui")
    assert job["command"] == "tunelab ui --dir outputs --port 0 --no-browser"
    assert os.getpgid(job["pid"]) == job["pid"] != os.getpgid(0)
    wait_for(lambda: "tunelab ui:" in jobs.log(job["id"]), "the server to start", 120)
    assert client.post(f"/api/jobs/{job['id']}/stop").status_code == 200
    done = wait_for(lambda: (j := jobs.get(job["id"]))["state"] == "ended" and j, "the job to stop", 60)
    assert done["returncode"] == 0 and done["ended_at"]
    saved = json.loads((workdir / "outputs" / ".ui" / "jobs" / f"{job['id']}.json").read_text())
    assert saved["command"] == job["command"] and saved["returncode"] == 0
    assert client.get("/api/runs").json()["runs"] == []  # the jobs folder is not a run
    assert sys.executable  # the job ran with this interpreter (python -m tunelab)


def test_new_run_writes_only_new_yaml_files_under_configs(client, workdir):
    """A config path outside configs/ (or not YAML) is refused; an existing file of other content is never
    replaced; a run folder that exists, or a run name with a path in it, is an error before anything is written."""
    (workdir / "data").mkdir()
    (workdir / "data" / "victim.json").write_text("[]")
    for path in ("data/victim.json", "configs/x.json", "x.yaml"):
        for url in ("/api/config/render", "/api/train"):
            res = client.post(url, json={"yaml": "{}", "config_path": path})
            assert res.status_code == 403 and "configs/" in res.json()["error"], (url, path)
    assert (workdir / "data" / "victim.json").read_text() == "[]"

    (workdir / "configs").mkdir()
    (workdir / "configs" / "mine.yaml").write_text("training:\n  epochs: 2\n")
    text = "output:\n  run_name: mine\n"
    for url in ("/api/config/render", "/api/train"):
        out = client.post(url, json={"yaml": text}).json()
        assert "configs/mine.yaml already exists with other content" in out["error"] and "job" not in out
    assert (workdir / "configs" / "mine.yaml").read_text() == "training:\n  epochs: 2\n"
    (workdir / "configs" / "same.yaml").write_text("output:\n  run_name: same\n")  # the same text: kept, no error
    assert client.post("/api/config/render", json={"yaml": "output:\n  run_name: same\n"}).json()["error"] is None

    make_run(workdir / "outputs", "taken")
    out = client.post("/api/config/render", json={"yaml": "output:\n  run_name: taken\n"}).json()
    assert out["error"] == "run folder outputs/taken already exists; pick another output.run_name (or resume " \
                           "that run from its page)"
    for name in ("../../escape", "a/b", ".."):
        out = client.post("/api/train", json={"yaml": f"output:\n  run_name: '{name}'\n"}).json()
        assert "is not a plain folder name" in out["error"] and "job" not in out, name
    assert not (workdir / "configs" / "taken.yaml").exists() and not list(workdir.glob("configs/*escape*"))
    assert not list((workdir / "outputs").glob(".ui/jobs/*.json"))  # nothing was started


def test_chat_reloads_a_model_whose_files_changed(tmp_path, monkeypatch):
    """The chat cache answers from the weights in the folder now: a re-merged model or a run folder trained again
    is loaded again; an unchanged one is not."""
    from tunelab.ui import chat

    loads = []
    monkeypatch.setattr(chat, "ModelPair", lambda target: loads.append(target) or object())
    model = tmp_path / "models" / "m-merged"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"old weights")
    models = chat.ChatModels()
    first = models.get(model)
    assert models.get(model) is first and len(loads) == 1
    (model / "model.safetensors").write_bytes(b"new weights, merged again")
    second = models.get(model)
    assert second is not first and len(loads) == 2 and models.get(model) is second
    run = tmp_path / "outputs" / "r"
    (run / "checkpoint-final").mkdir(parents=True)
    (run / "checkpoint-final" / "adapter_config.json").write_text("{}")
    (run / "checkpoint-final" / "adapter_model.safetensors").write_bytes(b"a")
    third = models.get(run)
    tmp = run.with_name("r.new")  # the run folder replaced by another with same-sized files
    shutil.copytree(run, tmp)
    shutil.rmtree(run)
    tmp.rename(run)
    assert models.get(run) is not third and len(loads) == 4


def test_request_limits(workdir):
    """Uploads stream to disk under a size cap and must not be empty; chat text has a length cap; a negative
    events offset and a name too long for the file system are clear 4xx answers, not tracebacks."""
    from fastapi.testclient import TestClient

    from tunelab.ui.actions import CHAT_TEXT_CHARS, CHAT_TURNS
    from tunelab.ui.app import create_app

    c = TestClient(create_app("outputs", workdir=workdir, max_upload_mb=1), headers={"X-Tunelab": "1"})
    raw = workdir / "data" / "raw"
    res = c.put("/api/datasets/upload", params={"name": "big.jsonl"}, content=b"x" * (2**20 + 1))
    assert res.status_code == 413 and "larger than the upload limit of 1 MiB" in res.json()["error"]
    chunks = iter([b"x" * 2**19] * 3)  # no Content-Length: the limit holds while the body streams
    res = c.put("/api/datasets/upload", params={"name": "big.jsonl"}, content=chunks)
    assert res.status_code == 413
    res = c.put("/api/datasets/upload", params={"name": "empty.jsonl"}, content=b"")
    assert res.status_code == 400 and "is empty" in res.json()["error"]
    assert list(raw.iterdir()) == []  # nothing left behind, not even a partial file
    assert c.put("/api/datasets/upload", params={"name": "ok.jsonl"}, content=b"x" * 2**20).status_code == 200
    assert c.put("/api/datasets/upload", params={"name": "ok.jsonl"}, content=b"{}\n").json()["path"] == \
        "data/raw/ok-2.jsonl"
    assert [p.name for p in sorted(raw.iterdir())] == ["ok-2.jsonl", "ok.jsonl"]

    make_run(workdir / "outputs", "r", config=None)
    long = "x" * (CHAT_TEXT_CHARS + 1)
    turn = {"role": "user", "content": "hi"}
    for body in ({"prompt": long}, {"prompt": "hi", "system": long},
                 {"prompt": "hi", "history": {"base": [{"role": "user", "content": long}]}},
                 {"prompt": "hi", "history": {"tuned": [turn] * (CHAT_TURNS + 1)}}):
        assert c.post("/api/chat", json={"target": "r", **body}).status_code == 422

    assert c.get("/api/run/events", params={"name": "r", "offset": -5}).status_code == 422
    res = c.get("/api/run", params={"name": "a" * 300})
    assert res.status_code == 400 and "longer than 255 bytes" in res.json()["error"]
    deep = "/".join(["a" * 250] * 20)  # each name fits, the whole path does not
    assert c.get("/api/run", params={"name": deep}).status_code == 404
    assert c.get("/api/run/file", params={"name": "r", "path": "b" * 300}).status_code == 400


def test_ui_binds_its_port_before_showing_the_url(monkeypatch, capsys):
    """A taken port is one error line, and no browser tab opens on the server that holds it; a port out of range
    is argparse's usage error, not a traceback."""
    import socket
    import webbrowser

    from tunelab.cli import main

    opened = []
    monkeypatch.setattr(webbrowser, "open", opened.append)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["ui", "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert opened == [] and "tunelab ui:" not in out
    assert err.startswith(f"error: cannot listen on 127.0.0.1 port {port}: ") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_:
        main(["ui", "--port", "70000", "--no-browser"])
    assert exit_.value.code == 2 and "'70000' is not a port number (0-65535)" in capsys.readouterr().err


def test_run_page_offset_ends_at_the_metrics_it_returned(client, workdir):
    """The run page's metrics and the offset its live stream continues from are one read: a line still being
    written is neither shown nor skipped, the stream delivers it once it is complete."""
    from tunelab.ui.views import metrics_since

    run = make_run(workdir / "outputs", "live", "running", pid=os.getpid(), metrics=[{"step": 1, "loss": 2.0}])
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "lo')
    page = client.get("/api/run", params={"name": "live"}).json()
    assert page["metrics"] == [{"step": 1, "loss": 2.0}]
    with (run / "metrics.jsonl").open("a") as f:
        f.write('ss": 1.5}\n')
    assert metrics_since(run / "metrics.jsonl", page["metrics_offset"])[0] == [{"step": 2, "loss": 1.5}]
