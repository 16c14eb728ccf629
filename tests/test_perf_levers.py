"""Issue 15's training levers: a token budget per micro-batch (`training.batch_tokens`) and the fused LoRA layer
(`tunelab.model.fused_lora`), each against the plain path: same records, same losses and gradients."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tunelab.config import Config, ConfigError, load_config
from tunelab.data.batching import collate_packed, token_batches_for_epoch, token_bins
from tunelab.data.template import encode_record
from tunelab.model.adapters import apply_method
from tunelab.model.loss import CausalLMLoss

# ---------------------------------------------------------------- token budget


def test_token_bins_respect_the_budget_and_hold_every_record_once():
    lengths = [int(x) for x in torch.randint(5, 120, (500,), generator=torch.Generator().manual_seed(0))]
    bins = token_bins(lengths, 256)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 256 for b in bins)
    lower = -(-sum(lengths) // 256)
    assert len(bins) <= lower * 1.05 + 1, "best fit leaves few rows part-empty"
    assert token_bins([300, 10, 20], 256) == [[0], [2, 1]], "a record over the budget gets a row of its own"


def test_token_batches_cover_each_epoch_in_a_seeded_order():
    lengths = [7, 100, 30, 64, 90, 12, 40, 55, 18, 77] * 5
    e0, e0_again = token_batches_for_epoch(lengths, 200, 3, 0), token_batches_for_epoch(lengths, 200, 3, 0)
    e1 = token_batches_for_epoch(lengths, 200, 3, 1)
    assert e0 == e0_again and e0 != e1 and len(e0) == len(e1)
    for epoch in (e0, e1):
        assert sorted(i for b in epoch for i in b) == list(range(len(lengths)))


def test_batch_tokens_is_checked_against_packing_and_max_length():
    with pytest.raises(ConfigError, match="packing"):
        load_config(None, ["training.batch_tokens=2048", "training.packing=false"])
    with pytest.raises(ConfigError, match="at least data.max_length"):
        load_config(None, ["training.batch_tokens=256", "data.max_length=512"])
    assert load_config(None, ["training.batch_tokens=2048"]).training.batch_tokens == 2048
    with pytest.raises(ConfigError, match="pass_tokens"):
        load_config(None, ["training.batch_tokens=2048", "training.pass_tokens=256", "data.max_length=512"])
    with pytest.raises(ConfigError, match="set training.batch_tokens"):
        load_config(None, ["training.pass_tokens=1024"])


@pytest.mark.parametrize("options, passes", [
    ([], (4, 512)),  # auto: passes of max(data.max_length, 512)
    (["training.pass_tokens=2048"], (1, 2048)),  # one pass per micro-batch
    (["training.batch_tokens=2000"], (3, 666)),  # never more than batch_tokens in a step
    (["data.max_length=1024"], (2, 1024)),
    (["training.batch_tokens=512"], (1, 512)),
])
def test_token_budget_splits_into_passes(options, passes):
    assert load_config(None, ["training.batch_tokens=2048", *options]).token_passes() == passes


def test_plan_runs_each_token_budget_as_its_passes(tmp_path):
    """batch_tokens 1024 in passes of <= 256: every step is 4 bins of <= 256 tokens (<= 1024 in all), every record
    once per epoch; a config saved before pass_tokens existed keeps one pass per micro-batch."""
    from tunelab.config import load_run_config, save_config
    from tunelab.data.batching import step_batches_for_epoch
    from tunelab.train.recipe import make_plan

    lengths = [(37 * i) % 200 + 20 for i in range(300)]
    cfg = load_config(None, ["training.batch_tokens=1024", "training.pass_tokens=256", "data.max_length=256"])
    plan = make_plan(cfg, lengths, world=1)
    assert (plan.group_size, plan.pass_tokens) == (4, 256)
    bins = step_batches_for_epoch(lengths, cfg.training, 0, plan.pass_tokens)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 256 for b in bins)
    assert plan.steps_per_epoch == -(-len(bins) // 4)
    one = make_plan(load_config(None, ["training.batch_tokens=1024", "training.pass_tokens=1024",
                                       "data.max_length=256"]), lengths, world=1)
    assert (one.group_size, one.pass_tokens) == (1, 1024)

    save_config(cfg, tmp_path / "config.yaml")
    assert load_run_config(tmp_path / "config.yaml").training.pass_tokens == 256
    old = (tmp_path / "config.yaml").read_text().replace("  pass_tokens: 256\n", "")
    assert "pass_tokens" not in old
    (tmp_path / "config.yaml").write_text(old)
    assert load_run_config(tmp_path / "config.yaml").token_passes() == (1, 1024)
    assert load_config(tmp_path / "config.yaml").token_passes() == (2, 512)  # a new run from that file: auto


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory) -> str:
    from tunelab.demo_data import write_demo_data

    folder = tmp_path_factory.mktemp("raw")
    write_demo_data(folder)
    return str(folder / "demo_*.json")


def _cfg(tiny_model_dir, demo_files, out, name, *extra, dtype="fp32"):
    return load_config(None, [f"model.name={tiny_model_dir}", f"model.dtype={dtype}", f"data.train={demo_files}",
                              f"output.dir={out}", f"output.run_name={name}", "training.epochs=1",
                              "data.max_length=128", "training.batch_tokens=256", "training.logging_steps=1",
                              "training.learning_rate=5e-3", "eval.metrics=[perplexity]",
                              "tracking.report_to=[none]", *extra])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_token_budget_run_resumes_exactly(tiny_model_dir, demo_files, tmp_path, signal_after_step, dtype):
    """A run with a token budget: the plan counts its packed rows, and a run stopped mid-epoch and resumed
    equals the uninterrupted one (same rows in the same order), in fp32 and bf16."""
    from tunelab.rundir import read_metrics
    from tunelab.train.recipe import TrainingInterrupted, train

    full = train(_cfg(tiny_model_dir, demo_files, tmp_path, "full", "training.save_steps=2", dtype=dtype))
    manifest = json.loads((full / "manifest.json").read_text())
    steps = manifest["total_steps"]
    assert steps >= 4 and steps < manifest["data"]["train_records"] / 2, "rows of several records"
    signal_after_step(3)
    with pytest.raises(TrainingInterrupted):
        train(_cfg(tiny_model_dir, demo_files, tmp_path, "split", "training.save_steps=2", dtype=dtype))
    signal_after_step(None)
    train(load_config(None, [f"output.dir={tmp_path}"]), resume=str(tmp_path / "split"))
    losses = [[m["loss"] for m in read_metrics(run) if "loss" in m and not m.get("final")]
              for run in (full, tmp_path / "split")]
    assert len(losses[0]) == steps and losses[0] == pytest.approx(losses[1], abs=1e-5)


# ---------------------------------------------------------------- fused LoRA layer


@pytest.fixture
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.fixture
def lora_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tunelab.train.dropout import install_fast_dropout

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    model = apply_method(model, Config.model_validate({"lora": {"dropout": 0.1}}))
    for name, p in model.named_parameters():  # lora_B starts at zero: make the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    install_fast_dropout(model)
    return model


def _batch(tok):
    convs = [[{"role": "user", "content": f"Question {i} " * (i + 2)},
              {"role": "assistant", "content": f"Answer {i} " * (2 * i + 1)}] for i in range(4)]
    return collate_packed([vars(encode_record(tok, c)) for c in convs])


def _loss_and_grads(model, batch, autocast_dtype=None):
    model.zero_grad()
    torch.manual_seed(123)  # the same dropout masks for both paths
    ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else torch.autocast("cpu", enabled=False)
    with ctx:
        s, n = CausalLMLoss(model)(**batch)
    (s / n).backward()
    return float(s.detach()), {k: p.grad.float().clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_lora_equals_peft_forward_and_backward(lora_model, tiny_tokenizer, precision, monkeypatch):
    """Training mode with dropout: loss and every adapter gradient equal peft's path (same masks). fp32: within
    float rounding (rtol 1e-5 loss, 1e-4 gradients); bf16 base under autocast: within bf16 rounding (loss 1e-2,
    gradient norms of the difference below 3% of each gradient's norm)."""
    from tunelab.model import fused_lora

    model = lora_model.train()
    autocast = None
    if precision == "bf16":
        for name, p in model.named_parameters():
            if "lora_" not in name:
                p.data = p.data.to(torch.bfloat16)  # the bf16 base the recipe loads; adapters stay fp32
        autocast = torch.bfloat16
    batch = _batch(tiny_tokenizer)
    plain_loss, plain = _loss_and_grads(model, batch, autocast)
    calls = []
    orig = fused_lora.LoraFn.apply
    monkeypatch.setattr(fused_lora.LoraFn, "apply", lambda *a: calls.append(1) or orig(*a))
    n = fused_lora.install_fused_lora(model)
    fused_loss, fused = _loss_and_grads(model, batch, autocast)
    assert n > 0 and len(calls) == n, "every LoRA layer took the fused path once"
    assert fused.keys() == plain.keys() and all("lora_" in k for k in fused)
    if precision == "fp32":
        assert fused_loss == pytest.approx(plain_loss, rel=1e-5)
        for k, g in plain.items():
            assert torch.allclose(fused[k], g, rtol=1e-4, atol=1e-6 * float(g.abs().max())), k
    else:
        assert fused_loss == pytest.approx(plain_loss, rel=1e-2)
        for k, g in plain.items():
            assert float((fused[k] - g).norm()) <= 0.03 * float(g.norm()) + 1e-8, k


def test_fused_lora_casts_adapters_again_after_they_change(lora_model, tiny_tokenizer):
    """The compute-dtype copies of the adapters are kept between passes: an in-place change of an adapter (what the
    optimiser's step does) must reach the next forward, as it reaches peft's."""
    from tunelab.model import fused_lora

    model = lora_model.train()
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)
    batch = _batch(tiny_tokenizer)
    fused_lora.install_fused_lora(model)
    before, _ = _loss_and_grads(model, batch, torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(3.0)  # in place, as AdamW's foreach step
    fused_after, _ = _loss_and_grads(model, batch, torch.bfloat16)
    for m in model.modules():  # peft's own forward on the changed adapters
        if hasattr(m, "_tunelab_unfused_forward"):
            m.forward = m._tunelab_unfused_forward
    plain_after, _ = _loss_and_grads(model, batch, torch.bfloat16)
    assert abs(fused_after - plain_after) < 0.1 * abs(plain_after - before), (before, fused_after, plain_after)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_lora_rebuilds_norm_and_swiglu_outputs_instead_of_keeping_them(lora_model, tiny_tokenizer, precision,
                                                                             monkeypatch):
    """With lean_layers, the fused q/k/v and gate/up keep their norm's input and weight (kept by the norm anyway)
    instead of the norm's output, and down_proj keeps gate and up instead of silu(gate) * up; backward makes each of
    those inputs again once for the layers sharing it. The same loss and gradients bit for bit, and per layer two
    [tokens, hidden] and one [tokens, intermediate] tensor less kept for backward."""
    from tunelab.model import fused_lora, lean_layers

    model = lora_model.train()
    assert lean_layers.install_lean_layers(model) and fused_lora.install_fused_lora(model)
    batch = _batch(tiny_tokenizer)
    autocast = torch.bfloat16 if precision == "bf16" else None
    made = []
    monkeypatch.setattr(lean_layers, "_rms_scale", lambda *a, _f=lean_layers._rms_scale, **k: made.append(1) or
                        _f(*a, **k))

    def run():
        kept = []  # held, so that no storage freed on the way (a discarded output's graph) lends its address

        def pack(t):
            kept.append(t)
            return t

        made.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, grads = _loss_and_grads(model, batch, autocast)
        return loss, grads, sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}.values())

    loss, grads, kept = run()
    layers = model.config.num_hidden_layers
    norms = 2 * layers + 1  # and the final one
    # once more in backward for q/k/v and for gate/up, except the first layer's input norm: it keeps nothing (its
    # input, the frozen embeddings' output, needs no gradient), so q/k/v keep its output
    assert len(made) == norms + 2 * layers - 1, "each norm output made once in forward, once more for its LoRA layers"
    lean_layers.install_lean_layers(model, rebuild=False)  # the lever rebuild_inputs off: the LoRA layers keep them
    loss2, grads2, kept2 = run()
    assert len(made) == norms
    assert loss == loss2 and grads.keys() == grads2.keys() and all(torch.equal(grads[k], grads2[k]) for k in grads)
    # an fp32 model: its norms' outputs are fp32 under bf16 autocast too, the products (gate, up) are bf16 there
    mlp_width = 2 if precision == "bf16" else 4
    tokens, cfg = batch["input_ids"].numel(), model.config
    norm_bytes = (2 * layers - 1) * cfg.hidden_size * tokens * 4
    assert kept2 - kept == norm_bytes + layers * cfg.intermediate_size * tokens * mlp_width


@pytest.mark.parametrize("off", ["", "rebuild_inputs"])
def test_the_rebuild_inputs_lever_decides_whether_norm_outputs_carry_a_rebuild(lora_model, off, monkeypatch):
    """ready_to_train installs the lean layers with the lever's setting: on, a decoder layer's norm output carries
    its Rebuild; TUNELAB_PERF_OFF=rebuild_inputs, it does not (the LoRA layers keep their inputs)."""
    from types import SimpleNamespace

    from tunelab.train.recipe import ready_to_train

    monkeypatch.setenv("TUNELAB_PERF_OFF", off)
    model = ready_to_train(lora_model, SimpleNamespace(device=torch.device("cpu")), lambda *a: None, 0.05)
    norm = model.base_model.model.model.layers[1].post_attention_layernorm
    out = norm(torch.randn(1, 3, model.config.hidden_size, requires_grad=True))
    assert (getattr(out, "tunelab_rebuild", None) is not None) == (not off)


def test_fused_lora_leaves_eval_and_torch_dropout_to_peft(lora_model, tiny_tokenizer, monkeypatch):
    from torch import nn

    from tunelab.model import fused_lora

    calls = []
    orig = fused_lora.LoraFn.apply
    monkeypatch.setattr(fused_lora.LoraFn, "apply", lambda *a: calls.append(1) or orig(*a))
    batch = _batch(tiny_tokenizer)
    fused_lora.install_fused_lora(lora_model)
    with torch.no_grad():
        lora_model.eval()
        CausalLMLoss(lora_model)(**batch)
    assert not calls, "eval mode: peft's forward"
    lora_model.train()
    for m in lora_model.modules():  # torch's own dropout (the fast_dropout lever off): its masks, peft's path
        table = getattr(m, "lora_dropout", None)
        if isinstance(table, nn.ModuleDict):
            for k in list(table.keys()):
                table[k] = nn.Dropout(0.1)
    CausalLMLoss(lora_model)(**batch)
    assert not calls


# ---------------------------------------------------------------- reused logits buffers


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_reused_logit_buffers_change_nothing(tiny_model, tiny_tokenizer, autocast_dtype, monkeypatch):
    """The loss head's chunk buffers kept between calls (lever logit_buffers): the same loss and gradients, bit
    for bit, as fresh buffers, over several calls with different chunk counts (eval and training)."""
    model = apply_method(tiny_model, Config()).eval()
    batch = _batch(tiny_tokenizer)
    results = []
    for off in ("logit_buffers", ""):
        monkeypatch.setenv("TUNELAB_PERF_OFF", off)
        for chunk in (5, 1024):
            model.zero_grad()
            ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else torch.autocast("cpu", enabled=False)
            with ctx:
                with torch.no_grad():
                    ev = float(CausalLMLoss(model, chunk_size=chunk)(**batch)[0])
                s, _ = CausalLMLoss(model, chunk_size=chunk)(**batch)
            s.backward()
            results.append((ev, float(s.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    for fresh, kept in zip(results[:2], results[2:]):
        assert fresh[0] == kept[0] and fresh[1] == kept[1]
        assert all(torch.equal(a, b) for a, b in zip(fresh[2], kept[2]))


def test_fused_lora_is_a_default_lever_and_recorded(monkeypatch):
    from tunelab.runtime import lever_enabled, runtime_info

    monkeypatch.delenv("TUNELAB_PERF_OFF", raising=False)
    monkeypatch.delenv("TUNELAB_PERF_ON", raising=False)
    assert lever_enabled("fused_lora") and not lever_enabled("trim_heap")
    assert runtime_info()["levers_off"] == [] and runtime_info()["levers_on"] == []
    assert "fused_lora" not in runtime_info()["opt_in"]
    monkeypatch.setenv("TUNELAB_PERF_OFF", "fused_lora")
    assert not lever_enabled("fused_lora") and runtime_info()["levers_off"] == ["fused_lora"]


def _rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon"))


def test_return_free_heap_gives_free_heap_pages_back(monkeypatch):
    """trim_heap (opt-in): after blocks between live ones are freed, their pages leave the resident set; off (the
    default), it does nothing."""
    import platform
    import sys

    from tunelab import runtime

    if not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"):
        pytest.skip("glibc only")
    monkeypatch.setenv("TUNELAB_PERF_ON", "trim_heap")
    runtime.return_free_heap()
    # 100 KB blocks (below glibc's mmap threshold: heap); every other one stays live, so each freed block lies
    # between live ones of its size. (Small pins could come from free chunks elsewhere in a heap earlier tests had
    # fragmented: the freed blocks then merged into the top of the heap and free() itself gave most of it back.)
    blocks = [torch.ones(25_000) for _ in range(3000)]
    pins = blocks[1::2]
    del blocks
    monkeypatch.delenv("TUNELAB_PERF_ON")
    before = _rss_anon_bytes()
    runtime.return_free_heap()
    assert before - _rss_anon_bytes() < 20e6  # lever off: nothing returned
    monkeypatch.setenv("TUNELAB_PERF_ON", "trim_heap")
    runtime.return_free_heap()
    assert before - _rss_anon_bytes() > 50e6  # of ~150 MB freed between the pins (measured 144 MB returned)
    assert len(pins) == 1500


def test_passes_of_one_step_return_free_heap_between_them(tiny_model, tiny_tokenizer, monkeypatch):
    """forward_backward trims after every pass but the step's last (the optimiser and the next step follow)."""
    from contextlib import nullcontext

    from tunelab.train import recipe

    calls = []
    monkeypatch.setattr(recipe, "return_free_heap", lambda: calls.append(1))
    exs = [encode_record(tiny_tokenizer, [{"role": "user", "content": f"question {i}"},
                                          {"role": "assistant", "content": f"answer {i}"}], max_length=64)
           for i in range(3)]
    train = [{"input_ids": e.input_ids, "labels": e.labels,
              "n_targets": sum(1 for x in e.labels[1:] if x != -100)} for e in exs]

    class Acc:
        device, num_processes, process_index = torch.device("cpu"), 1, 0

        def no_sync(self, model):
            return nullcontext()

        def backward(self, loss):
            loss.backward()

    loss_fn = CausalLMLoss(tiny_model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    recipe.forward_backward([[0], [1], [2]], train, collate_packed, Acc(), loss_fn, nullcontext, scaler)
    assert len(calls) == 2


_SHAPE_CACHE_PROBE = r"""
import ctypes, os, sys
import torch
import torch.nn.functional as F
from tunelab.runtime import bound_kernel_caches
if sys.argv[1] == "bounded":
    bound_kernel_caches()
else:
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = os.environ["LRU_CACHE_CAPACITY"] = "1024"  # the libraries' own
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
def in_use():
    m = libc.mallinfo2()
    return m.uordblks + m.hblkhd
w = torch.randn(256, 128, dtype=torch.bfloat16)
def products(rows):  # the products of a linear layer's forward and backward at this token count
    x = torch.randn(rows, 128, dtype=torch.bfloat16)
    return F.linear(x, w), F.linear(x, w) @ w
for rows in range(100, 200):  # warm-up: fills the bounded caches (2-3 entries per token count)
    products(rows)
before = in_use()
for rows in range(200, 450):  # 250 new token counts, as a run meets them step by step
    products(rows)
print((in_use() - before) / 2**20)
"""


def test_training_processes_bound_the_onednn_shape_caches(tmp_path):
    """oneDNN's and ideep's caches keep every bf16 product shape they ran (~0.3 MiB each, 1,024 by default): with
    a new token count each step they grew with the run. bound_kernel_caches (the training entry points' first
    call) caps them, and leaves a value the user set alone."""
    import os
    import platform
    import subprocess
    import sys

    from tunelab import runtime

    if not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"):
        pytest.skip("measured with glibc's mallinfo2")
    script = tmp_path / "probe.py"
    script.write_text(_SHAPE_CACHE_PROBE)
    env = {k: v for k, v in os.environ.items() if k not in runtime.KERNEL_CACHES}
    grown = {how: float(subprocess.run([sys.executable, str(script), how], env=env, capture_output=True, text=True,
                                       check=True).stdout.split()[-1])
             for how in ("library_default", "bounded")}
    if grown["library_default"] < 30:
        pytest.skip(f"bf16 products on this CPU do not go through oneDNN's caches ({grown})")
    assert grown["bounded"] < 10, grown  # measured 0.0-0.2 MiB bounded, ~100+ MiB at the libraries' defaults
    env["LRU_CACHE_CAPACITY"] = "7"
    out = subprocess.run([sys.executable, "-c", "import os; from tunelab.runtime import bound_kernel_caches; "
                          "bound_kernel_caches(); print(os.environ['LRU_CACHE_CAPACITY'], "
                          "os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["7", runtime.KERNEL_CACHES["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]]
    del env["LRU_CACHE_CAPACITY"]
    for tokens, entries in ((512, runtime.SMALL_PASS_ENTRIES), (2048, "64"), ("None", "64")):
        out = subprocess.run([sys.executable, "-c", "import os; from tunelab.runtime import bound_kernel_caches; "
                              f"bound_kernel_caches({tokens}); print(os.environ['LRU_CACHE_CAPACITY'], "
                              "os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"], env=env, capture_output=True,
                             text=True, check=True).stdout.split()
        assert out == [entries, entries], (tokens, out)
