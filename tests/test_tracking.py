"""Monitoring: the brief's lines in train.log, TensorBoard by default, MLflow for real against a local file store,
W&B offline when installed. One tiny training run (2 epochs x 3 steps) is shared by the tests of this module."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import signal

import pytest

from tunelab.config import Config, load_config
from tunelab.demo_data import alpaca_records
from tunelab.errors import TunelabError
from tunelab.train.monitor import Trackers
from tunelab.train.recipe import train
from tunelab.rundir import read_metrics

HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
needs_mlflow = pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow not installed (pip install 'tunelab[mlflow]')")


@pytest.fixture(scope="module")
def tracked(tiny_model_dir, tmp_path_factory) -> dict:
    """23 train / 3 eval records, batch 8 -> 3 steps per epoch, 2 epochs; eval at step 3; BLEU at the end."""
    root = tmp_path_factory.mktemp("tracked")
    alpaca = root / "alpaca.json"  # a fixed 23 records, so the step counts below do not follow the demo data
    alpaca.write_text(json.dumps(alpaca_records()[:23]), encoding="utf-8")
    uri = (root / "mlruns").as_uri()
    report_to = "[tensorboard,mlflow]" if HAS_MLFLOW else "[tensorboard]"
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={alpaca}", f"output.dir={root / 'runs'}",
                             "output.run_name=tracked", "model.dtype=fp32", "data.max_length=96",
                             "training.epochs=2", "training.batch_size=8", "training.logging_steps=1",
                             "training.eval_steps=3", "training.learning_rate=1e-2", "lora.r=4",
                             "eval.metrics=[perplexity,bleu]", "eval.max_new_tokens=4", "eval.max_samples=3",
                             f"tracking.report_to={report_to}", f"tracking.mlflow_tracking_uri={uri}",
                             "tracking.project=tunelab-tests"])
    run = train(cfg)
    return {"run": run, "uri": uri, "cfg": cfg, "metrics": read_metrics(run)}


def _train_losses(metrics: list[dict]) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics if "loss" in m and not m.get("final")}


def _logged_lrs(metrics: list[dict]) -> list[float]:
    return [m["lr"] for m in sorted((m for m in metrics if "lr" in m), key=lambda m: m["step"])]


def test_train_log_has_the_briefs_monitoring_shape(tracked, lr_schedule):
    text = (tracked["run"] / "train.log").read_text(encoding="utf-8")
    lines = text.splitlines()
    epochs = [i for i, line in enumerate(lines) if re.fullmatch(r"Epoch \d+/2:", line)]
    assert [lines[i] for i in epochs] == ["Epoch 1/2:", "Epoch 2/2:"]
    # the brief's LR form (2e-4, 1.8e-4), not 0.0002
    step_re = re.compile(r"  Step (\d+)/6 \| Loss: (\d+\.\d{3}) \| LR: (0|\d(?:\.\d{1,2})?e-\d+) \| "
                         r"Time: \d+:\d\d:\d\d( \| .*)?")
    steps = {int(m.group(1)): (i, m) for i, line in enumerate(lines) if (m := step_re.fullmatch(line))}
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]  # logging_steps=1: every step
    assert epochs[0] < steps[1][0] < steps[3][0] < epochs[1] < steps[4][0] < steps[6][0]
    losses = _train_losses(tracked["metrics"])
    for step, (_, m) in steps.items():
        assert m.group(2) == f"{losses[step]:.3f}"  # the printed loss is the logged loss
        assert float(m.group(3)) == pytest.approx(next(x["lr"] for x in tracked["metrics"]
                                                       if x.get("step") == step and "lr" in x), rel=1e-2)
    assert re.search(r"  Eval @ step 3 \| Loss: \d+\.\d{4} \| Perplexity: \d+\.\d{2}", text)
    assert _logged_lrs(tracked["metrics"]) == pytest.approx(lr_schedule(tracked["cfg"], 6))  # what each step used

    # the final evaluation block, after the last step line
    final = next(m for m in tracked["metrics"] if m.get("final"))
    tail = "\n".join(lines[steps[6][0] + 1:])
    assert "\n评估结果:\n  Perplexity: " in tail  # the brief's lines, exactly
    ppl = re.search(r"^  Perplexity: (\d+\.\d{2})$", tail, re.M)
    assert ppl and float(ppl.group(1)) == pytest.approx(math.exp(final["eval_loss"]), abs=0.01)
    bleu = re.search(r"^  BLEU: (\d+\.\d)$", tail, re.M)
    assert bleu and float(bleu.group(1)) == pytest.approx(final["bleu"], abs=0.05)
    assert json.loads((tracked["run"] / "manifest.json").read_text())["metrics"]["bleu"] == final["bleu"]


def test_tensorboard_is_the_default_and_holds_the_loss_curve(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert Config().tracking.report_to == ["tensorboard"]
    assert list((tracked["run"] / "tensorboard").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tracked["run"] / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/loss", "eval/perplexity",
            "final/perplexity", "final/bleu"} <= tags
    losses = _train_losses(tracked["metrics"])
    curve = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert curve.keys() == losses.keys()
    assert all(curve[s] == pytest.approx(losses[s], rel=1e-6) for s in losses)
    assert [e.step for e in acc.Scalars("eval/loss")] == [3]


@needs_mlflow
def test_mlflow_file_store_gets_params_and_the_loss_history(tracked):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracked["uri"])
    experiment = client.get_experiment_by_name("tunelab-tests")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'tracked'")
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["training.method"] == "lora" and params["lora.r"] == "4" and params["training.epochs"] == "2.0"
    assert params["model.name"] == str(tracked["cfg"].model.name)
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    losses = _train_losses(tracked["metrics"])
    assert history.keys() == losses.keys()
    assert all(history[s] == pytest.approx(losses[s], rel=1e-9) for s in losses)
    final = next(m for m in tracked["metrics"] if m.get("final"))
    assert run.data.metrics["final/perplexity"] == pytest.approx(final["perplexity"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")] == [3]


@needs_mlflow
def test_mlflow_run_status_and_resumed_run_continue_one_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    cfg = Config().to_dict()
    first = Trackers(["mlflow"], tmp_path / "run", "interrupted", "p", cfg, uri)
    first.log({"loss": 2.0, "lr": 1e-4, "step": 1}, 1)
    first.close("KILLED")
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(first.run_ids["mlflow"]).info.status == "KILLED"

    again = Trackers(["mlflow"], tmp_path / "run", "interrupted", "p", cfg, uri, run_ids=first.run_ids)
    assert again.run_ids == first.run_ids
    again.log({"loss": 1.5, "final": True}, 2)  # booleans are flags, not metrics
    again.close("FINISHED")
    run = client.get_run(first.run_ids["mlflow"])
    assert run.info.status == "FINISHED" and "final" not in run.data.metrics
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(1, 2.0), (2, 1.5)]


@needs_mlflow
def test_a_resumed_run_logs_each_step_once_to_tensorboard_and_mlflow(tmp_path):
    """Killed after step 7 with its last checkpoint at step 6: the resumed run logs step 7 again. TensorBoard hides
    the killed run's points from step 7 on (purge_step); MLflow, which cannot delete points, keeps the first."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri, run = (tmp_path / "mlruns").as_uri(), tmp_path / "run"
    killed = Trackers(["tensorboard", "mlflow"], run, "r", "p", {}, uri)
    for step in range(1, 8):
        killed.log({"loss": float(step)}, step)
    killed.close("KILLED")
    resumed = Trackers(["tensorboard", "mlflow"], run, "r", "p", {}, uri, run_ids=killed.run_ids, resumed_at=6)
    for step in (7, 8):
        resumed.log({"loss": 10.0 * step, "eval_loss": 1.0}, step)
    resumed.close()
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(s, s) for s in range(1, 7)] + [(7, 70), (8, 80)]
    client = MlflowClient(tracking_uri=uri)
    history = sorted((m.step, m.value) for m in client.get_metric_history(killed.run_ids["mlflow"], "loss"))
    assert history == [(s, s) for s in range(1, 8)] + [(8, 80)]
    assert [m.step for m in client.get_metric_history(killed.run_ids["mlflow"], "eval_loss")] == [7, 8]


@needs_mlflow
def test_a_run_resumed_from_step_0_continues_its_mlflow_run(tiny_model_dir, tmp_path):
    """Killed before its first checkpoint, a run starts again from step 0: in the same MLflow run (a new one left
    the first RUNNING for ever and took its id out of the manifest), each step logged once."""
    from mlflow.tracking import MlflowClient

    from tunelab.cli.train import train_from_args
    from tunelab.rundir import RunDir

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(alpaca_records()[:12]), encoding="utf-8")
    uri = (tmp_path / "mlruns").as_uri()
    run = train(load_config(None, [f"model.name={tiny_model_dir}", "model.dtype=fp32", f"data.train={data}",
                                   f"output.dir={tmp_path}", "output.run_name=r", "training.max_steps=3",
                                   "training.batch_size=4", "training.logging_steps=1", "eval.metrics=[perplexity]",
                                   "tracking.report_to=[mlflow]", f"tracking.mlflow_tracking_uri={uri}"]))
    run_id = json.loads((run / "manifest.json").read_text())["tracking"]["mlflow"]
    for point in run.glob("checkpoint-*"):
        shutil.rmtree(point)
    RunDir(run).update_manifest(status="interrupted")
    train_from_args(None, [f"output.dir={tmp_path}"], resume=str(run))
    assert json.loads((run / "manifest.json").read_text())["tracking"] == {"mlflow": run_id}
    client = MlflowClient(tracking_uri=uri)
    (only,) = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    assert only.info.run_id == run_id and only.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3]


@needs_mlflow
def test_mlflow_without_uri_stores_beside_the_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    trackers = Trackers(["mlflow"], tmp_path / "runs" / "r1", "r1", "p", {"a": 1})
    trackers.close()
    assert (tmp_path / "runs" / "mlruns").is_dir() and not (tmp_path / "runs" / "r1").exists()


@needs_mlflow
def test_an_mlflow_store_that_cannot_be_used_is_one_error_naming_it(tmp_path):
    with pytest.raises(TunelabError, match=r"^MLflow store nosuch://x: .*; fix tracking.mlflow_tracking_uri"):
        Trackers(["tensorboard", "mlflow"], tmp_path / "run", "r", "p", {}, "nosuch://x")
    uri = (tmp_path / "mlruns").as_uri()
    with pytest.raises(TunelabError, match=rf"^MLflow run 0123abc is not in store {re.escape(uri)}; give the store"):
        Trackers(["mlflow"], tmp_path / "run", "r", "p", {}, uri, run_ids={"mlflow": "0123abc"})


@needs_mlflow
def test_an_mlflow_server_that_cannot_be_reached_is_said_at_once(tmp_path, monkeypatch):
    """MLflow retries with back-off for minutes before it says anything: the first contact tries once (the
    back-off is switched off here so that, unfixed, the test fails rather than waits)."""
    import os
    import socket

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
    said = []
    with pytest.raises(TunelabError, match=rf"^cannot reach the MLflow server at {uri} \(.*refused\); start it"):
        Trackers(["mlflow"], tmp_path / "run", "r", "p", {}, uri, say=said.append)
    assert said == [f"connecting to MLflow at {uri}"]
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # the quick first contact only


@needs_mlflow
def test_a_resume_whose_mlflow_store_fails_keeps_the_runs_config(tiny_model_dir, tmp_path, signal_after_step):
    """A resume pointed at another store stops with one error, and its override is not saved: a plain --resume
    then continues the run's own MLflow run."""
    from mlflow.tracking import MlflowClient

    from tunelab.cli.train import train_from_args
    from tunelab.train.lifecycle import TrainingInterrupted

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(alpaca_records()[:12]), encoding="utf-8")
    uri, other = (tmp_path / "mlruns").as_uri(), (tmp_path / "other_mlruns").as_uri()
    signal_after_step(2, signal.SIGINT)
    with pytest.raises(TrainingInterrupted):
        train(load_config(None, [f"model.name={tiny_model_dir}", "model.dtype=fp32", f"data.train={data}",
                                 f"output.dir={tmp_path}", "output.run_name=r", "training.max_steps=3",
                                 "training.batch_size=4", "eval.metrics=[perplexity]", "tracking.report_to=[mlflow]",
                                 f"tracking.mlflow_tracking_uri={uri}"]))
    signal_after_step(None)
    run = tmp_path / "r"
    saved = (run / "config.yaml").read_text()
    run_id = json.loads((run / "manifest.json").read_text())["tracking"]["mlflow"]
    with pytest.raises(TunelabError, match=rf"MLflow run {run_id} is not in store {re.escape(other)}"):
        train_from_args(None, [f"output.dir={tmp_path}", f"tracking.mlflow_tracking_uri={other}"], resume=str(run))
    assert (run / "config.yaml").read_text() == saved
    train_from_args(None, [f"output.dir={tmp_path}"], resume=str(run))
    assert json.loads((run / "manifest.json").read_text())["status"] == "finished"
    assert MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "FINISHED"


def test_missing_tracker_package_names_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(TunelabError, match=r"tunelab\[wandb\]"):
        Trackers(["tensorboard", "wandb"], tmp_path, "r", "p", {})
    with pytest.raises(TunelabError, match=r"tunelab\[mlflow\]"):
        Trackers(["mlflow"], tmp_path, "r", "p", {})
    off = Trackers(["none"], tmp_path / "quiet", "r", "p", {})
    off.log({"loss": 1.0}, 1)
    off.close()
    assert not (tmp_path / "quiet").exists()


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    trackers = Trackers(["wandb"], tmp_path, "offline-run", "tunelab-tests", {"lora": {"r": 4}})
    run_id = trackers.run_ids["wandb"]
    for step, loss in ((1, 2.0), (2, 1.0)):
        trackers.log({"loss": loss, "step": step}, step)
    trackers.close()
    (offline,) = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert list(offline.glob("*.wandb"))


class _FakeMlflowServer:
    """Just enough of MLflow's REST API for one tracked run (http.server, in a thread); `stop()` takes it away
    mid-run, as a crashed or restarted tracking server would."""

    def __init__(self):
        import http.server
        import threading

        self.batches: list[dict] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self):
                size = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(size) or b"{}")
                path = self.path.split("?")[0]
                info = {"run_id": "r1", "run_uuid": "r1", "experiment_id": "1", "status": "RUNNING",
                        "lifecycle_stage": "active", "start_time": 0, "user_id": "", "artifact_uri": ""}
                code, out = 200, {}
                if path.endswith("experiments/search"):
                    out = {"experiments": []}
                elif path.endswith("experiments/get-by-name"):
                    code, out = 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such experiment"}
                elif path.endswith("experiments/create"):
                    out = {"experiment_id": "1"}
                elif path.endswith("runs/create"):
                    out = {"run": {"info": info, "data": {}}}
                elif path.endswith("runs/log-batch"):
                    server.batches.append(body)
                elif path.endswith("runs/update"):
                    out = {"run_info": info}
                data = json.dumps(out).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = _answer

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@needs_mlflow
def test_an_mlflow_server_gone_mid_training_is_said_once_and_training_goes_on(tiny_model_dir, tmp_path,
                                                                              monkeypatch):
    """A tracking server that died during training stalled the run for minutes of MLflow's retries (7, with
    back-off) and then failed it with a traceback: MLflow is optional, so it is said once, logging to it stops
    after a bounded try, and the run finishes with every metric in metrics.jsonl. (Back-off 0 here so that,
    unfixed, the test fails rather than waits.)"""
    from tunelab.train import monitor

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    server = _FakeMlflowServer()
    real_log = monitor._MlflowRun.log

    def log_then_die(self, scalars, step):
        real_log(self, scalars, step)
        if step == 2:
            server.stop()

    monkeypatch.setattr(monitor._MlflowRun, "log", log_then_die)
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(alpaca_records()[:16]), encoding="utf-8")
    try:
        run = train(load_config(None, [f"model.name={tiny_model_dir}", "model.dtype=fp32", f"data.train={data}",
                                       f"output.dir={tmp_path}", "output.run_name=r", "training.max_steps=4",
                                       "training.batch_size=4", "training.logging_steps=1",
                                       "eval.metrics=[perplexity]", "tracking.report_to=[mlflow]",
                                       f"tracking.mlflow_tracking_uri={server.uri}"]))
    finally:
        server.stop()
    assert json.loads((run / "manifest.json").read_text())["status"] == "finished"
    assert [m["step"] for m in read_metrics(run) if "loss" in m and not m.get("final")] == [1, 2, 3, 4]
    got = [int(b["metrics"][0]["step"]) for b in server.batches if b.get("metrics")]
    assert got == [1, 2]  # what MLflow got before it went away
    warnings = [line for line in (run / "train.log").read_text().splitlines() if "MLflow logging failed" in line]
    assert len(warnings) == 1 and "at step 3" in warnings[0] and "the run goes on without MLflow" in warnings[0]
