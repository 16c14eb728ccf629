"""Every shipped example loads: tunelab configs validate against the schema, accelerate configs pass accelerate's
own loader and launch-command validation, DeepSpeed json files parse into accelerate's DeepSpeed plugin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tunelab.config import load_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
ACCELERATE = EXAMPLES / "accelerate"
TUNELAB_CONFIGS = sorted([REPO / "config.yaml"] + [p for p in EXAMPLES.rglob("*.yaml") if ACCELERATE not in p.parents])
ACCELERATE_CONFIGS = sorted(ACCELERATE.glob("*.yaml"))
DEEPSPEED_JSON = sorted(ACCELERATE.glob("*.json"))


def _id(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.mark.parametrize("path", TUNELAB_CONFIGS, ids=_id)
def test_tunelab_config_validates(path):
    cfg = load_config(path)
    written = yaml.safe_load(path.read_text(encoding="utf-8"))
    # every value written in the file is the value the run gets (YAML reads `1e-3` as a string; pydantic parses it)
    for section, values in written.items():
        for key, value in values.items():
            actual = getattr(getattr(cfg, section), key)
            assert actual == (float(value) if isinstance(actual, float) else value), f"{section}.{key}"


def test_examples_say_what_they_promise():
    qwen = load_config(EXAMPLES / "qwen2.5-1.5b-lora.yaml")
    assert qwen.model.name == "Qwen/Qwen2.5-1.5B-Instruct" and qwen.training.method == "lora"
    assert (qwen.lora.r, qwen.lora.alpha, qwen.lora.dropout) == (16, 32, 0.05)
    assert (qwen.training.epochs, qwen.training.batch_size, qwen.training.learning_rate) == (3, 4, 2e-4)

    qlora = load_config(EXAMPLES / "qlora.yaml")
    assert qlora.training.method == "qlora" and qlora.quantization.quant_type == "nf4"
    assert qlora.quantization.double_quant is True

    dora = load_config(EXAMPLES / "dora.yaml")
    assert dora.training.method == "dora" and dora.lora.use_rslora is True

    assert load_config(EXAMPLES / "full.yaml").training.method == "full"


def _launch_args(path: Path):
    """What `accelerate launch --config_file PATH -m tunelab train` resolves, without launching anything."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(path), "-m", "tunelab", "train"])
    _validate_launch_command(args)
    return parser, args


EXPECTED = {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "deepspeed_zero2.yaml": "DEEPSPEED",
            "deepspeed_zero3.yaml": "DEEPSPEED"}


def test_the_accelerate_examples_are_all_there():
    assert {p.name for p in ACCELERATE_CONFIGS} == set(EXPECTED)
    assert {p.name for p in DEEPSPEED_JSON} == {"deepspeed_zero2.json", "deepspeed_zero3.json"}


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=_id)
def test_accelerate_config_loads_and_validates(path, monkeypatch):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    monkeypatch.chdir(REPO)  # deepspeed_config_file paths are relative to the repository root
    cfg = load_config_from_file(str(path))
    assert isinstance(cfg, ClusterConfig) and cfg.distributed_type.value == EXPECTED[path.name]
    assert cfg.num_processes >= 2 and cfg.num_machines == 1

    parser, args = _launch_args(path)
    known = {a.dest for a in parser._actions}
    # accelerate copies nested keys onto the launch arguments without checking them: a misspelt key is ignored
    for key in cfg.fsdp_config:
        assert (key if key.startswith("fsdp") else f"fsdp_{key}") in known, f"unknown fsdp_config key {key}"
    for key in cfg.deepspeed_config:
        assert key in known, f"unknown deepspeed_config key {key}"
    assert args.multi_gpu == (EXPECTED[path.name] == "MULTI_GPU")
    assert args.use_fsdp == (EXPECTED[path.name] == "FSDP")
    assert args.use_deepspeed == (EXPECTED[path.name] == "DEEPSPEED")


def test_fsdp_example_builds_accelerates_plugin(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    _, args = _launch_args(ACCELERATE / "fsdp.yaml")
    for key, value in prepare_multi_gpu_env(args).items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # what each launched process builds from that environment
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "FULL_STATE_DICT" and plugin.cpu_ram_efficient_loading is True
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"


@pytest.mark.parametrize("path", DEEPSPEED_JSON, ids=_id)
def test_deepspeed_json_parses_into_accelerates_plugin(path):
    from accelerate.utils import DeepSpeedPlugin

    raw = json.loads(path.read_text())
    stage = int(path.stem[-1])
    plugin = DeepSpeedPlugin(hf_ds_config=str(path))
    assert plugin.zero_stage == stage == raw["zero_optimization"]["stage"]
    ds = plugin.deepspeed_config
    # tunelab hands accelerate no DataLoader, so DeepSpeed cannot fill "auto" batch sizes from one
    assert isinstance(ds["train_micro_batch_size_per_gpu"], int)
    assert isinstance(ds["gradient_accumulation_steps"], int) and isinstance(ds["gradient_clipping"], float)
    if stage == 3:
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    yaml_cfg = yaml.safe_load((ACCELERATE / f"{path.stem}.yaml").read_text())
    assert yaml_cfg["deepspeed_config"]["deepspeed_config_file"] == _id(path)
