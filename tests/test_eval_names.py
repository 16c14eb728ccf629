"""`tunelab eval` results say what was evaluated: a checkpoint's or another model's result never takes the run's
name, never replaces another's silently, and reads as what it is in `runs compare / report / show`; a merged model
is scored with its run's settings, as its adapter is."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tunelab.evaluate import EvalError, run_eval

QUIET = {"console": lambda *_: None}


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory) -> Path:
    """A 2-step LoRA run with checkpoint-1, max_length 40 (not eval's 512 fallback, so a wrong fallback shows)."""
    from tunelab.config import load_config
    from tunelab.demo_data import write_demo_data
    from tunelab.train.recipe import train

    root = tmp_path_factory.mktemp("names")
    write_demo_data(root / "raw")
    return train(load_config(None, [
        f"model.name={tiny_model_dir}", "model.dtype=fp32", f"data.train={root / 'raw' / 'demo_alpaca.json'}",
        "data.max_length=40", f"output.dir={root / 'out'}", "output.run_name=r", "training.max_steps=2",
        "training.save_steps=1", "training.save_total_limit=2", "training.learning_rate=5e-2",
        "data.system_prompt=You are a terse assistant.", "eval.metrics=[perplexity]", "tracking.report_to=[none]"]))


def test_a_checkpoint_result_keeps_its_own_name_and_the_runs_result(run, tmp_path, monkeypatch):
    """`eval --adapter RUN` then `eval --adapter RUN/checkpoint-1` both wrote eval/val.json: the final adapter's
    number was gone and `runs compare` showed the checkpoint's as the run's `val:perplexity`."""
    from tunelab import runs

    monkeypatch.chdir(tmp_path)
    final = run_eval(adapter=str(run), metrics="perplexity", **QUIET)
    ckpt = run_eval(adapter=str(run / "checkpoint-1"), metrics="perplexity", **QUIET)
    assert final.json_path == run / "eval" / "val.json"
    assert ckpt.json_path == run / "eval" / "checkpoint-1-val.json"
    assert json.loads(final.json_path.read_text())["metrics"] == final.result.metrics
    assert final.result.metrics["perplexity"] != ckpt.result.metrics["perplexity"]

    cmp = runs.compare_runs([run, run])
    assert cmp.metrics["val:perplexity"][0] == pytest.approx(final.result.metrics["perplexity"])
    assert cmp.metrics["checkpoint-1-val:perplexity"][0] == pytest.approx(ckpt.result.metrics["perplexity"])


def test_a_result_of_another_model_is_refused_not_replaced(run, tiny_model_dir, tmp_path, monkeypatch):
    """A result written before names said what was scored (or an explicit --name) is not overwritten by another
    checkpoint's result; re-evaluating the same one replaces it; and the old result is labelled where it is shown."""
    from tunelab import runs
    from tunelab.evaluate.report import write_run_report

    monkeypatch.chdir(tmp_path)
    first = run_eval(adapter=str(run / "checkpoint-1"), metrics="perplexity", name="mine", **QUIET)
    with pytest.raises(EvalError, match=r"mine\.json already holds an evaluation of .*checkpoint-1.*--name"):
        run_eval(adapter=str(run), metrics="perplexity", name="mine", **QUIET)
    assert json.loads(first.json_path.read_text())["metrics"] == first.result.metrics
    run_eval(adapter=str(run / "checkpoint-1"), metrics="perplexity", name="mine", **QUIET)  # a re-run: replaced
    shutil.copytree(run, tmp_path / "copy")  # a copied run's results are still its checkpoints' own
    run_eval(adapter=str(tmp_path / "copy" / "checkpoint-1"), metrics="perplexity", name="mine", **QUIET)

    # the run's adapter put on another model is not the run's own result either
    shutil.copytree(tiny_model_dir, tmp_path / "other")
    on_other = run_eval(model=str(tmp_path / "other"), adapter=str(run), metrics="perplexity", **QUIET)
    assert on_other.name == "on-other-val" and on_other.record["model"]["subject"] == "on other"
    assert run_eval(model=str(tiny_model_dir), adapter=str(run), metrics="perplexity", **QUIET).name == "val"
    assert "mine (checkpoint-1)" in runs.eval_label("mine", json.loads(first.json_path.read_text()))
    assert "### eval/mine (checkpoint-1)" in write_run_report(run, tmp_path / "rep.md").read_text()


def test_evals_outside_a_run_of_different_models_do_not_overwrite(run, tiny_model_dir, tmp_path, monkeypatch):
    """`eval --model A --data RUN` then `--model B --data RUN` both wrote outputs/eval/r-val.json."""
    from tunelab.merge import merge_adapter

    monkeypatch.chdir(tmp_path)
    merge_adapter(run, tmp_path / "m1")
    a = run_eval(model=str(tmp_path / "m1"), data=str(run), metrics="perplexity", **QUIET)
    b = run_eval(model=str(tiny_model_dir), data=str(run), metrics="perplexity", **QUIET)
    assert a.json_path == Path("outputs/eval/m1-r-val.json")
    assert b.json_path == Path(f"outputs/eval/{tiny_model_dir.name}-r-val.json")
    assert a.json_path.is_file() and b.json_path.is_file()


def test_a_merged_model_is_scored_with_its_runs_settings(run, tiny_model_dir, tmp_path, monkeypatch):
    """The merged model fell back to max_length 512 and no system prompt, so its perplexity differed from its
    adapter's; now both use the run's config (said in an info line), and an explicit flag still wins."""
    from tunelab.merge import merge_adapter

    monkeypatch.chdir(tmp_path)
    merge_adapter(run, tmp_path / "merged")
    said: list[str] = []
    # fp32 pinned: the two numbers are compared, and bf16 (auto on a bf16 CPU) rounds the two paths apart (3e-4)
    adapter = run_eval(adapter=str(run), metrics="perplexity", output_dir=tmp_path / "a", dtype="fp32", **QUIET)
    merged = run_eval(model=str(tmp_path / "merged"), data=str(run), metrics="perplexity", dtype="fp32",
                      console=said.append)
    assert merged.record["settings"]["max_length"] == 40
    assert math.isclose(merged.result.metrics["perplexity"], adapter.result.metrics["perplexity"], rel_tol=1e-4)
    assert any(line.startswith("info: max_length 40") and str(run) in line for line in said)
    flagged = run_eval(model=str(tmp_path / "merged"), data=str(run), metrics="perplexity", max_length=200,
                       name="short", **QUIET)
    assert flagged.record["settings"]["max_length"] == 200

    # a base model on a run's data: that run's masking and length too
    base = run_eval(model=str(tiny_model_dir), data=str(run), metrics="perplexity", name="base", **QUIET)
    assert base.record["settings"]["max_length"] == 40
