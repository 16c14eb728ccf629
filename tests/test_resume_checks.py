"""What a resume checks before it continues a run: the data is the data it trained on (the prepared files' bytes,
not only the fingerprint their report claims), the base weights are the ones it started on, and there is disk for
a checkpoint before step 1 (else a run with save_steps=0 trains every step and then loses them)."""

from __future__ import annotations

import json
import re
import shutil
import signal
from collections import namedtuple
from pathlib import Path

import pytest

from tunelab.config import load_config
from tunelab.data.prepare import load_prepared, prepare_dataset
from tunelab.demo_data import write_demo_data
from tunelab.errors import TunelabError
from tunelab.rundir import read_metrics
from tunelab.train.recipe import TrainingInterrupted, train


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("raw")
    write_demo_data(folder)
    return str(folder / "demo_*.json")


def _cfg(model, data, out, name, *extra):
    return load_config(None, [f"model.name={model}", "model.dtype=fp32", f"data.train={data}", f"output.dir={out}",
                              f"output.run_name={name}", "training.epochs=1", "training.batch_size=4",
                              "training.logging_steps=1", "training.learning_rate=5e-3", "eval.metrics=[perplexity]",
                              "tracking.report_to=[none]", *extra])


def _interrupt(signal_after_step, step: int, cfg, resume: Path | None = None) -> Path:
    """Train `cfg` (or resume the run `resume`) until a SIGTERM after `step` stops it with a checkpoint; the run
    folder."""
    signal_after_step(step, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted):
        train(cfg, resume=str(resume) if resume else None)
    signal_after_step(None)
    return resume or Path(cfg.output.dir) / cfg.output.run_name


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def _cut(path: Path, keep: int) -> bytes:
    """Keep the first `keep` lines of `path` (as the audit cut 26 records to 3); the old bytes."""
    old = path.read_bytes()
    path.write_bytes(b"".join(old.splitlines(keepends=True)[:keep]))
    return old


# ---------------------------------------------------------------- data


def test_a_prepared_folder_s_fingerprint_follows_its_files(demo_files, tmp_path):
    folder = prepare_dataset(demo_files, tmp_path / "prep", console=lambda *_: None).output
    recorded = json.loads((folder / "report.json").read_text())["fingerprint"]
    assert load_prepared(folder).fingerprint == recorded and not load_prepared(folder).edited

    old = _cut(folder / "train.jsonl", 3)
    edited = load_prepared(folder)
    assert edited.fingerprint != recorded and len(edited.train) == 3
    assert edited.edited and edited.edited[0].startswith("train.jsonl (sha256 ")
    (folder / "val.jsonl").unlink()
    assert load_prepared(folder).fingerprint != edited.fingerprint  # the held-out records count too

    (folder / "train.jsonl").write_bytes(old)
    prepare_dataset(demo_files, tmp_path / "prep", console=lambda *_: None)  # the same inputs again: same records
    assert load_prepared(folder).fingerprint == recorded

    report = json.loads((folder / "report.json").read_text())  # a folder prepared before the hashes were recorded
    del report["output_sha256"]
    (folder / "report.json").write_text(json.dumps(report))
    _cut(folder / "train.jsonl", 3)
    assert load_prepared(folder).fingerprint == recorded  # as before: unchecked, never refused


@pytest.mark.parametrize("where", ["prepared folder", "raw files"])
def test_resume_refuses_data_edited_since_and_resumes_once_it_is_back(tiny_model_dir, demo_files, tmp_path,
                                                                      signal_after_step, where):
    """The audit's case: train.jsonl cut from its records to 3 after a checkpoint; the resume used to print the same
    fingerprint, continue from the checkpoint and rewrite the manifest's counts. With raw files the run trains on
    its own prepared copy (<run>/data), which is checked the same way."""
    from tunelab.reproduce import ReproduceError, check_reproducible

    data = demo_files
    if where == "prepared folder":
        data = prepare_dataset(demo_files, tmp_path / "prep", tokenizer=_tokenizer(tiny_model_dir),
                               console=lambda *_: None).output
    run = _interrupt(signal_after_step, 2, _cfg(tiny_model_dir, data, tmp_path / "out", "r", "training.max_steps=4"))
    folder = tmp_path / "prep" if where == "prepared folder" else run / "data"
    counts = _manifest(run)["data"]

    old = _cut(folder / "train.jsonl", 3)
    with pytest.raises(TunelabError, match=r"not the data this run trained on: its files were edited after tunelab "
                                           r"prepare wrote them: train\.jsonl \(sha256 .*start a new run"):
        train(load_config(None), resume=str(run))
    assert _manifest(run)["data"] == counts and _steps(run) == [1, 2]

    (folder / "train.jsonl").write_bytes(old)  # the same bytes again: the same data, resumed
    train(load_config(None), resume=str(run))
    assert _manifest(run)["status"] == "finished" and _steps(run) == [1, 2, 3, 4]

    _cut(folder / "train.jsonl", 3)  # `tunelab reproduce` trusts the same fingerprint
    if where == "prepared folder":
        with pytest.raises(ReproduceError, match="the data changed since"):
            check_reproducible(run)


def test_resume_refuses_a_separate_eval_folder_prepared_again_since(tiny_model_dir, demo_files, tmp_path,
                                                                    signal_after_step):
    """A prepared train folder with a separate prepared data.eval: the eval set was outside the run's fingerprint,
    so a resume after it was prepared again compared its eval losses (and checkpoint-best) across two held-out
    sets without a word; `tunelab reproduce` trusted it too."""
    from tunelab.reproduce import ReproduceError, check_reproducible

    tok = _tokenizer(tiny_model_dir)
    train_dir = prepare_dataset(demo_files, tmp_path / "prep", tokenizer=tok, console=lambda *_: None).output
    ev = prepare_dataset(demo_files, tmp_path / "ev", tokenizer=tok, console=lambda *_: None).output
    cfg = _cfg(tiny_model_dir, train_dir, tmp_path / "out", "r", "training.max_steps=4", f"data.eval={ev}",
               "training.eval_steps=2")
    run = _interrupt(signal_after_step, 2, cfg)
    recorded = _manifest(run)["data"]
    assert recorded["eval_folder"] == str(ev) and recorded["eval_fingerprint"] == load_prepared(ev).fingerprint

    old = _cut(Path(ev) / "val.jsonl", 2)
    with pytest.raises(TunelabError, match=r"--resume: the eval data in .*ev is not the data this run evaluated on "
                                           r"\(fingerprint .*checkpoint-best would compare"):
        train(load_config(None), resume=str(run))
    (Path(ev) / "val.jsonl").write_bytes(old)
    train(load_config(None), resume=str(run))
    assert _manifest(run)["status"] == "finished" and _steps(run) == [1, 2, 3, 4]

    _cut(Path(ev) / "val.jsonl", 2)
    with pytest.raises(ReproduceError, match=r"the eval data changed since r was trained"):
        check_reproducible(run)


def _tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _steps(run: Path) -> list[int]:
    return [m["step"] for m in read_metrics(run) if "loss" in m and not m.get("final")]


# ---------------------------------------------------------------- base weights


def test_resume_refuses_base_weights_replaced_since(tiny_model_dir, model_dir, demo_files, tmp_path,
                                                    signal_after_step):
    """The audit's case: model.name a local folder whose weights were replaced; the resume said nothing and the
    loss jumped. The same bytes put back (even by a plain cp) resume; a run recorded before the identity resumes too."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    weights = base / "model.safetensors"
    shutil.copy2(weights, tmp_path / "original.safetensors")
    cfg = _cfg(base, demo_files, tmp_path / "out", "r", "training.max_steps=4")
    run = _interrupt(signal_after_step, 1, cfg)

    shutil.copy(model_dir / "model.safetensors", weights)  # same architecture, other weights
    with pytest.raises(TunelabError, match=r"base model .* is not the one this run started on: .*model\.safetensors"
                                           r".* recorded, .* now.*start a new run"):
        train(load_config(None), resume=str(run))

    shutil.copy(tmp_path / "original.safetensors", weights)  # the same bytes at a new time: the same weights
    assert weights.stat().st_mtime_ns != (tmp_path / "original.safetensors").stat().st_mtime_ns
    _interrupt(signal_after_step, 2, load_config(None), resume=run)
    assert _steps(run) == [1, 2]

    manifest = _manifest(run)  # as an older tunelab left it: no identity recorded
    del manifest["base_model"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    train(load_config(None), resume=str(run))
    assert "records no identity of its base weights" in (run / "train.log").read_text()
    assert _manifest(run)["status"] == "finished"
    assert _manifest(run)["base_model"]["files"]["model.safetensors"]["bytes"] == weights.stat().st_size


def test_base_identity_of_a_hub_model_and_of_the_bundled_one(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from tunelab.model.loading import base_changes, base_identity

    repo = tmp_path / "models--owner--name"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    first = base_identity("owner/name")
    assert first["commit"] == "a" * 40 and base_changes(first, base_identity("owner/name")) == []
    assert base_identity("owner/name", revision="b" * 40)["commit"] == "b" * 40
    (repo / "refs" / "main").write_text("b" * 40)  # a newer snapshot downloaded since
    assert base_changes(first, base_identity("owner/name")) == [
        f"owner/name resolves to commit {'b' * 40} now, {'a' * 40} when the run started"]
    assert base_changes(first, base_identity("other/unknown")) == []  # not in the cache: cannot tell, not refused

    bundled = base_identity("bundled:smollm2-135m-instruct")
    assert bundled["kind"] == "bundled" and len(bundled["sha256"]) == 64
    assert base_changes(bundled, dict(bundled)) == []
    assert "sha256" in base_changes({**bundled, "sha256": "0" * 64}, bundled)[0]


# ---------------------------------------------------------------- disk


def _disk(monkeypatch, free_mib: float, when=lambda: True) -> None:
    """shutil.disk_usage says `free_mib` MiB are free while `when()` holds (the real figure otherwise)."""
    real = shutil.disk_usage

    def usage(path):
        if not when():
            return real(path)
        return namedtuple("usage", "total used free")(10 * 2**30, 10 * 2**30, int(free_mib * 2**20))

    monkeypatch.setattr(shutil, "disk_usage", usage)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_too_little_disk_for_a_checkpoint_is_refused_before_step_one(tiny_model_dir, demo_files, tmp_path,
                                                                     monkeypatch, stage):
    """The audit's case: with save_steps=0 every step trained and then checkpoint-final was refused ("about 20 MiB
    needed, 30 MiB free ... resume with --resume"), and --resume started from step 0. The preference recipe too."""
    data = demo_files
    if stage == "dpo":
        data = tmp_path / "pairs.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": "No."})
                                + "\n" for i in range(8)))
    _disk(monkeypatch, 30)
    with pytest.raises(TunelabError) as err:
        train(_cfg(tiny_model_dir, data, tmp_path, "small", "training.max_steps=2", f"training.stage={stage}"))
    assert re.search(r"for a checkpoint: it takes about 20 MiB, and one is written only when that plus a margin of "
                     r"20% \+ 50 MiB \(7\d MiB in all\) is free; 30 MiB are free\. Nothing was trained", str(err.value))
    assert not (tmp_path / "small").exists()  # nothing trained: no folder left behind


def test_a_final_checkpoint_that_cannot_be_written_says_the_weights_are_lost(tiny_model_dir, demo_files, tmp_path,
                                                                             monkeypatch):
    """Room at the start, none at the end (something else filled the disk): the error says plainly that the
    trained weights were not saved, how much room a checkpoint needs, and that a resume starts from step 0."""
    import tunelab.train.monitor as monitor

    done = {}
    original = monitor.Reporter.advance

    def advance(self, step, info):
        original(self, step, info)
        done["last"] = step == 2

    monkeypatch.setattr(monitor.Reporter, "advance", advance)
    _disk(monkeypatch, 30, when=lambda: done.get("last", False))
    with pytest.raises(TunelabError, match=r"the trained weights were NOT saved: checkpoint-final, the result of all "
                                           r"2 steps, could not be written \(not enough free disk .*20 MiB.*\)\. "
                                           r"They are lost when this process ends; no checkpoint of this run exists, "
                                           r"so a resume trains it again from step 0") as err:
        train(_cfg(tiny_model_dir, demo_files, tmp_path, "filled", "training.max_steps=2"))
    assert _manifest(tmp_path / "filled")["status"] == "failed"
    assert str(err.value).count("--resume") == 1 and "Free some space" not in str(err.value)  # the advice, once


def test_a_final_checkpoint_asks_room_for_its_weights_not_for_an_optimiser_it_does_not_hold():
    import torch

    from tunelab.train.recipe import checkpoint_bytes

    model = torch.nn.Linear(1000, 1000, bias=False)  # 1M trainable parameters, fp32
    assert checkpoint_bytes(model, "lora") == 12_000_000 + 20 * 2**20  # weights and two Adam moments
    assert checkpoint_bytes(model, "lora", optimizer=False) == 4_000_000 + 20 * 2**20


def test_resume_checks_command_line_overrides_against_the_run_s_own_config(tmp_path, monkeypatch):
    """`tunelab train --resume RUN training.early_stopping_patience=5` (safe on resume) for a run with eval_steps: 50
    was refused: the override was checked against the defaults (eval_steps 0) instead of the run's config."""
    from tunelab.cli.train import train_from_args
    from tunelab.config import save_config

    run = tmp_path / "r"
    run.mkdir()
    save_config(load_config(None, ["training.eval_steps=50", f"output.dir={tmp_path}", "output.run_name=r"]),
                run / "config.yaml")
    given = {}
    monkeypatch.setattr("tunelab.train.recipe.train", lambda cfg, **kw: given.update(cfg=cfg, **kw))
    assert train_from_args(None, ["training.early_stopping_patience=5"], resume=str(run)) == 0
    assert given["cfg"].training.eval_steps == 50 and given["cfg"].training.early_stopping_patience == 5
    assert given["resume"] == str(run) and given["overrides"] == ["training.early_stopping_patience=5"]


def test_the_stage_of_a_run_saved_with_patience_and_no_eval_steps_is_read(tmp_path):
    """A run an older tunelab trained with early_stopping_patience and eval_steps 0 (patience did nothing) could not
    resume: the stage was read from its config.yaml with today's stricter checks, not as a run's config."""
    from tunelab.train.recipe import _stage

    run = tmp_path / "old"
    run.mkdir()
    (run / "config.yaml").write_text("training: {stage: sft, early_stopping_patience: 3, eval_steps: 0}\n")
    assert _stage(load_config(None, ["training.stage=kto"]), str(run)) == "sft"
