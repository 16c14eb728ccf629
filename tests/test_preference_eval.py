"""`tunelab eval` on preference pairs, and everything downstream of a DPO run (merge, infer, runs compare), on the
tiny model; the bundled-model example (examples/dpo.yaml) as a slow test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.config import load_config
from tunelab.train.recipe import train

QUESTIONS = ["What is 2+2?", "Name a colour.", "Capital of France?", "Say hello.", "一加一等于几？", "天空是什么颜色？",
             "Name a fruit.", "What is water?", "Largest planet?", "一周有几天？", "Name an animal.", "What is ice?"]
REPO = Path(__file__).resolve().parents[1]


def _common(tiny_model_dir, out) -> list[str]:
    return [f"model.name={tiny_model_dir}", "model.dtype=fp32", f"output.dir={out}", "tracking.report_to=[none]",
            "training.batch_size=4", "data.val_ratio=0.25", "eval.metrics=[perplexity]"]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """An SFT run and a DPO run started from it, on the tiny model (fp32)."""
    out = tmp_path_factory.mktemp("pref-eval")
    pairs = [{"prompt": q, "chosen": f"A short, polite answer to: {q}", "rejected": "No."} for q in QUESTIONS]
    (out / "pairs.jsonl").write_text("\n".join(json.dumps(p, ensure_ascii=False) for p in pairs) + "\n")
    (out / "sft.jsonl").write_text("\n".join(json.dumps({"instruction": q, "output": f"An answer to: {q}"},
                                                        ensure_ascii=False) for q in QUESTIONS) + "\n")
    common = _common(tiny_model_dir, out)
    sft = train(load_config(None, common + [f"data.train={out / 'sft.jsonl'}", "output.run_name=sft",
                                            "training.max_steps=2"]))
    dpo = train(load_config(None, common + [f"data.train={out / 'pairs.jsonl'}", "output.run_name=dpo",
                                            "training.stage=dpo", f"model.adapter={sft}", "training.max_steps=6",
                                            "training.learning_rate=5e-3"]))
    return out, sft, dpo


def test_eval_reports_preference_accuracy_and_the_rewards_training_logged(runs):
    from tunelab.evaluate.runner import run_eval

    _, _, dpo = runs
    ev = run_eval(adapter=str(dpo), compare_base=True)
    m, base = ev.result.metrics, ev.base_result.metrics
    final = json.loads((dpo / "manifest.json").read_text())["metrics"]
    assert m["pairs"] == 3 and 0 <= m["pref_accuracy"] <= 1 and "pref_margin" in m
    # against the run's own reference (the SFT adapter): the rewards training's final evaluation logged
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
        assert m[key] == pytest.approx(final[f"eval_{key}"], rel=1e-4, abs=1e-6), key
    assert "pref_accuracy" in base and "rewards/margin" not in base  # the base: its own preference only
    rows = [json.loads(x) for x in ev.predictions_path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 3 and {"prompt", "chosen", "rejected", "scores"} <= set(rows[0])
    assert {"mean_logp_chosen", "reward_chosen"} <= set(rows[0]["scores"])
    assert json.loads(ev.json_path.read_text())["metrics"]["pref_accuracy"] == m["pref_accuracy"]


def test_eval_of_the_sft_starting_point_on_the_dpo_pairs(runs):
    from tunelab.evaluate.runner import run_eval

    out, sft, dpo = runs
    ev = run_eval(adapter=str(sft), data=str(dpo), output_dir=out / "sft-eval")
    assert ev.result.metrics["pairs"] == 3 and "rewards/accuracy" in ev.result.metrics  # vs the base
    assert ev.record["data"]["source"].endswith("data")


def test_eval_refuses_a_reference_adapter_that_is_gone_or_changed(runs, tmp_path):
    """Not the base (adapter disabled) silently in its place: the rewards would be measured against another model."""
    import shutil

    from tunelab.evaluate.runner import EvalError, run_eval

    _, sft, dpo = runs
    run, ref = tmp_path / "dpo", tmp_path / "sft-final"
    shutil.copytree(dpo, run)
    shutil.copytree(sft / "checkpoint-final", ref)
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "reference": {**manifest["reference"],
                                                                              "adapter": str(ref)}}))
    assert str(ref) in run_eval(adapter=str(run)).result.settings["reference_model"]
    shutil.copy(dpo / "checkpoint-final" / "adapter_model.safetensors", ref)
    with pytest.raises(EvalError, match="has changed since training"):
        run_eval(adapter=str(run))
    shutil.rmtree(ref)
    with pytest.raises(EvalError, match="is missing.*put the adapter it trained from back at"):
        run_eval(adapter=str(run))


def test_eval_of_a_kto_run_scores_the_labelled_answers_as_training_did(tiny_model_dir, tmp_path):
    """Not SFT perplexity/BLEU with an undesirable answer as the reference: KTO's rewards, as training logged them."""
    from tunelab.evaluate.runner import run_eval

    rows = [{"prompt": q, "completion": f"A polite answer to: {q}" if i % 2 else "No.", "label": bool(i % 2)}
            for i, q in enumerate(QUESTIONS)]
    (tmp_path / "kto.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    kto = train(load_config(None, _common(tiny_model_dir, tmp_path) + [
        f"data.train={tmp_path / 'kto.jsonl'}", "training.stage=kto", "training.max_steps=2", "output.run_name=kto"]))
    ev = run_eval(adapter=str(kto), batch_size=4, compare_base=True)  # training's batches: the same KL estimate
    m, final = ev.result.metrics, json.loads((kto / "manifest.json").read_text())["metrics"]
    assert "perplexity" not in m and "bleu" not in m and m["examples"] == m["desirable"] + m["undesirable"] == 3
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "kl"):
        assert m[key] == pytest.approx(final[f"eval_{key}"], rel=1e-4, abs=1e-6), key
    assert 0 <= m["rewards/accuracy"] <= 1 and "rewards/chosen" not in ev.base_result.metrics
    row = json.loads(ev.predictions_path.read_text(encoding="utf-8").splitlines()[0])
    assert {"completion", "label", "scores"} <= set(row) and "reference" not in row and "reward" in row["scores"]
    raw = run_eval(adapter=str(kto), data=str(tmp_path / "kto.jsonl"), output_dir=tmp_path / "raw")
    assert raw.result.metrics["examples"] == len(QUESTIONS) and raw.result.metrics["desirable"] == 6


def test_dpo_run_merges_verified_infers_and_compares_like_sft(runs, tmp_path):
    from tunelab.infer import generate
    from tunelab.merge import merge_adapter
    from tunelab.model.loading import load_pretrained
    from tunelab.runs import compare_runs, show_run

    out, sft, dpo = runs
    report = merge_adapter(str(dpo), tmp_path / "merged")
    assert report.verified and report.max_logit_diff is not None
    prompts = [[{"role": "user", "content": "Say hello."}]]
    merged, tok = load_pretrained(str(tmp_path / "merged"), dtype="fp32")
    adapted, tok2 = load_pretrained(adapter=str(dpo), dtype="fp32")
    assert generate(merged, tok, prompts, max_new_tokens=8) == generate(adapted, tok2, prompts, max_new_tokens=8)
    assert json.loads((tmp_path / "merged" / "tunelab.json").read_text())["base_model"]
    cmp = compare_runs([str(sft), str(dpo)], runs_dir=out)
    assert {"eval_rewards/accuracy", "eval_rewards/margin"} <= set(cmp.metrics)
    shown = show_run(dpo)
    assert shown["manifest"]["stage"] == "dpo" and "eval_rewards/accuracy" in shown["metrics"]
    assert "checkpoint-final" in shown["checkpoints"]


def test_dpo_run_exports_to_gguf_and_serves_like_sft(runs, tmp_path):
    """The merged DPO model exports to a verified GGUF, and `tunelab serve` over the DPO adapter answers as
    `tunelab infer` does."""
    from fastapi.testclient import TestClient

    from tunelab.export.gguf import export_gguf
    from tunelab.infer import generate
    from tunelab.merge import merge_adapter
    from tunelab.model.loading import load_pretrained
    from tunelab.serve import create_app

    _, _, dpo = runs
    merge_adapter(str(dpo), tmp_path / "merged")
    gguf = export_gguf(tmp_path / "merged", tmp_path / "dpo.gguf", quant="f16")
    assert gguf.size_bytes > 0 and all("differs" not in c for c in gguf.checks)
    model, tok = load_pretrained(adapter=str(dpo), dtype="fp32")
    messages = [{"role": "user", "content": "Say hello."}]
    want = generate(model, tok, [messages], max_new_tokens=8)[0]
    with TestClient(create_app(model, tok, "dpo")) as client:
        r = client.post("/v1/chat/completions", json={"model": "dpo", "messages": messages, "max_tokens": 8,
                                                       "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].strip() == want  # infer strips


@pytest.mark.slow
def test_bundled_dpo_example_moves_the_held_out_preference(tmp_path, monkeypatch):
    """examples/dpo.yaml as its header says to run it: the demo's SFT run, then DPO from it on the demo pairs. The
    held-out pairs' reward accuracy reaches 90% and the model's own preference rises above its SFT starting point."""
    from tunelab.demo_data import write_demo_data, write_preference_data
    from tunelab.evaluate.runner import run_eval

    monkeypatch.chdir(tmp_path)
    write_demo_data("data/raw")
    write_preference_data("data/raw")
    sft = train(load_config(str(REPO / "config.yaml"), ["output.run_name=demo-sft", "tracking.report_to=[none]"]))
    dpo = train(load_config(str(REPO / "examples" / "dpo.yaml"), ["tracking.report_to=[none]"]))
    assert sft.resolve() == tmp_path / "outputs" / "demo-sft" and dpo.resolve() == tmp_path / "outputs" / "demo-dpo"
    after = run_eval(adapter=str(dpo)).result.metrics
    before = run_eval(adapter=str(sft), data=str(dpo), output_dir=tmp_path / "sft-eval").result.metrics
    assert after["pairs"] == before["pairs"] == 8
    assert after["rewards/accuracy"] >= 0.9 and after["pref_accuracy"] > before["pref_accuracy"]


@pytest.mark.parametrize("stage", ["orpo", "simpo"])
def test_eval_of_a_run_without_reference_reports_its_training_rewards_not_dpo_rewards_against_the_base(
        runs, tiny_model_dir, stage):
    """orpo / simpo train without a reference: their logged rewards are beta x mean log-prob. `tunelab eval` reported
    DPO rewards against the base (adapter disabled) under the same names, numbers that training never logged."""
    from tunelab.evaluate.runner import run_eval

    out, _, _ = runs
    run = train(load_config(None, _common(tiny_model_dir, out) + [
        f"data.train={out / 'pairs.jsonl'}", f"output.run_name={stage}", f"training.stage={stage}",
        "training.max_steps=3", "training.learning_rate=5e-3", "preference.beta=0.5"]))
    ev = run_eval(adapter=str(run))
    m, final = ev.result.metrics, json.loads((run / "manifest.json").read_text())
    assert not [k for k in m if k.startswith("rewards/")], m
    assert ev.result.settings["reference_model"].startswith(f"none ({stage} needs no reference model")
    assert m["pref_accuracy"] == pytest.approx(final["metrics"]["eval_rewards/accuracy"])
    assert 0.5 * m["pref_margin"] == pytest.approx(final["metrics"]["eval_rewards/margin"], rel=1e-4, abs=1e-6)
