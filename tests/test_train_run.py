"""End-to-end behaviour of `tunelab.train.recipe.train` on the tiny model: the run folder contract, resume
equivalence after a mid-epoch stop, reproducibility, the divergence guard and crash-safe checkpoints."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunelab.config import load_config
from tunelab.demo_data import write_demo_data
from tunelab.train import checkpoint as ckpt
from tunelab.train.recipe import TrainingDiverged, TrainingInterrupted, train
from tunelab.rundir import read_metrics


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("raw")
    write_demo_data(folder)
    return str(folder / "demo_*.json")


def _cfg(tiny_model_dir, demo_files, out, name, *extra, dtype="fp32"):
    """Pinned precision: these tests compare numbers, which must not depend on what `auto` picks on this CPU."""
    return load_config(None, [f"model.name={tiny_model_dir}", f"model.dtype={dtype}", f"data.train={demo_files}",
                              f"output.dir={out}",
                              f"output.run_name={name}", "training.epochs=1", "training.batch_size=4",
                              "training.logging_steps=1", "training.learning_rate=5e-3", "eval.metrics=[perplexity]",
                              "tracking.report_to=[none]", *extra])


def _interrupted_run(signal_after_step, step: int, signum: int, cfg) -> None:
    """Train `cfg`, sending `signum` to ourselves once `step` is done; the run must stop with TrainingInterrupted."""
    signal_after_step(step, signum)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        train(cfg)
    signal_after_step(None)


def _losses(run: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run) if "loss" in m and not m.get("final")]


def test_run_folder_contract(tiny_model_dir, demo_files, tmp_path):
    run = train(_cfg(tiny_model_dir, demo_files, tmp_path, "contract", "training.save_steps=3",
                     "training.eval_steps=3", "tracking.report_to=[tensorboard]"))
    top = {p.name for p in run.iterdir()}
    assert top == {"config.yaml", "manifest.json", "metrics.jsonl", "train.log", "data", "tensorboard", ".run.lock",
                   "checkpoint-3", "checkpoint-6", "checkpoint-best", "checkpoint-final"}
    final = {p.name for p in (run / "checkpoint-final").iterdir()}
    assert final == {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                     "chat_template.jinja", "tunelab.json", "README.md", "manifest.json"}
    step = {p.name for p in (run / "checkpoint-3").iterdir()}
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pt", "trainer_state.json",
            "manifest.json"} <= step
    man = json.loads((run / "manifest.json").read_text())
    assert man["status"] == "finished" and man["seed"] == 42 and man["data_fingerprint"].startswith("sha256:")
    assert {"torch", "transformers", "peft"} <= set(man["versions"]) and man["hardware"]["cpu_count"]
    assert man["started_at"] and man["ended_at"] and man["global_step"] == man["total_steps"]
    assert "eval_loss" in man["metrics"] and "perplexity" in man["metrics"]
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics if "loss" in m and not m.get("final")] == list(range(1, man["total_steps"] + 1))
    assert any("eval_loss" in m and not m.get("final") for m in metrics)
    log = (run / "train.log").read_text()
    assert "Epoch 1/1:" in log and "| Loss: " in log and "Perplexity:" in log

    # plain peft + transformers load the final adapter, with no tunelab involved
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run / "checkpoint-final")
    assert tok.chat_template
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "checkpoint-final")
    assert any("lora_A" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_resumed_run_equals_uninterrupted_run(tiny_model_dir, demo_files, tmp_path, signal_after_step, dtype):
    full = train(_cfg(tiny_model_dir, demo_files, tmp_path, "full", "training.save_steps=2", dtype=dtype))

    # Same run, stopped by SIGTERM after step 3 (mid-epoch, between checkpoints): the handler lets the step
    # finish, writes checkpoint-3 and raises with the resume command. Exact in bf16 too: same ops, same order.
    _interrupted_run(signal_after_step, 3, signal.SIGTERM,
                     _cfg(tiny_model_dir, demo_files, tmp_path, "split", "training.save_steps=2", dtype=dtype))
    split = tmp_path / "split"
    assert json.loads((split / "manifest.json").read_text())["status"] == "interrupted"
    assert [s for s, _ in ckpt.complete_checkpoints(split)][-1] == 3
    assert not (split / "checkpoint-final").exists()

    train(load_config(None, [f"output.dir={tmp_path}"]), resume=str(split))
    assert json.loads((split / "manifest.json").read_text())["status"] == "finished"
    a, b = _losses(full), _losses(split)
    assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    wa = load_file(full / "checkpoint-final" / "adapter_model.safetensors")
    wb = load_file(split / "checkpoint-final" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_same_seed_same_losses(tiny_model_dir, demo_files, tmp_path, dtype):
    a = _losses(train(_cfg(tiny_model_dir, demo_files, tmp_path, "a", "training.max_steps=3", dtype=dtype)))
    b = _losses(train(_cfg(tiny_model_dir, demo_files, tmp_path, "b", "training.max_steps=3", dtype=dtype)))
    c = _losses(train(_cfg(tiny_model_dir, demo_files, tmp_path, "c", "training.max_steps=3", "training.seed=7",
                           dtype=dtype)))
    assert a == b
    assert a != c


def test_divergence_guard_names_step_and_batch(tiny_model_dir, demo_files, tmp_path):
    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+.*the batch held .*demo_"):
        train(_cfg(tiny_model_dir, demo_files, tmp_path, "nan", "training.learning_rate=1e30",
                   "training.max_grad_norm=0", "training.save_steps=1"))
    run = tmp_path / "nan"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["failure"] == "diverged"
    assert "diverged at step" in manifest["error"] and "diverged at step" in (run / "train.log").read_text()
    assert ckpt.complete_checkpoints(run), "the good steps before the divergence were checkpointed"
    for _, folder in ckpt.complete_checkpoints(run):  # every kept checkpoint holds finite weights
        assert all(torch.isfinite(t).all() for t in load_file(folder / "adapter_model.safetensors").values())


def test_half_written_checkpoint_is_never_used(tmp_path):
    good = ckpt.save_checkpoint(tmp_path, "checkpoint-2", lambda d: (d / "w.bin").write_bytes(b"x" * 10))
    assert ckpt.is_complete(good)
    broken = tmp_path / "checkpoint-4"
    broken.mkdir()
    (broken / "w.bin").write_bytes(b"partial")  # no manifest: a kill mid-write
    truncated = ckpt.save_checkpoint(tmp_path, "checkpoint-6", lambda d: (d / "w.bin").write_bytes(b"y" * 10))
    (truncated / "w.bin").write_bytes(b"y")  # size no longer matches the manifest
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [2]


def test_disk_check_refuses_clearly(tmp_path):
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="not enough free disk"):
        ckpt.check_disk(tmp_path, 10 * 2**50)


def test_resume_survives_a_torn_metrics_line_and_refuses_a_finished_run(tiny_model_dir, demo_files, tmp_path,
                                                                          signal_after_step):
    from tunelab.errors import TunelabError

    _interrupted_run(signal_after_step, 2, signal.SIGINT, _cfg(tiny_model_dir, demo_files, tmp_path, "torn",
                                                         "training.max_steps=4"))
    run = tmp_path / "torn"
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # a kill in the middle of an append
    train(load_config(None), resume=str(run))
    assert [m["step"] for m in read_metrics(run) if "loss" in m and not m.get("final")] == [1, 2, 3, 4]
    with pytest.raises(TunelabError, match="already finished"):
        train(load_config(None), resume=str(run))


def test_max_length_past_the_models_positions_is_refused(tiny_model_dir, demo_files, tmp_path):
    """data.max_length 2048 on a model with 1024 positions trained rotary positions it never had (a learned
    position table fails in the lookup instead)."""
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match=r"data.max_length=2048 .* max_position_embeddings \(1024\)"):
        train(_cfg(tiny_model_dir, demo_files, tmp_path, "too-long", "data.max_length=2048"))
    assert not (tmp_path / "too-long").exists()  # nothing trained: no run folder left behind


def test_a_nan_eval_is_not_the_best_and_evaluation_without_eval_records_is_said(tiny_model_dir, demo_files, tmp_path,
                                                                                 monkeypatch):
    """A first evaluation whose loss was NaN became the best (nothing compares below NaN): checkpoint-best kept the
    NaN step's weights and every later, better evaluation counted as no improvement. And with nothing held out
    (data.val_ratio 0), training.eval_steps silently never evaluated."""
    from tunelab.train import recipe

    real = recipe._val_loss
    monkeypatch.setattr(recipe, "_val_loss", lambda s: (float("nan"), 1) if s.state.global_step == 1 else real(s))
    run = train(_cfg(tiny_model_dir, demo_files, tmp_path, "nan", "training.eval_steps=1", "training.max_steps=3"))
    log = (run / "train.log").read_text()
    evals = [line for line in log.splitlines() if "Eval @ step" in line]
    assert [line.endswith("(best)") for line in evals][:2] == [False, True], evals  # step 2: the first finite one
    assert "warning: no eval records" not in log
    run = train(_cfg(tiny_model_dir, demo_files, tmp_path, "none", "training.eval_steps=1", "training.max_steps=1",
                     "data.val_ratio=0"))
    assert "warning: no eval records are held out, so training.eval_steps 1 do nothing" in \
        (run / "train.log").read_text()
