"""The preference recipe end to end on the tiny model: run folder, metrics, reference recorded, resume equality."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from tunelab.config import load_config
from tunelab.rundir import read_metrics
from tunelab.train import checkpoint as ckpt
from tunelab.train.recipe import TrainingInterrupted, train

QUESTIONS = ["What is 2+2?", "Name a colour.", "Capital of France?", "Say hello.", "一加一等于几？", "天空是什么颜色？",
             "Name a fruit.", "What is water?", "Largest planet?", "一周有几天？", "Name an animal.", "What is ice?"]


@pytest.fixture(scope="module")
def pref_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pref")
    pairs = [{"prompt": q, "chosen": f"A short, polite answer to: {q}", "rejected": "No."} for q in QUESTIONS]
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps(p, ensure_ascii=False) for p in pairs) + "\n")
    kto = [{"prompt": q, "completion": f"A polite answer to: {q}" if i % 2 else "No.", "label": bool(i % 2)}
           for i, q in enumerate(QUESTIONS)]
    sft = [{"instruction": q, "output": f"An answer to: {q}"} for q in QUESTIONS]
    (folder / "sft.jsonl").write_text("\n".join(json.dumps(p, ensure_ascii=False) for p in sft) + "\n")
    (folder / "kto.jsonl").write_text("\n".join(json.dumps(p, ensure_ascii=False) for p in kto) + "\n")
    return folder


def _cfg(model_dir, data, out, name, stage, *extra):
    return load_config(None, [f"model.name={model_dir}", "model.dtype=fp32", f"data.train={data}",
                              f"output.dir={out}", f"output.run_name={name}", f"training.stage={stage}",
                              "training.epochs=2", "training.batch_size=2", "training.logging_steps=1",
                              "training.learning_rate=5e-3", "data.val_ratio=0.2", "tracking.report_to=[none]",
                              *extra])


@pytest.mark.parametrize("stage", ["dpo", "orpo", "simpo", "kto"])
def test_preference_run(tiny_model_dir, pref_files, tmp_path, stage, lr_schedule):
    data = pref_files / ("kto.jsonl" if stage == "kto" else "pairs.jsonl")
    run = train(_cfg(tiny_model_dir, data, tmp_path, stage, stage, "tracking.report_to=[tensorboard]"))
    man = json.loads((run / "manifest.json").read_text())
    assert man["status"] == "finished" and man["stage"] == stage
    assert man["reference"]["kind"] == ("adapter_disabled" if stage in ("dpo", "kto") else "none")
    meta = json.loads((run / "checkpoint-final" / "tunelab.json").read_text())
    assert meta["stage"] == stage and (run / "checkpoint-final" / "adapter_model.safetensors").is_file()
    assert (run / "tensorboard").is_dir()
    steps = [m for m in read_metrics(run) if "loss" in m and not m.get("final")]
    assert [m["step"] for m in steps] == list(range(1, man["total_steps"] + 1))
    assert [m["lr"] for m in steps] == pytest.approx(lr_schedule(load_config(run / "config.yaml"),
                                                                 man["total_steps"]))  # what each step used
    keys = {"rewards/chosen", "rewards/rejected", "rewards/margin"} | ({"kl"} if stage == "kto" else
                                                                         {"rewards/accuracy"})
    assert keys <= (set().union(*steps) if stage == "kto" else set(steps[0]))  # kto: a kind absent from a step
    assert all("rewards/margin" not in m or {"rewards/chosen", "rewards/rejected"} <= set(m) for m in steps)
    log = (run / "train.log").read_text()
    assert "| Loss: " in log and "Margin:" in log
    assert ("KTO labels: " in log) == (stage == "kto")


def test_dpo_learns_the_preference(tiny_model_dir, pref_files, tmp_path):
    run = train(_cfg(tiny_model_dir, pref_files / "pairs.jsonl", tmp_path, "learn", "dpo", "training.epochs=4",
                     "preference.precompute_ref_logps=true"))
    steps = [m for m in read_metrics(run) if "loss" in m and not m.get("final")]
    assert steps[-1]["rewards/margin"] > steps[0]["rewards/margin"]
    assert (run / "ref_logps.pt").is_file()


@pytest.mark.parametrize("precompute", [False, True])
def test_resumed_dpo_run_equals_uninterrupted_run(tiny_model_dir, pref_files, tmp_path, signal_after_step,
                                                  precompute):
    # precompute: the resumed run reads the reference log-probs back from ref_logps.pt
    data, extra = pref_files / "pairs.jsonl", ["training.save_steps=2", f"preference.precompute_ref_logps={precompute}"]
    full = train(_cfg(tiny_model_dir, data, tmp_path, "full", "dpo", *extra))
    signal_after_step(3)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        train(_cfg(tiny_model_dir, data, tmp_path, "split", "dpo", *extra))
    signal_after_step(None)
    split = tmp_path / "split"
    assert [s for s, _ in ckpt.complete_checkpoints(split)][-1] == 3
    if precompute:  # a cache cut short (a full disk) is computed again, not a traceback
        cache = split / "ref_logps.pt"
        cache.write_bytes(cache.read_bytes()[:100])
    train(load_config(None, [f"output.dir={tmp_path}"]), resume=str(split))
    a = [m["loss"] for m in read_metrics(full) if "loss" in m and not m.get("final")]
    b = [m["loss"] for m in read_metrics(split) if "loss" in m and not m.get("final")]
    assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    wa = load_file(full / "checkpoint-final" / "adapter_model.safetensors")
    wb = load_file(split / "checkpoint-final" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


def test_dpo_from_an_sft_adapter(tiny_model_dir, pref_files, tmp_path):
    sft = train(load_config(None, [f"model.name={tiny_model_dir}", "model.dtype=fp32",
                                   f"data.train={pref_files / 'sft.jsonl'}", "training.stage=sft",
                                   f"output.dir={tmp_path}", "output.run_name=sft", "training.max_steps=2",
                                   "eval.metrics=[perplexity]", "tracking.report_to=[none]"]))
    run = train(_cfg(tiny_model_dir, pref_files / "pairs.jsonl", tmp_path, "from-sft", "dpo",
                     f"model.adapter={sft}", "training.max_steps=3"))
    man = json.loads((run / "manifest.json").read_text())
    assert man["reference"]["kind"] == "adapter" and man["reference"]["fingerprint"].startswith("sha256:")
    first = [m for m in read_metrics(run) if "loss" in m][0]
    assert abs(first["rewards/margin"]) < 1e-6  # step 1: the policy is still the reference
    assert set(load_file(run / "checkpoint-final" / "adapter_model.safetensors")) == set(
        load_file(sft / "checkpoint-final" / "adapter_model.safetensors"))


def test_dpo_divergence_guard_names_step_and_pairs(tiny_model_dir, pref_files, tmp_path):
    import torch

    from tunelab.train.lifecycle import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+.*the batch held .*pairs\.jsonl"):
        train(_cfg(tiny_model_dir, pref_files / "pairs.jsonl", tmp_path, "nan", "dpo", "training.learning_rate=1e30",
                   "training.max_grad_norm=0", "training.save_steps=1"))
    run = tmp_path / "nan"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["failure"] == "diverged"
    assert "diverged at step" in (run / "train.log").read_text()
    for _, folder in ckpt.complete_checkpoints(run):  # every kept checkpoint holds finite weights
        assert all(torch.isfinite(t).all() for t in load_file(folder / "adapter_model.safetensors").values())


def test_dpo_step_split_into_micro_batches_equals_one_micro_batch(tiny_model_dir, pref_files, tmp_path):
    """4 pairs per step as one forward or as 2 forwards of 2 (gradient accumulation, the memory setting of
    bench/preference.py's tunelab-dpo-mb2 row): the same pairs, losses, rewards and adapter (DPO's loss is a sum
    over pairs)."""
    data = pref_files / "pairs.jsonl"
    runs = [train(_cfg(tiny_model_dir, data, tmp_path, name, "dpo", *extra)) for name, extra in
            (("one", ["training.batch_size=4"]),
             ("split", ["training.batch_size=2", "training.gradient_accumulation_steps=2"]))]
    (one, split) = [[m for m in read_metrics(r) if "loss" in m and not m.get("final")] for r in runs]
    assert len(one) == len(split) > 1
    for a, b in zip(one, split):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    weights = [load_file(r / "checkpoint-final" / "adapter_model.safetensors") for r in runs]
    for k, v in weights[0].items():
        assert (weights[1][k] - v).abs().max() < 1e-5, k


def test_dpo_resumed_before_its_first_checkpoint_trains_as_the_fresh_run(tiny_model_dir, pref_files, tmp_path):
    """No checkpoint yet (a second Ctrl-C before the first one): `--resume` starts the run from step 0 again, and
    must train it exactly as the fresh run did."""
    import shutil

    from tunelab.rundir import RunDir

    run = train(_cfg(tiny_model_dir, pref_files / "pairs.jsonl", tmp_path, "again", "dpo", "training.max_steps=3"))
    fresh = [(m["loss"], m["grad_norm"]) for m in read_metrics(run) if "grad_norm" in m]
    for point in run.glob("checkpoint-*"):
        shutil.rmtree(point)
    RunDir(run).update_manifest(status="interrupted")
    train(load_config(None, [f"output.dir={tmp_path}"]), resume=str(run))
    again = [(m["loss"], m["grad_norm"]) for m in read_metrics(run) if "grad_norm" in m]
    assert len(fresh) == 3 and again == fresh


def test_a_prepared_preference_folder_gets_the_runs_system_prompt_and_its_eval_folder_its_stage(tiny_model_dir,
                                                                                               pref_files, tmp_path):
    """data.system_prompt reached SFT records only: a prepared DPO folder trained without it (while inference then
    added it); a prepared data.eval folder of another stage was a KeyError traceback."""
    from transformers import AutoTokenizer

    from tunelab.data.prepare import prepare_dataset
    from tunelab.errors import TunelabError
    from tunelab.train.inputs import load_data

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for name, src, stage in [("pairs", "pairs.jsonl", "dpo"), ("sft", "sft.jsonl", "sft")]:
        prepare_dataset([str(pref_files / src)], tmp_path / name, tokenizer=tok, val_ratio=0.2, stage=stage,
                        console=lambda *_: None)
    system = "data.system_prompt=You answer in one word."

    def prompts(train, *extra):
        cfg = _cfg(tiny_model_dir, train, tmp_path, "x", "dpo", system, *extra)
        return [e["prompt_ids"] for e in load_data(cfg, tok, tmp_path / "run", True, False, say=lambda *_: None).train]

    (tmp_path / "run").mkdir()
    from_folder, from_raw = prompts(tmp_path / "pairs"), prompts(pref_files / "pairs.jsonl")
    assert from_folder == from_raw and "one word" in tok.decode(from_folder[0])
    with pytest.raises(TunelabError, match="was prepared for training.stage=sft, this run trains dpo"):
        prompts(tmp_path / "pairs", f"data.eval={tmp_path / 'sft'}")


def test_a_resumed_dpo_run_refuses_a_changed_starting_adapter(tiny_model_dir, pref_files, tmp_path,
                                                              signal_after_step):
    """The reference is the adapter the run started from: resumed after that adapter changed, the run trained on
    against another reference without a word (and overwrote the recorded fingerprint)."""
    from safetensors.torch import save_file

    from tunelab.errors import TunelabError

    sft = train(load_config(None, [f"model.name={tiny_model_dir}", "model.dtype=fp32",
                                   f"data.train={pref_files / 'sft.jsonl'}", f"output.dir={tmp_path}",
                                   "output.run_name=sft", "training.max_steps=1", "eval.metrics=[perplexity]",
                                   "tracking.report_to=[none]"]))
    signal_after_step(1)
    with pytest.raises(TrainingInterrupted):
        train(_cfg(tiny_model_dir, pref_files / "pairs.jsonl", tmp_path, "dpo", "dpo", f"model.adapter={sft}",
                   "training.max_steps=2"))
    signal_after_step(None)
    weights = sft / "checkpoint-final" / "adapter_model.safetensors"
    kept = weights.read_bytes()
    save_file({k: v * 2 for k, v in load_file(weights).items()}, str(weights))
    recorded = json.loads((tmp_path / "dpo" / "manifest.json").read_text())["reference"]["fingerprint"]
    with pytest.raises(TunelabError, match=r"--resume: the adapter this run started from .* has changed since"):
        train(load_config(None, [f"output.dir={tmp_path}"]), resume=str(tmp_path / "dpo"))
    assert json.loads((tmp_path / "dpo" / "manifest.json").read_text())["reference"]["fingerprint"] == recorded
    weights.write_bytes(kept)
    train(load_config(None, [f"output.dir={tmp_path}"]), resume=str(tmp_path / "dpo"))
    assert json.loads((tmp_path / "dpo" / "manifest.json").read_text())["status"] == "finished"


def test_kto_lone_example_is_paired_with_another_answer(tiny_model_dir, pref_files, tmp_path, monkeypatch):
    """kto's KL pairs rotate the answers of a micro-batch by one: an epoch's last micro-batch of one example was
    paired with its own answer, so its "KL" was its own reward. It takes another example's answer now; and with
    no other example kto is refused."""
    from tunelab.errors import TunelabError
    from tunelab.train import preference
    from tunelab.train.preference_loss import collate_kto

    lone = []

    def spy(examples, spare=None):
        batch = collate_kto(examples, spare)
        if len(examples) == 1:
            lone.append((examples[0], spare, batch))
        return batch

    monkeypatch.setattr(preference, "collate_kto", spy)
    train(_cfg(tiny_model_dir, pref_files / "kto.jsonl", tmp_path, "lone", "kto", "training.batch_size=3",
               "training.epochs=1"))  # 10 train examples: micro-batches of 3, 3, 3, 1
    assert lone
    for example, spare, batch in lone:
        assert spare is not None and spare is not example and spare["where"] != example["where"]
        kl_row = batch["kl"]["input_ids"][0].tolist()
        assert kl_row == example["prompt_ids"] + spare["completion_ids"]
    with pytest.raises(TunelabError, match="at least 2 examples"):
        collate_kto([example])


def test_dpo_early_stopping_and_best_checkpoint_as_sft(tiny_model_dir, pref_files, tmp_path, monkeypatch):
    """training.early_stopping_patience was silently ignored by the preference stages, and no checkpoint-best was
    kept: a DPO run whose eval loss stops improving trained on to the end. Eval losses that only rise after the
    first evaluation stop it after `patience` evaluations, and the first evaluation's weights are checkpoint-best."""
    from tunelab.train import preference

    real = preference.preference_eval

    def rising(s, examples):
        res = real(s, examples)
        return {**res, "eval_loss": res["eval_loss"] + s.state.global_step}

    monkeypatch.setattr(preference, "preference_eval", rising)
    run = train(_cfg(tiny_model_dir, pref_files / "pairs.jsonl", tmp_path, "early", "dpo", "training.eval_steps=1",
                     "training.early_stopping_patience=2", "training.epochs=3"))
    man = json.loads((run / "manifest.json").read_text())
    assert man["status"] == "finished" and man["total_steps"] > 3
    steps = [m["step"] for m in read_metrics(run) if "grad_norm" in m]
    assert steps == [1, 2, 3]
    assert "Early stopping: no eval improvement in 2 evaluations" in (run / "train.log").read_text()
    assert (run / "checkpoint-best" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "checkpoint-best" / "tunelab.json").read_text())["stage"] == "dpo"


def test_a_nan_eval_is_not_kept_as_the_best(tiny_model_dir, pref_files, tmp_path, monkeypatch):
    """A first evaluation whose loss was NaN became the best: no later eval compares below NaN, so checkpoint-best
    stayed the NaN step's weights and early stopping ended a run that was improving."""
    from tunelab.train import preference

    real = preference.preference_eval

    def nan_first(s, examples):
        res = real(s, examples)
        return {**res, "eval_loss": float("nan") if s.state.global_step == 1 else res["eval_loss"] - s.state.global_step}

    monkeypatch.setattr(preference, "preference_eval", nan_first)
    run = train(_cfg(tiny_model_dir, pref_files / "pairs.jsonl", tmp_path, "nan", "dpo", "training.eval_steps=1",
                     "training.early_stopping_patience=2", "training.epochs=3", "training.max_steps=3"))
    evals = [line for line in (run / "train.log").read_text().splitlines() if "Eval @ step" in line]
    assert [line.endswith("(best)") for line in evals] == [False, True], evals  # step 2's weights are the best


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_reference_of_a_new_adapter_is_the_starting_policy(tiny_model_dir, pref_files, tmp_path, method, stage):
    """The reference of a new LoRA / DoRA / QLoRA adapter is the base with the adapter disabled: before the first
    update the policy is that same model, so every reward of step 1 is 0 (a reference that differed would show)."""
    extra = ["quantization.compute_dtype=bf16"] if method == "qlora" else []
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    data = pref_files / ("kto.jsonl" if stage == "kto" else "pairs.jsonl")
    run = train(_cfg(tiny_model_dir, data, tmp_path, f"{stage}-{method}", stage, f"training.method={method}",
                     "training.max_steps=2", "training.warmup_ratio=0", *extra))
    first, second = [m for m in read_metrics(run) if "grad_norm" in m]
    rewards = [[m[k] for k in ("rewards/chosen", "rewards/rejected") if k in m] for m in (first, second)]
    assert rewards[0] and all(abs(r) < 1e-6 for r in rewards[0]), first
    assert sum(map(abs, rewards[1])) > 1e-6  # the adapter moved, the reference did not


def test_precomputed_reference_gives_the_losses_of_a_reference_run_every_step(tiny_model_dir, pref_files, tmp_path):
    runs = [train(_cfg(tiny_model_dir, pref_files / "pairs.jsonl", tmp_path, f"pre-{p}", "dpo", "training.max_steps=4",
                       f"preference.precompute_ref_logps={p}")) for p in (False, True)]
    every, once = [read_metrics(r) for r in runs]
    assert len(every) == len(once) and sum("eval_loss" in m for m in once) and sum("loss" in m for m in once) == 4
    for a, b in zip(every, once):
        for key in ("loss", "eval_loss", "rewards/margin", "eval_rewards/margin"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_a_pair_kept_past_the_models_positions_is_refused_before_training(short_context_model_dir, tmp_path):
    """SFT refuses a record that data.overflow=keep leaves longer than the model's max_position_embeddings; the
    preference stages trained such a pair on positions the model never had."""
    from tunelab.errors import TunelabError

    pairs = [{"prompt": f"Say {i}", "chosen": f"ok {i}", "rejected": "no"} for i in range(8)]
    pairs.insert(2, {"prompt": "Say it", "chosen": "long " * 80, "rejected": "no"})
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    cfg = _cfg(short_context_model_dir, tmp_path / "pairs.jsonl", tmp_path / "out", "long", "dpo",
               "data.max_length=48", "data.overflow=keep", "data.val_ratio=0", "training.max_steps=1")
    with pytest.raises(TunelabError, match=r"1 record\(s\) kept whole by data.overflow=keep are longer than .*"
                                           r"\(64\); the longest has \d+ tokens \(.*pairs.jsonl:line 3"):
        train(cfg)
    assert not list((tmp_path / "out").glob("*/checkpoint-*"))
