"""One owner for a run's life (tunelab.train.lifecycle): status from starting to finished / failed / interrupted,
the error in the manifest and train.log, no orphan folder, no stale data, resume overrides, and checkpoints that
survive SIGKILL in the middle of a save and a full disk."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunelab.config import load_config
from tunelab.demo_data import write_demo_data
from tunelab.errors import TunelabError
from tunelab.train import checkpoint as ckpt
from tunelab.train.recipe import train


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("raw")
    write_demo_data(folder)
    return str(folder / "demo_*.json")


def _overrides(model, data, out, name, *extra) -> list[str]:
    return [f"model.name={model}", "model.dtype=fp32", f"data.train={data}", f"output.dir={out}",
            f"output.run_name={name}", "training.epochs=1", "training.batch_size=4", "training.logging_steps=1",
            "training.learning_rate=5e-3", "eval.metrics=[perplexity]", "tracking.report_to=[none]", *extra]


def _cfg(model, data, out, name, *extra):
    return load_config(None, _overrides(model, data, out, name, *extra))


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def test_a_failure_before_training_leaves_no_folder_and_says_why(tiny_model_dir, demo_files, tmp_path,
                                                                  monkeypatch):
    import tunelab.train.recipe as recipe

    seen = {}
    original = recipe.build_model

    def build_model(cfg, accelerator, say):
        seen["status"] = _manifest(tmp_path / "bad")["status"]  # the folder exists and says so while loading
        return original(cfg, accelerator, say)

    monkeypatch.setattr(recipe, "build_model", build_model)
    with pytest.raises(TunelabError, match=r"lora: .*no_such_proj.*q_proj"):
        train(_cfg(tiny_model_dir, demo_files, tmp_path, "bad", "lora.target_modules=[no_such_proj]"))
    assert seen["status"] == "starting"
    assert not (tmp_path / "bad").exists(), "nothing was trained: no orphan run folder, no prepared data"


def test_inputs_that_cannot_be_used_are_clear_errors_before_training(tiny_model_dir, demo_files, tmp_path):
    """Found off the happy path: each of these used to be a traceback, or a run on something the user did not mean."""
    from tunelab.data.prepare import prepare_dataset

    def refused(name, says, *extra):
        with pytest.raises(TunelabError, match=says):
            train(_cfg(tiny_model_dir, demo_files, tmp_path / "out", name, *extra))
        assert not (tmp_path / "out" / name).exists()

    # a chat template path that is not there was used as the template text itself (every record then rejected)
    refused("tpl", r"model.chat_template \(read as a file.*no file .*nope.jinja", "model.chat_template=nope.jinja")
    # a folder `tunelab prepare` reported NOT USABLE (and exited 1) was trained on without a word
    ok = write_demo_data(tmp_path / "raw")[0]
    bad = tmp_path / "mixed.json"
    bad.write_text(json.dumps(json.loads(ok.read_text())[:3] + [{"instruction": "", "output": ""}] * 3))
    assert not prepare_dataset([str(bad)], tmp_path / "unusable", max_reject_ratio=0.1).usable
    refused("unusable", r"unusable is not usable, as tunelab prepare reported: 3 of 6 records", "data.train=" + str(
        tmp_path / "unusable"))
    # with a prepared train folder, a raw data.eval file was read as a prepared folder (and the hint wrong)
    prepare_dataset([str(ok)], tmp_path / "good")
    refused("eval", r"data.eval=.*must be a\s+prepared folder too", f"data.train={tmp_path / 'good'}",
            f"data.eval={ok}")
    # output.dir naming a file
    (tmp_path / "afile").write_text("x")
    with pytest.raises(TunelabError, match="cannot make the run folder .*afile"):
        train(_cfg(tiny_model_dir, demo_files, tmp_path / "afile", "r"))
    with pytest.raises(TunelabError, match="cannot write the prepared dataset to .*afile/sub"):
        prepare_dataset([str(ok)], tmp_path / "afile" / "sub")


def test_rerun_after_a_failed_start_prepares_the_new_data(tiny_model_dir, demo_files, tmp_path):
    with pytest.raises(TunelabError):  # fails after preparing data/ from the demo files
        train(_cfg(tiny_model_dir, demo_files, tmp_path, "same", "lora.target_modules=[no_such_proj]"))
    new_data = tmp_path / "new.json"
    new_data.write_text(json.dumps([{"instruction": f"Say {i}", "output": f"It is {i}."} for i in range(12)]))
    run = train(_cfg(tiny_model_dir, str(new_data), tmp_path, "same", "training.max_steps=1"))
    man = _manifest(run)
    assert man["status"] == "finished" and man["data"]["source"] == str(new_data)
    assert "Tuna" not in (run / "data" / "train.jsonl").read_text() and "It is" in (run / "data" / "train.jsonl").read_text()


@pytest.mark.parametrize("files", [{"thesis.tex": "precious"},
                                   {"config.yaml": "mine: true\n", "data/train.json": "[]"}])
def test_a_folder_that_is_not_a_run_is_refused_and_kept(tiny_model_dir, demo_files, tmp_path, files):
    """Never deleted, even when it looks like what an older tunelab left after a failed start."""
    for name, text in files.items():
        (tmp_path / "mine" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "mine" / name).write_text(text)
    with pytest.raises(TunelabError, match="holds no tunelab run.*rm -r"):
        train(_cfg(tiny_model_dir, demo_files, tmp_path, "mine"))
    assert all((tmp_path / "mine" / n).read_text() == t for n, t in files.items())


def test_a_failure_after_training_started_is_recorded_and_listed(tiny_model_dir, demo_files, tmp_path,
                                                                  monkeypatch):
    import tunelab.train.recipe as recipe
    from tunelab.runs import list_runs

    def broken(s):
        raise RuntimeError("the evaluation backend fell over")

    monkeypatch.setattr(recipe, "_final_generation_metrics", broken)
    with pytest.raises(RuntimeError):
        train(_cfg(tiny_model_dir, demo_files, tmp_path, "late", "training.max_steps=2"))
    man = _manifest(tmp_path / "late")
    assert man["status"] == "failed" and man["failure"] == "error" and man["global_step"] == 2
    assert man["error"] == "RuntimeError: the evaluation backend fell over" and man["ended_at"]
    assert "error: RuntimeError: the evaluation backend fell over" in (tmp_path / "late" / "train.log").read_text()
    assert [(r.name, r.status) for r in list_runs(tmp_path)] == [("late", "failed")]


def test_ctrl_c_during_the_generation_metrics_skips_them_and_the_run_finishes(tiny_model_dir, demo_files, tmp_path,
                                                                               monkeypatch):
    """After checkpoint-final, BLEU's generation can take minutes: Ctrl-C then stops it (it used to be ignored
    silently, and a second Ctrl-C marked a saved run interrupted)."""
    import tunelab.evaluate.generation as generation

    original = generation.generate_answers

    def generate_answers(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # arrives while answers are generated
        return original(*args, **kwargs)

    monkeypatch.setattr(generation, "generate_answers", generate_answers)
    run = train(_cfg(tiny_model_dir, demo_files, tmp_path, "gen", "training.max_steps=2",
                     "eval.metrics=[perplexity,bleu]"))
    man = _manifest(run)
    assert man["status"] == "finished" and "perplexity" in man["metrics"] and "bleu" not in man["metrics"]
    log = (run / "train.log").read_text()
    assert "generation metrics (bleu) skipped: SIGINT received; checkpoint-final is saved" in log
    assert (run / "checkpoint-final" / "adapter_model.safetensors").is_file()


def test_resume_applies_safe_overrides_and_refuses_the_others_by_name(tiny_model_dir, demo_files, tmp_path,
                                                                       monkeypatch, signal_after_step):
    from tunelab.cli.train import train_from_args
    from tunelab.train.lifecycle import TrainingInterrupted

    signal_after_step(2, signal.SIGINT)
    with pytest.raises(TrainingInterrupted):
        train(_cfg(tiny_model_dir, demo_files, tmp_path, "r", "training.max_steps=4"))
    monkeypatch.undo()
    run = tmp_path / "r"
    assert _manifest(run)["status"] == "interrupted"
    with pytest.raises(TunelabError, match=r"--resume cannot change training.learning_rate, lora.r\b"):
        train_from_args(None, [f"output.dir={tmp_path}", "training.learning_rate=1e-3", "lora.r=4",
                               "training.eval_steps=1"], resume=str(run))
    # the run's own values repeated (the same command line again) change nothing and are accepted
    assert load_config(run / "config.yaml").training.eval_steps == 0  # nothing applied from a refused resume
    train_from_args(None, [f"output.dir={tmp_path}", "training.eval_steps=1", "training.learning_rate=5e-3",
                           "training.max_steps=4"], resume=str(run))
    assert load_config(run / "config.yaml").training.eval_steps == 1
    log = (run / "train.log").read_text()
    assert "Changed on resume: training.eval_steps=1" in log and "Eval @ step 3" in log
    assert _manifest(run)["status"] == "finished"


def test_resume_refuses_a_run_another_process_is_training_but_not_a_reused_pid(tiny_model_dir, demo_files, tmp_path,
                                                                               monkeypatch, signal_after_step):
    """Two processes in one run folder would interleave their steps and checkpoints: `--resume RUN` refuses while
    the process the manifest names is alive. A live process with that pid but another start time is not it."""
    from tunelab.cli.train import train_from_args
    from tunelab.rundir import RunDir, process_started
    from tunelab.train.lifecycle import TrainingInterrupted

    signal_after_step(2, signal.SIGINT)
    with pytest.raises(TrainingInterrupted):
        train(_cfg(tiny_model_dir, demo_files, tmp_path, "live", "training.max_steps=3"))
    monkeypatch.undo()
    run = tmp_path / "live"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = process_started(other.pid)
        RunDir(run).update_manifest(status="running", pid=other.pid, pid_started=started)
        with pytest.raises(TunelabError, match=rf"being trained right now by process {other.pid}"):
            train_from_args(None, [f"output.dir={tmp_path}"], resume=str(run))
        assert _manifest(run)["status"] == "running" and _manifest(run)["pid"] == other.pid  # left to its owner
        RunDir(run).update_manifest(pid_started=started - 3600)  # the run's process died, its pid was reused
        train_from_args(None, [f"output.dir={tmp_path}"], resume=str(run))
    finally:
        other.kill()
        other.wait()
    assert _manifest(run)["status"] == "finished" and _manifest(run)["pid"] == os.getpid()


def test_a_run_resumed_before_its_first_checkpoint_trains_as_a_fresh_one(tiny_model_dir, demo_files, tmp_path):
    """A second Ctrl-C before the first checkpoint keeps the run (it logged steps) without a checkpoint; `--resume`
    starts it again from step 0 and must then train exactly as the fresh run did (it used to re-seed torch's
    generator after the adapters were made, so the dropout masks differed)."""
    from tunelab.cli.train import train_from_args
    from tunelab.rundir import RunDir

    run = train(_cfg(tiny_model_dir, demo_files, tmp_path, "again", "training.max_steps=3"))
    fresh = [(r["loss"], r["grad_norm"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "grad_norm" in r]
    for point in run.glob("checkpoint-*"):
        shutil.rmtree(point)
    RunDir(run).update_manifest(status="interrupted")
    train_from_args(None, [f"output.dir={tmp_path}"], resume=str(run))
    assert "No complete checkpoint in the run yet: starting it from step 0" in (run / "train.log").read_text()
    again = [(r["loss"], r["grad_norm"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "grad_norm" in r]
    assert len(fresh) == 3 and again == fresh


def test_resume_refuses_data_that_is_not_the_runs(tiny_model_dir, demo_files, tmp_path, monkeypatch,
                                                  signal_after_step):
    from tunelab.train.lifecycle import TrainingInterrupted

    signal_after_step(1, signal.SIGINT)
    with pytest.raises(TrainingInterrupted):
        train(_cfg(tiny_model_dir, demo_files, tmp_path, "fp", "training.max_steps=3"))
    monkeypatch.undo()
    report = tmp_path / "fp" / "data" / "report.json"
    data = json.loads(report.read_text())
    data["fingerprint"] = "sha256:" + "0" * 64
    report.write_text(json.dumps(data))
    with pytest.raises(TunelabError, match="is not the data this run trained on"):
        train(load_config(None), resume=str(tmp_path / "fp"))
    assert _manifest(tmp_path / "fp")["status"] == "failed"  # kept: it holds a checkpoint


# ---------------------------------------------------------------- faults while saving

_CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    from tunelab.config import load_config
    from tunelab.train.recipe import train

    kill_in = sys.argv[1]  # a checkpoint name: SIGKILL between its adapter file and its optimizer file
    real_save = torch.save

    def save(obj, path, *a, **k):
        if kill_in != "-" and str(path).endswith(f".{kill_in}.tmp/optimizer.pt"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, path, *a, **k)

    torch.save = save
    train(load_config(None, sys.argv[2:]))
""")


def _child(kill_in: str, overrides: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CHILD, kill_in, *overrides], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "TUNELAB_ALLOCATOR": "system"})


def test_sigkill_in_the_middle_of_a_checkpoint_then_resume_equals_an_uninterrupted_run(tiny_model_dir, demo_files,
                                                                                       tmp_path):
    extra = ("training.save_steps=2", "training.max_steps=6")
    whole = _child("-", _overrides(tiny_model_dir, demo_files, tmp_path, "whole", *extra))
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = _child("checkpoint-4", _overrides(tiny_model_dir, demo_files, tmp_path, "killed", *extra))
    assert killed.returncode == -signal.SIGKILL
    run = tmp_path / "killed"
    assert (run / ".checkpoint-4.tmp" / "adapter_model.safetensors").is_file()  # killed between two files
    assert [s for s, _ in ckpt.complete_checkpoints(run)] == [2]
    train(load_config(None), resume=str(run))
    assert _manifest(run)["status"] == "finished" and not (run / ".checkpoint-4.tmp").exists()
    a = load_file(tmp_path / "whole" / "checkpoint-final" / "adapter_model.safetensors")
    b = load_file(run / "checkpoint-final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


# torch.save on a full disk raises RuntimeError ("unexpected pos"), a plain write OSError(ENOSPC)
@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")])
def test_a_full_disk_during_a_save_is_a_clear_error_and_keeps_the_previous_checkpoint(tiny_model_dir, demo_files,
                                                                                       tmp_path, monkeypatch, error):
    import shutil
    from collections import namedtuple

    real_save, real_usage = torch.save, shutil.disk_usage
    writing = {}

    def save(obj, path, *a, **k):
        if ".checkpoint-4.tmp" in str(path):
            writing["now"] = True
            raise error
        return real_save(obj, path, *a, **k)

    def usage(path):  # the disk looks full while checkpoint-4 is being written
        return namedtuple("usage", "total used free")(1, 1, 0) if writing.get("now") else real_usage(path)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", usage)
    with pytest.raises(TunelabError, match=r"could not write checkpoint-4 .*the disk is full.*--resume"):
        train(_cfg(tiny_model_dir, demo_files, tmp_path, "full", "training.save_steps=2", "training.max_steps=6"))
    run = tmp_path / "full"
    assert [s for s, _ in ckpt.complete_checkpoints(run)] == [2]
    assert not (run / ".checkpoint-4.tmp").exists()
    man = _manifest(run)
    assert man["status"] == "failed" and "the disk is full" in man["error"]
    monkeypatch.undo()
    train(load_config(None), resume=str(run))
    assert _manifest(run)["status"] == "finished"


def test_a_kill_between_the_two_renames_of_a_replacement_is_repaired(tmp_path):
    """Replacing checkpoint-best moves the old one aside first; a kill right then must not lose it."""
    ckpt.save_checkpoint(tmp_path, "checkpoint-best", lambda d: (d / "w.bin").write_bytes(b"x"))
    os.replace(tmp_path / "checkpoint-best", tmp_path / ".checkpoint-best.old")  # the state a kill leaves
    ckpt.rotate(tmp_path, 2)
    assert (tmp_path / "checkpoint-best" / "w.bin").read_bytes() == b"x"
    assert not (tmp_path / ".checkpoint-best.old").exists()
