"""FSDP and DeepSpeed ZeRO refuse to start, before any model load and without a run folder.

On CPU accelerate cannot run them (it would silently train plain DDP); on GPUs tunelab has not verified them
(bench/device_sharding_check.sh is the check that would lift the refusal). What `accelerate launch` passes its
processes is reproduced here from each shipped config, so the test needs neither GPUs nor deepspeed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import tunelab.model.loading as loading
from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.train import distributed
from tunelab.train.recipe import train

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
LAUNCH_ENV = ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
              "ACCELERATE_DEEPSPEED_CONFIG_FILE", distributed.UNVERIFIED_SHARDING_ENV)


def launcher_env(config_file: Path) -> dict[str, str]:
    """The variables accelerate launch sets from a config file that decide FSDP / DeepSpeed."""
    cfg = yaml.safe_load(config_file.read_text())
    if cfg["distributed_type"] == "FSDP":
        return {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": str(cfg["fsdp_config"].get("fsdp_version", 1))}
    if cfg["distributed_type"] == "DEEPSPEED":
        ds_file = Path(__file__).resolve().parents[1] / cfg["deepspeed_config"]["deepspeed_config_file"]
        return {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds_file)}
    return {}


SHARDED = {"fsdp.yaml": "FSDP2", "deepspeed_zero2.yaml": "DeepSpeed ZeRO-2", "deepspeed_zero3.yaml": "DeepSpeed ZeRO-3"}


@pytest.fixture
def clean_env(monkeypatch):
    for key in LAUNCH_ENV:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_every_shipped_sharding_config_is_named(clean_env):
    for name in sorted(p.name for p in EXAMPLES.glob("*.yaml")):
        for key, value in launcher_env(EXAMPLES / name).items():
            clean_env.setenv(key, value)
        assert distributed.requested_sharding() == SHARDED.get(name), name
        for key in LAUNCH_ENV:
            clean_env.delenv(key, raising=False)


@pytest.mark.parametrize("config_file", sorted(SHARDED))
def test_sharding_on_cpu_refuses_before_loading_and_leaves_no_folder(config_file, clean_env, tiny_model_dir, tmp_path):
    for key, value in launcher_env(EXAMPLES / config_file).items():
        clean_env.setenv(key, value)

    def no_loading(*_a, **_k):
        raise AssertionError("the refusal must come before any tokenizer or model load")

    clean_env.setattr(loading, "load_model", no_loading)
    clean_env.setattr(loading, "load_tokenizer", no_loading)
    out = tmp_path / "runs"
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"output.dir={out}", "output.run_name=sharded"])
    with pytest.raises(TunelabError) as err:
        train(cfg)
    kind = SHARDED[config_file]
    assert str(err.value).startswith(f"{kind} was requested")
    assert "runs FSDP and DeepSpeed only on GPUs" in str(err.value) and "--num-processes N" in str(err.value)
    assert not out.exists()


@pytest.mark.parametrize("config_file", sorted(SHARDED))
def test_sharding_on_gpus_is_refused_as_unverified_until_the_device_check_lifts_it(config_file, clean_env):
    for key, value in launcher_env(EXAMPLES / config_file).items():
        clean_env.setenv(key, value)
    with pytest.raises(TunelabError) as err:
        distributed.refuse_unverified_sharding(cuda=True)
    message = str(err.value)
    assert message.startswith(f"{SHARDED[config_file]} is not verified with tunelab yet")
    assert distributed.SHARDING_CHECK in message and f"{distributed.UNVERIFIED_SHARDING_ENV}=1" in message
    assert (Path(__file__).resolve().parents[1] / distributed.SHARDING_CHECK).is_file()
    clean_env.setenv(distributed.UNVERIFIED_SHARDING_ENV, "1")
    distributed.refuse_unverified_sharding(cuda=True)  # the device check runs the path it verifies
    with pytest.raises(TunelabError, match="only on GPUs"):
        distributed.refuse_unverified_sharding(cuda=False)  # on CPU nothing can lift it


def test_ddp_and_one_process_are_not_refused(clean_env):
    distributed.refuse_unverified_sharding(cuda=False)
    distributed.refuse_unverified_sharding(cuda=True)


def test_zero_stage_read_from_the_json_when_the_launcher_passes_only_the_file(clean_env, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    clean_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    clean_env.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds))
    assert distributed.requested_sharding() == "DeepSpeed ZeRO-3"
    clean_env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")  # an explicit --zero_stage wins
    assert distributed.requested_sharding() == "DeepSpeed ZeRO-2"


def test_load_model_leaves_placement_to_accelerate_under_a_launcher(clean_env, tiny_model_dir):
    import torch

    clean_env.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as far as load_model can tell
    clean_env.setenv("LOCAL_RANK", "1")
    model, _ = loading.load_model(str(tiny_model_dir), dtype="fp32")
    assert {p.device.type for p in model.parameters()} == {"cpu"}  # accelerate.prepare will place it
    clean_env.delenv("LOCAL_RANK")
    moved = []
    clean_env.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(a) or self)
    loading.load_model(str(tiny_model_dir), dtype="fp32")
    assert moved == [("cuda",)]  # one process without a launcher: unchanged, load_model places it
