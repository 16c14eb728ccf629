"""The check that would lift tunelab's refusal of FSDP / DeepSpeed ZeRO on GPUs (needs CUDA; skipped elsewhere).

    bash bench/device_sharding_check.sh          # on a machine with CUDA GPUs (2 or more for the full check)

Each sharded run is started exactly as a user starts it (`accelerate launch --config_file examples/accelerate/...`)
with TUNELAB_UNVERIFIED_SHARDING=1, and must: finish without a hang (a collective one process never joined), save
checkpoint-best (an eval during training) and checkpoint-final from gathered weights, report generation metrics
(every process generates), and end with the adapter of a DDP run on the same GPUs within 1e-5 (fp32, dropout 0).
On one GPU the sharded run has one shard: every code path runs, the cross-process collectives do not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "accelerate"
TIMEOUT_S = 420
STEPS = 3

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs")


def _overrides(model_dir: Path, data: Path, out: Path, name: str) -> list[str]:
    return [f"model.name={model_dir}", f"data.train={data / 'train.json'}", f"data.eval={data / 'eval.json'}",
            "data.val_ratio=0", f"output.dir={out}", f"output.run_name={name}", "model.dtype=fp32",
            "data.max_length=96", "training.epochs=1", "training.batch_size=1", "training.logging_steps=1",
            "training.eval_steps=1", "training.learning_rate=1e-2", "training.warmup_ratio=0", "lora.r=4",
            "lora.dropout=0", "eval.metrics=[perplexity,bleu]", "eval.max_samples=2", "eval.max_new_tokens=8",
            "tracking.report_to=[]"]


def _launch(cmd: list[str], env: dict[str, str]) -> str:
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"no end after {TIMEOUT_S} s (a hang?): {' '.join(cmd)}\n{output[-4000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{output[-4000:]}"
    return output


@pytest.fixture(scope="module")
def workload(tmp_path_factory, tiny_model_dir):
    from tunelab.demo_data import alpaca_records

    data = tmp_path_factory.mktemp("raw")
    records = alpaca_records()
    (data / "train.json").write_text(json.dumps(records[17:22]))
    (data / "eval.json").write_text(json.dumps(records[:2]))
    gpus = torch.cuda.device_count()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TUNELAB_UNVERIFIED_SHARDING", None)
    return data, gpus, env


@pytest.fixture(scope="module")
def ddp_adapter(workload, tiny_model_dir, tmp_path_factory):
    data, gpus, env = workload
    out = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(EXAMPLES / "ddp.yaml"),
           "--num_processes", str(gpus), "-m", "tunelab", "train", *_overrides(tiny_model_dir, data, out, "ddp")]
    if gpus == 1:  # one GPU: the one-process run is the reference
        cmd = [sys.executable, "-m", "tunelab", "train", *_overrides(tiny_model_dir, data, out, "ddp")]
    _launch(cmd, env)
    return _adapter(out / "ddp" / "checkpoint-final")


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def _deepspeed_json(name: str, tmp: Path) -> Path:
    """The shipped json in fp32 (the comparison needs it) with the micro-batch of the workload."""
    ds = json.loads((EXAMPLES / name).read_text())
    ds.pop("bf16", None)
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    path = tmp / name
    path.write_text(json.dumps(ds))
    return path


@pytest.mark.parametrize("config", ["fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_sharded_run_saves_gathered_weights_and_matches_ddp(config, workload, ddp_adapter, tiny_model_dir,
                                                             tmp_path):
    data, gpus, env = workload
    extra: list[str] = []
    if config.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
        extra = ["--deepspeed_config_file", str(_deepspeed_json(config.replace(".yaml", ".json"), tmp_path))]
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(EXAMPLES / config),
           "--num_processes", str(gpus), *extra, "-m", "tunelab", "train",
           *_overrides(tiny_model_dir, data, out, "sharded")]
    output = _launch(cmd, {**env, "TUNELAB_UNVERIFIED_SHARDING": "1"})

    run = out / "sharded"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["processes"] == gpus, output[-3000:]
    assert "bleu" in manifest["metrics"], "generation metrics missing: did every process generate?"
    best, final = _adapter(run / "checkpoint-best"), _adapter(run / "checkpoint-final")
    assert final.keys() == ddp_adapter.keys() and best.keys() == final.keys()
    assert any(v.abs().sum() > 0 for k, v in final.items() if "lora_B" in k)  # trained, not a blank shard
    for k, v in final.items():
        assert torch.allclose(v, ddp_adapter[k], atol=1e-5), f"{config}: {k} differs from the DDP run by " \
                                                             f"{(v - ddp_adapter[k]).abs().max():.2e}"
    log = (run / "train.log").read_text(encoding="utf-8")
    assert all(log.count(f"  Step {k}/") == 1 for k in range(1, STEPS + 1))  # written once, by the main process
