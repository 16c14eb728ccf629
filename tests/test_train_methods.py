"""Each training method through `tunelab.train.recipe.train` on the tiny random Llama, 2-3 steps each.

What is checked is what a user relies on afterwards: the trainable / total line, the adapter config flags, that
checkpoint-final loads with plain peft onto a freshly loaded base and holds the trained weights (and only them),
that QLoRA really trains on a 4-bit NF4 double-quantised base, and that a full fine-tune saves a whole model.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunelab.config import load_config
from tunelab.demo_data import write_demo_data
from tunelab.train.recipe import train

LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def demo_alpaca(tmp_path_factory) -> str:
    alpaca, _ = write_demo_data(tmp_path_factory.mktemp("raw"))
    return str(alpaca)


def _train(tiny_model_dir, data, out: Path, name: str, *overrides: str) -> Path:
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={data}", f"output.dir={out}",
                             f"output.run_name={name}", "model.dtype=fp32", "data.max_length=96",
                             "training.max_steps=3", "training.batch_size=2", "training.logging_steps=1",
                             "training.learning_rate=1e-2", "training.warmup_ratio=0", "eval.metrics=[perplexity]",
                             "tracking.report_to=[none]", *overrides])
    return train(cfg)


def _printed_counts(run: Path) -> tuple[str, int, int]:
    """(method, trainable, total) from the line the run printed (train.log holds everything printed)."""
    m = re.search(r"Method: (\w+) \| trainable params: ([\d,]+) / ([\d,]+) \(([\d.]+)%\)",
                  (run / "train.log").read_text())
    assert m, "the run must print its trainable / total parameters"
    trainable, total = int(m.group(2).replace(",", "")), int(m.group(3).replace(",", ""))
    assert float(m.group(4)) == pytest.approx(100 * trainable / total, abs=0.01)
    return m.group(1), trainable, total


def _fresh_base(tiny_model_dir, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, **kwargs)


def _lora_params(shapes: dict[str, tuple[int, int]], names: set[str], r: int, layers: int = 2) -> int:
    """r x (in + out) per adapted projection."""
    return layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in names)


def _linear_shapes(model) -> dict[str, tuple[int, int]]:
    layer = model.model.layers[0]
    mods = {**dict(layer.self_attn.named_children()), **dict(layer.mlp.named_children())}
    return {n: (m.in_features, m.out_features) for n, m in mods.items() if n in LINEAR}


def _adapted(peft_model) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {name for name, mod in peft_model.named_modules() if isinstance(mod, LoraLayer)}


def test_lora_target_list_rslora_and_modules_to_save(tiny_model_dir, demo_alpaca, tmp_path):
    from peft import PeftModel

    run = _train(tiny_model_dir, demo_alpaca, tmp_path, "lora", "lora.r=8", "lora.alpha=16", "lora.dropout=0",
                 "lora.target_modules=[q_proj,v_proj]", "lora.modules_to_save=[lm_head]", "lora.use_rslora=true")
    final = run / "checkpoint-final"
    acfg = json.loads((final / "adapter_config.json").read_text())
    assert acfg["peft_type"] == "LORA" and acfg["r"] == 8 and acfg["lora_alpha"] == 16
    assert acfg["use_rslora"] is True and acfg["use_dora"] is False
    assert set(acfg["target_modules"]) == {"q_proj", "v_proj"}
    # the tiny model ties lm_head to embed_tokens: peft must keep them tied (it may record either name)
    assert acfg["ensure_weight_tying"] is True
    assert set(acfg["modules_to_save"]) & {"lm_head", "embed_tokens", "model.embed_tokens"}

    base = _fresh_base(tiny_model_dir)
    shapes = _linear_shapes(base)
    base_head = base.lm_head.weight.detach().clone()
    base_q = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    vocab, hidden = base_head.shape
    method, trainable, total = _printed_counts(run)
    lora_n = _lora_params(shapes, {"q_proj", "v_proj"}, r=8)
    assert method == "lora"
    log = (run / "train.log").read_text(encoding="utf-8")
    assert re.search(r"^  Perplexity: \d+\.\d\d$", log, re.M) and "BLEU" not in log  # eval.metrics=[perplexity]
    assert trainable == lora_n + vocab * hidden  # LoRA on q/v + one trained copy of the (tied) output head
    assert total == sum(p.numel() for p in base.parameters()) + trainable

    model = PeftModel.from_pretrained(base, str(final))
    adapted = _adapted(model)
    assert {n.rsplit(".", 1)[-1] for n in adapted} == {"q_proj", "v_proj"} and len(adapted) == 4
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(16 / math.sqrt(8))  # rsLoRA: alpha / sqrt(r), not alpha / r
    assert torch.equal(q.base_layer.weight, base_q)  # the base stayed frozen
    saved = load_file(final / "adapter_model.safetensors")
    loaded = {n.replace(".default", ""): p for n, p in model.named_parameters() if ".default" in n}
    lora_keys = [k for k in saved if "lora_" in k]
    assert len(lora_keys) == 8
    for k in lora_keys:
        assert torch.equal(loaded[k], saved[k]), k
    assert all(saved[k].abs().sum() > 0 for k in lora_keys if "lora_B" in k)  # B starts at 0: it trained

    head = model.base_model.model.get_output_embeddings()
    emb = model.base_model.model.get_input_embeddings()
    trained_head = head.modules_to_save["default"].weight
    assert not torch.equal(trained_head, base_head)  # the output head trained in full ...
    assert torch.equal(emb.modules_to_save["default"].weight, trained_head)  # ... and stayed tied to the embedding
    merged = model.merge_and_unload()
    assert torch.equal(merged.lm_head.weight, trained_head) and torch.equal(merged.model.embed_tokens.weight,
                                                                            trained_head)


def test_dora_all_linear(tiny_model_dir, demo_alpaca, tmp_path):
    from peft import PeftModel

    run = _train(tiny_model_dir, demo_alpaca, tmp_path, "dora", "training.method=dora", "lora.r=4",
                 "training.max_steps=2")
    final = run / "checkpoint-final"
    acfg = json.loads((final / "adapter_config.json").read_text())
    assert acfg["use_dora"] is True and acfg["use_rslora"] is False and acfg["r"] == 4
    assert not acfg.get("modules_to_save")
    # all-linear: every projection of every layer, never the output head
    assert {t.rsplit(".", 1)[-1] for t in acfg["target_modules"]} == LINEAR
    assert json.loads((final / "tunelab.json").read_text())["method"] == "dora"

    base = _fresh_base(tiny_model_dir)
    shapes = _linear_shapes(base)
    method, trainable, total = _printed_counts(run)
    magnitudes = 2 * sum(out for _, out in shapes.values())  # DoRA: one magnitude per output feature
    assert method == "dora" and trainable == _lora_params(shapes, LINEAR, r=4) + magnitudes
    assert total == sum(p.numel() for p in base.parameters()) + trainable

    model = PeftModel.from_pretrained(base, str(final))
    adapted = _adapted(model)
    assert len(adapted) == 2 * len(LINEAR) and not any("lm_head" in n for n in adapted)
    saved = load_file(final / "adapter_model.safetensors")
    assert sum("lora_magnitude_vector" in k for k in saved) == 2 * len(LINEAR)
    loaded = {n.replace(".default", ""): p for n, p in model.named_parameters() if ".default" in n}
    for k, v in saved.items():
        key = k if k in loaded else k + ".weight" if k + ".weight" in loaded else k.replace(".weight", "")
        assert torch.equal(loaded[key], v), k


def test_lora_leaves_bitsandbytes_unloaded_and_qlora_later_in_the_process_still_finds_it(tiny_model_dir, demo_alpaca,
                                                                                        tmp_path):
    """peft imports bitsandbytes on import and when adding adapters (60-90 MiB of a LoRA run's peak); tunelab hides
    it from peft unless QLoRA (or anything else) has loaded it, and a QLoRA run after that, in the same process,
    must still get its 4-bit layers. In a fresh interpreter: nothing has imported peft or bitsandbytes yet."""
    pytest.importorskip("bitsandbytes")
    script = textwrap.dedent(f"""
        import sys
        from tunelab.config import load_config
        from tunelab.model.loading import load_pretrained
        from tunelab.train.recipe import train

        def run(name, *extra):
            return train(load_config(None, ["model.name={tiny_model_dir}", "data.train={demo_alpaca}",
                                            "output.dir={tmp_path}", "output.run_name=" + name, "model.dtype=fp32",
                                            "data.max_length=96", "training.max_steps=2", "training.batch_size=2",
                                            "eval.metrics=[perplexity]", "tracking.report_to=[none]", *extra]))

        lora = run("lora")
        load_pretrained(adapter=lora)
        print("after lora:", "peft" in sys.modules, "bitsandbytes" in sys.modules)
        qlora = run("qlora", "training.method=qlora", "quantization.compute_dtype=bf16")
        print("after qlora:", "bitsandbytes" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "after lora: True False" in out.stdout and "after qlora: True" in out.stdout, out.stdout[-2000:]
    log = (tmp_path / "qlora" / "train.log").read_text()
    assert "QLoRA: base weights in 4-bit NF4 with double quantisation, compute in bf16" in log
    method, trainable, _ = _printed_counts(tmp_path / "qlora")
    assert method == "qlora" and trainable == _printed_counts(tmp_path / "lora")[1]


def test_library_callers_see_no_peft_deprecation_noise(tiny_model_dir, demo_alpaca, tmp_path):
    """peft 0.21 reads transformers' renamed `is_gradient_checkpointing` whenever it wraps a model (a FutureWarning
    for every adapter added or loaded); the CLI used to hide it for itself only, a script calling train() saw it."""
    import warnings

    from tunelab.model.loading import load_pretrained

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_pretrained(adapter=_train(tiny_model_dir, demo_alpaca, tmp_path, "lora"))
    assert not [str(w.message) for w in seen if "is_gradient_checkpointing" in str(w.message)]


def test_qlora_trains_on_a_4bit_nf4_double_quantised_base(tiny_model_dir, demo_alpaca, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    import tunelab.model.adapters as adapters

    seen = {}
    original = adapters.apply_method

    def spy(model, cfg, say=None):  # keep the model the recipe trains, to inspect its layers afterwards
        seen["model"] = original(model, cfg, say)
        return seen["model"]

    monkeypatch.setattr(adapters, "apply_method", spy)
    run = _train(tiny_model_dir, demo_alpaca, tmp_path, "qlora", "training.method=qlora",
                 "quantization.compute_dtype=bf16", "training.max_steps=2")
    log = (run / "train.log").read_text()
    assert "QLoRA: base weights in 4-bit NF4 with double quantisation, compute in bf16" in log

    model = seen["model"]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert {n.rsplit(".", 2)[-2] for n in layers} == LINEAR and len(layers) == 2 * len(LINEAR)
    for name, layer in layers.items():
        assert layer.weight.quant_type == "nf4", name
        assert layer.weight.quant_state.nested, f"{name}: double quantisation (nested quant state) expected"
        assert layer.compute_dtype == torch.bfloat16, name
    assert not isinstance(model.base_model.model.lm_head, bnb.nn.Linear4bit)  # the head stays in full precision
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)

    method, trainable, total = _printed_counts(run)
    assert method == "qlora" and trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # total counts logical parameters (a 4-bit tensor packs two per byte): the same as the unquantised model
    assert total == sum(p.numel() for p in _fresh_base(tiny_model_dir).parameters()) + trainable

    final = run / "checkpoint-final"
    assert json.loads((final / "tunelab.json").read_text())["method"] == "qlora"
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    reloaded = PeftModel.from_pretrained(_fresh_base(tiny_model_dir, quantization_config=quant), str(final))
    saved = load_file(final / "adapter_model.safetensors")
    loaded = {n.replace(".default", ""): p for n, p in reloaded.named_parameters() if ".default" in n}
    assert saved and all(torch.equal(loaded[k].float(), v.float()) for k, v in saved.items())
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)


def test_full_fine_tune_saves_a_whole_model_that_moved(tiny_model_dir, demo_alpaca, tmp_path):
    from transformers import AutoModelForCausalLM

    run = _train(tiny_model_dir, demo_alpaca, tmp_path, "full", "training.method=full", "training.max_steps=2",
                 "training.learning_rate=1e-3")
    final = run / "checkpoint-final"
    names = {p.name for p in final.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tunelab.json"} <= names
    assert "adapter_config.json" not in names and "adapter_model.safetensors" not in names

    base = _fresh_base(tiny_model_dir)
    method, trainable, total = _printed_counts(run)
    assert method == "full" and trainable == total == sum(p.numel() for p in base.parameters())

    tuned = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    before, after = dict(base.named_parameters()), dict(tuned.named_parameters())
    assert before.keys() == after.keys()
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"full fine-tuning left these weights untouched: {unchanged}"
    assert torch.equal(tuned.get_input_embeddings().weight, tuned.get_output_embeddings().weight)  # still tied
