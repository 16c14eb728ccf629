"""The run page's command for an eval result the UI did not run is the command that wrote that file: a
checkpoint's result, another split's, or the adapter on another model, each rebuilt from what the result records."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the UI tests need the ui extra: pip install -e '.[test,ui]'")


@pytest.fixture
def evaluated(tiny_model_dir, tmp_path, monkeypatch) -> Path:
    """A 2-step LoRA run under outputs/r with checkpoint-1, and three results written from the command line."""
    from tunelab.cli import main
    from tunelab.config import load_config
    from tunelab.demo_data import write_demo_data
    from tunelab.train.recipe import train

    monkeypatch.chdir(tmp_path)
    write_demo_data(tmp_path / "raw")
    train(load_config(None, [
        f"model.name={tiny_model_dir}", "model.dtype=fp32", "data.train=raw/demo_alpaca.json", "data.max_length=40",
        "output.dir=outputs", "output.run_name=r", "training.max_steps=2", "training.save_steps=1",
        "training.save_total_limit=2", "eval.metrics=[perplexity]", "tracking.report_to=[none]"]))
    shutil.copytree(tiny_model_dir, tmp_path / "other")
    for argv in (["eval", "--adapter", "outputs/r/checkpoint-1", "--compare-base"],
                 ["eval", "--adapter", "outputs/r", "--split", "train"],
                 ["eval", "--model", "other", "--adapter", "outputs/r"],
                 ["eval", "--adapter", "outputs/r", "--name", "short", "--metrics", "perplexity,chrf", "--max-samples",
                  "2", "--max-new-tokens", "3", "--max-length", "36", "--dtype", "bf16"]):
        assert main(argv) == 0
    return tmp_path


def test_an_eval_result_shows_the_command_that_wrote_it(evaluated, capsys):
    """Every result showed `tunelab eval --adapter outputs/r --name <stem>`: for checkpoint-1-val that command
    scores the final adapter and is refused (the file holds checkpoint-1's result); for `train` it scores the val
    split under the name train."""
    from fastapi.testclient import TestClient

    from tunelab.cli import main
    from tunelab.ui.app import create_app

    eval_dir = evaluated / "outputs" / "r" / "eval"
    with TestClient(create_app("outputs", workdir=evaluated), headers={"X-Tunelab": "1"}) as c:
        shown = {a["path"]: a["command"] for a in c.get("/api/run", params={"name": "r"}).json()["artefacts"]
                 if a["path"].startswith("eval/")}
    assert shown == {
        "eval/checkpoint-1-val.json": "tunelab eval --adapter outputs/r/checkpoint-1 --compare-base",
        "eval/train.json": "tunelab eval --adapter outputs/r --split train",
        "eval/on-other-val.json": "tunelab eval --adapter outputs/r --model other",
        "eval/short.json": "tunelab eval --adapter outputs/r --name short --metrics perplexity,chrf --max-length 36 "
                           "--max-new-tokens 3 --max-samples 2 --dtype bf16"}
    before = {p.name: json.loads(p.read_text()) for p in eval_dir.glob("*.json")}
    for path, command in shown.items():  # each one, run again, writes the same file from the same model and data
        assert main(shlex.split(command)[1:]) == 0, capsys.readouterr()
        again = json.loads((evaluated / "outputs" / "r" / path).read_text())
        old = before[Path(path).name]
        assert again["created_at"] >= old["created_at"]
        assert {k: again[k] for k in ("model", "data", "metrics")} == {k: old[k] for k in ("model", "data", "metrics")}
        assert again["settings"] == old["settings"]  # the metrics, lengths, samples and dtype it was scored with
        assert (again["base_metrics"] is None) == (old["base_metrics"] is None)
    assert sorted(p.name for p in eval_dir.glob("*.json")) == sorted(before)


def test_eval_commands_of_other_layouts_and_older_results(tmp_path):
    """An adapter saved in the run folder itself (no checkpoint-final) was rebuilt as `--adapter RUN/RUN`; a result
    without a model section (older tunelab) keeps the run and its name; a model scored into the run's eval/ is
    rebuilt without --adapter."""
    from tunelab.ui.views import eval_args

    run = tmp_path / "outputs" / "r"
    run.mkdir(parents=True)
    own = {"path": str(run), "split": "val"}
    top = {"model": {"model": "base", "adapter": str(run), "base_model": "base", "run": str(run), "subject": "r"},
           "data": own}
    assert eval_args(run, "outputs/r", "r-val", top) == ["eval", "--adapter", "outputs/r"]
    assert eval_args(run, "outputs/r", "val", {}) == ["eval", "--adapter", "outputs/r"]
    assert eval_args(run, "outputs/r", "old", {"data": own}) == ["eval", "--adapter", "outputs/r", "--name", "old"]
    merged = {"model": {"model": "models/m", "adapter": None, "base_model": "base", "run": None, "subject": "m"},
              "data": {"path": "outputs/r", "split": "val"}, "base_metrics": {"perplexity": 3.0}}
    assert eval_args(run, "outputs/r", "m-r-val", merged) == [
        "eval", "--model", "models/m", "--data", "outputs/r", "--output-dir", "outputs/r/eval", "--compare-base"]
