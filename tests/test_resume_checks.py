"""What a resume checks before it continues a run: the data is the data it trained on (the prepared files' bytes,
not only the fingerprint their report claims)."""

from __future__ import annotations

import json
import signal
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


def _tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _steps(run: Path) -> list[int]:
    return [m["step"] for m in read_metrics(run) if "loss" in m and not m.get("final")]
