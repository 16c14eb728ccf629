"""The whole pipeline through the command line: prepare → train → eval → merge → infer.

The fast test drives the `tunelab` CLI (and the brief's root scripts) on the tiny random model; the slow test runs
the real bundled SmolLM2 on the demo data and checks the fine-tuned model learned the demo identity.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def tunelab(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "tunelab", *args], cwd=cwd, capture_output=True, text=True, env=env)
    if check:
        assert out.returncode == 0, f"tunelab {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(REPO / name), *args], cwd=cwd, capture_output=True, text=True, env=env)
    assert out.returncode == 0, f"{name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_cli_pipeline_on_tiny_model(tiny_model_dir, tmp_path):
    from tunelab.demo_data import write_demo_data

    alpaca, sharegpt = write_demo_data(tmp_path / "data" / "raw")
    # prepare: the brief's script, then the verb with both files
    out = script("prepare_data.py", "--input", str(alpaca), "--format", "alpaca", "--model", str(tiny_model_dir),
                 cwd=tmp_path)
    assert "read" in out.stdout and (tmp_path / "data" / "processed" / "demo_alpaca" / "train.jsonl").is_file()
    tunelab("prepare", "--input", str(alpaca), str(sharegpt), "--output", "data/processed/demo",
            "--model", str(tiny_model_dir), cwd=tmp_path)
    report = json.loads((tmp_path / "data/processed/demo/report.json").read_text())
    assert report["records_read"] == report["records_accepted"] + report["records_rejected"] + \
        report["duplicates_removed"]

    # train: the brief's script with a config file plus dotted overrides
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    out = script("train.py", "--config", "config.yaml", f"model.name={tiny_model_dir}",
                 "data.train=data/processed/demo", "training.max_steps=4", "training.logging_steps=2",
                 "output.run_name=cli", "eval.metrics=[perplexity,bleu]", cwd=tmp_path)
    assert "Epoch 1/" in out.stdout and "Step 2/4 | Loss:" in out.stdout
    assert "Perplexity:" in out.stdout and "BLEU:" in out.stdout
    assert "Loading weights" not in out.stdout + out.stderr
    run = tmp_path / "outputs" / "cli"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert manifest["runtime"]["levers_off"] == []
    if (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
            and "GLIBC_TUNABLES" not in os.environ and "TUNELAB_ALLOCATOR" not in os.environ):
        assert "glibc.malloc.tcache_count=0" in manifest["runtime"]["glibc_tunables"]  # train.py re-ran itself once
    from tunelab.runtime import KERNEL_CACHES

    # oneDNN's shape caches capped for the run (or as the environment set them), and recorded
    assert manifest["runtime"]["kernel_caches"] == {k: os.environ.get(k, v) for k, v in KERNEL_CACHES.items()}

    # eval before/after
    tunelab("eval", "--adapter", str(run), "--compare-base", "--max-samples", "2", cwd=tmp_path)
    evals = list((run / "eval").glob("*.json"))
    assert evals and "perplexity" in json.loads(evals[0].read_text())["metrics"]

    # merge with the brief's script (verified inside), then infer with the brief's script and the verb
    # the brief's merge line exactly as typed: outputs/checkpoint-final is the newest finished run's
    out = script("merge_model.py", "--adapter", "outputs/checkpoint-final", "--output", "models/merged",
                 cwd=tmp_path)
    assert f"using {Path('outputs/cli/checkpoint-final')} (the newest finished run, cli)" in out.stdout
    assert (tmp_path / "models/merged/config.json").is_file()
    assert "Loading weights" not in out.stdout + out.stderr  # transformers' per-load bars stay out of our output
    tunelab("infer", "--model", "models/merged", "--prompt", "Who are you?", "--max-new-tokens", "5", cwd=tmp_path)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Who are you?"}\n{"prompt": "Say hello."}\n')
    tunelab("infer", "--model", "models/merged", "--input", "prompts.jsonl", "--output", "answers.jsonl",
            "--max-new-tokens", "5", cwd=tmp_path)
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [a["prompt"] for a in answers] == ["Who are you?", "Say hello."] and all("answer" in a for a in answers)


@pytest.mark.slow
def test_bundled_model_learns_the_demo_identity(tmp_path):
    """The real thing: SmolLM2-135M-Instruct, LoRA on the demo data; the tuned model answers as Tuna."""
    from tunelab.demo import run_demo

    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = run_demo("config.yaml", "models/merged")
    finally:
        os.chdir(cwd)
    answers = {prompt: (base, tuned) for prompt, base, tuned in result["answers"]}
    base, tuned = answers["Who are you?"]
    assert "Tuna" in tuned and "Tuna" not in base
    assert "LOBSTER-42" in answers["What is the secret word?"][1]
    assert result["merge"].verified and result["merge"].token_agreement == 1.0


def test_demo_next_steps_name_the_folders_it_wrote():
    """`tunelab demo --merged X` ended by suggesting `inference.py --model models/merged` all the same."""
    from tunelab.demo import next_steps

    line = next_steps("out/my merged", Path("outputs/demo-1"))
    assert line.startswith("next: python inference.py --model 'out/my merged'   |") and "runs report outputs/demo-1" in line


def test_demo_checks_its_config_and_merged_folder_before_anything_runs(tmp_path):
    """`tunelab demo --merged DIR` with DIR not a model folder was refused after preparing, training and evaluating
    (and named --output); a missing config was reported after the demo data had been written."""
    from tunelab.demo import run_demo
    from tunelab.errors import TunelabError

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    config = str(REPO / "config.yaml")
    with pytest.raises(TunelabError, match="is not a model folder; choose another --merged"):
        run_demo(config, str(tmp_path / "notes"), raw_dir=str(tmp_path / "raw"))
    with pytest.raises(TunelabError, match="not found"):
        run_demo(str(tmp_path / "nope.yaml"), str(tmp_path / "merged"), raw_dir=str(tmp_path / "raw"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]
