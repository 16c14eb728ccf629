"""Unit tests of the training building blocks on the tiny random Llama: masking, loss, packing, LoRA updates."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.config import Config
from tunelab.data.template import IGNORE_INDEX, RecordRejected, encode_record
from tunelab.model.adapters import apply_method
from tunelab.data.batching import batches_for_epoch, collate_packed, collate_padded
from tunelab.model.loss import CausalLMLoss

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there"},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "I am Tuna."},
]

ZEPHYR = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def _trained_texts(tok, enc):
    return [tok.decode(enc.input_ids[s:e]) for s, e in enc.spans]


@pytest.fixture
def zephyr_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = ZEPHYR
    return tok


def test_chatml_masks_every_assistant_turn_with_end_of_turn(tiny_tokenizer):
    enc = encode_record(tiny_tokenizer, CONV)
    assert _trained_texts(tiny_tokenizer, enc) == ["Hello there<|im_end|>\n", "I am Tuna.<|im_end|>\n"]
    labelled = [i for i, x in enumerate(enc.labels) if x != IGNORE_INDEX]
    assert labelled == [i for s, e in enc.spans for i in range(s, e)]
    assert all(enc.labels[i] == enc.input_ids[i] for i in labelled)


def test_second_template_masks_exact_spans(zephyr_tokenizer):
    tok = zephyr_tokenizer
    enc = encode_record(tok, CONV)
    assert _trained_texts(tok, enc) == [f"Hello there{tok.eos_token}\n", f"I am Tuna.{tok.eos_token}\n"]
    assert not enc.eos_appended


def test_train_on_options(tiny_tokenizer):
    last = encode_record(tiny_tokenizer, CONV, train_on="last_assistant")
    assert _trained_texts(tiny_tokenizer, last) == ["I am Tuna.<|im_end|>\n"]
    every = encode_record(tiny_tokenizer, CONV, train_on="all")
    assert every.labels == every.input_ids


def test_template_without_stop_token_gets_eos_appended(tiny_tokenizer, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}" \
                        "{% if add_generation_prompt %}assistant: {% endif %}"
    enc = encode_record(tok, CONV[:3])
    assert enc.eos_appended and enc.input_ids[-1] == tok.eos_token_id and enc.labels[-1] == tok.eos_token_id


def test_all_masked_record_is_refused(tiny_tokenizer):
    with pytest.raises(RecordRejected, match="no assistant answer"):
        encode_record(tiny_tokenizer, [{"role": "user", "content": "Hi"}])
    long_prompt = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(RecordRejected, match="nothing left to train"):
        encode_record(tiny_tokenizer, long_prompt, max_length=64)
    with pytest.raises(RecordRejected, match="overflow=drop"):
        encode_record(tiny_tokenizer, long_prompt, max_length=64, overflow="drop")


@pytest.fixture
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def _examples(tok, n=4):
    convs = [[{"role": "user", "content": f"Question number {i} " * (i + 1)},
              {"role": "assistant", "content": f"Answer {i} " * (2 * i + 1)}] for i in range(n)]
    return [vars(encode_record(tok, c)) for c in convs]


def test_chunked_loss_equals_full_logits_loss(tiny_model, tiny_tokenizer):
    exs = _examples(tiny_tokenizer)
    batch = collate_padded(exs, tiny_tokenizer.pad_token_id)
    s, n = CausalLMLoss(tiny_model, chunk_size=7)(**batch)
    ref = tiny_model(**batch).loss  # transformers' own shifted, masked mean
    with torch.no_grad():  # evaluation's in-place chunks give the same sum
        assert torch.allclose(CausalLMLoss(tiny_model, chunk_size=7)(**batch)[0], s.detach(), rtol=1e-5)
    assert n == sum(sum(1 for x in e["labels"][1:] if x != IGNORE_INDEX) for e in exs)
    assert torch.allclose(s / n, ref, atol=1e-5)


def test_packing_matches_padded_loss(tiny_model, tiny_tokenizer):
    exs = _examples(tiny_tokenizer)
    loss_fn = CausalLMLoss(tiny_model)
    s_pad, n_pad = loss_fn(**collate_padded(exs, tiny_tokenizer.pad_token_id))
    packed = collate_packed(exs)
    assert packed["input_ids"].shape[0] == 1 and packed["position_ids"][0].tolist().count(0) == len(exs)
    s_pack, n_pack = loss_fn(**packed)
    assert int(n_pad) == int(n_pack)
    assert torch.allclose(s_pad, s_pack, rtol=1e-4), "packed records must not attend to each other"


def test_per_record_packed_attention_equals_the_masked_row(tiny_model_dir, tiny_tokenizer, monkeypatch):
    """tunelab's packed SDPA (one causal attention per record) gives the loss and gradients of transformers' SDPA
    with the block-diagonal mask, and of padded batches; unpacked inputs go through SDPA unchanged."""
    from transformers import AutoModelForCausalLM

    from tunelab.model import attention
    from tunelab.model.attention import NAME, packed_kwargs, use_packed_attention

    exs = _examples(tiny_tokenizer, n=5)
    packed = collate_packed(exs)
    calls = []
    sdpa = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda q, *a, **k: calls.append((q.shape[2], k.get("is_causal"))) or sdpa(q, *a, **k))
    results = {}
    for kind in ("sdpa", "packed"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        if kind == "packed":
            assert use_packed_attention(model) and model.config._attn_implementation == NAME
        s, n = CausalLMLoss(model)(**packed)
        s.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        padded, _ = CausalLMLoss(model)(**collate_padded(exs, tiny_tokenizer.pad_token_id))
        results[kind] = (float(s.detach()), grads, float(padded.detach()))
    # the packed model attended record by record: 5 causal calls per layer on the packed row, none longer than it
    row = packed["input_ids"].shape[1]
    per_record = [c for c in calls if c[1] is True and c[0] < row]
    assert len(per_record) == 5 * 2, calls
    assert results["packed"][0] == pytest.approx(results["sdpa"][0], rel=1e-5)
    assert results["packed"][2] == pytest.approx(results["sdpa"][2], rel=1e-6)  # padded: the SDPA path itself
    assert results["packed"][0] == pytest.approx(results["packed"][2], rel=1e-4)
    for k, g in results["sdpa"][1].items():
        assert torch.allclose(results["packed"][1][k], g, rtol=1e-4, atol=1e-6), k
    cu = packed_kwargs(packed["position_ids"], 1)["cu_seq_lens_q"].tolist()
    assert cu[0] == 0 and cu[-1] == packed["input_ids"].shape[1] and len(cu) == len(exs) + 1
    assert packed_kwargs(packed["position_ids"], 2) == {} and packed_kwargs(None, 1) == {}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_bmm_causal_attention_equals_sdpa_forward_and_backward(dtype):
    """CausalAttention (batched products, fp32 softmax, probabilities recomputed in backward) against SDPA's
    causal GQA attention on strided query slices as a packed row gives them: fp32 within 1e-5, bf16 within its
    rounding; a one-token record has zero query/key gradients."""
    import torch.nn.functional as F

    from tunelab.model.attention import CausalAttention, causal_bias

    dt = torch.float32 if dtype == "fp32" else torch.bfloat16
    tol = 1e-5 if dtype == "fp32" else 2e-2
    heads, kv_heads, dim = 6, 2, 16
    for length in (1, 7, 130):
        g = torch.Generator().manual_seed(length)
        row = torch.randn(1, length + 9, heads, dim, generator=g).to(dt).transpose(1, 2)
        k = torch.randn(1, kv_heads, length, dim, generator=g).to(dt)
        v = torch.randn(1, kv_heads, length, dim, generator=g).to(dt)
        go = torch.randn(1, heads, length, dim, generator=g).to(dt)
        results = []
        for ours in (True, False):
            q = row[:, :, 4:4 + length].detach().requires_grad_()
            kk, vv = k.clone().requires_grad_(), v.clone().requires_grad_()
            if ours:
                out = CausalAttention.apply(q, kk, vv, causal_bias(length, 3, kv_heads, dt, "cpu"), 0.3)
            else:
                out = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=True, scale=0.3)
            out.backward(go)
            results.append([t.float() for t in (out, q.grad, kk.grad, vv.grad)])
        for mine, ref in zip(*results):
            assert (mine - ref).abs().max() <= tol * max(ref.abs().max(), 1.0), length
        if length == 1:
            assert results[0][1].abs().max() == 0 and results[0][2].abs().max() == 0


def test_bf16_packed_rows_attend_with_batched_products_up_to_the_length_limit(tiny_model_dir, tiny_tokenizer,
                                                                               monkeypatch):
    """In bf16 training, records up to BMM_MAX_LENGTH go through CausalAttention (one causal bias per length,
    shared by the layers), longer ones through SDPA; the loss and gradients stay within bf16 rounding of SDPA's for
    every record (lever bmm_attention off)."""
    from transformers import AutoModelForCausalLM

    from tunelab.model import attention
    from tunelab.model.attention import use_packed_attention

    exs = _examples(tiny_tokenizer, n=5)
    packed = collate_packed(exs)
    lengths = sorted(len(e["input_ids"]) for e in exs)
    monkeypatch.setattr(attention, "BMM_MAX_LENGTH", lengths[2])
    calls, biases = [], {}

    def counted(q, k, v, bias, scale):
        calls.append(q.shape[2])
        biases.setdefault(q.shape[2], set()).add(bias.data_ptr())
        return apply(q, k, v, bias, scale)

    apply = attention.CausalAttention.apply
    monkeypatch.setattr(attention.CausalAttention, "apply", counted)
    results = {}
    for lever in ("on", "off"):
        monkeypatch.setenv("TUNELAB_PERF_OFF", "" if lever == "on" else "bmm_attention")
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
        assert use_packed_attention(model)
        for p in model.parameters():
            p.requires_grad_(True)
        s, n = CausalLMLoss(model)(**packed)
        s.backward()
        results[lever] = (float(s.detach()) / int(n), {k: p.grad.float() for k, p in model.named_parameters()})
    layers = model.config.num_hidden_layers
    assert sorted(calls) == sorted([n for n in lengths if n <= lengths[2]] * layers)  # only with the lever on
    assert layers > 1 and all(len(made) == 1 for made in biases.values())  # one bias per length, for all layers
    assert results["on"][0] == pytest.approx(results["off"][0], rel=1e-2)
    for k, g in results["off"][1].items():
        mine = results["on"][1][k]
        assert torch.nn.functional.cosine_similarity(mine.flatten(), g.flatten(), dim=0) > 0.99, k


def test_packed_attention_is_not_used_where_it_would_differ(tiny_model_dir):
    """Sliding-window models (and non-SDPA attention) keep transformers' masks."""
    from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

    from tunelab.model.attention import use_packed_attention

    windowed = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                sliding_window=16))
    assert not use_packed_attention(windowed) and windowed.config._attn_implementation == "sdpa"
    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert not use_packed_attention(eager) and eager.config._attn_implementation == "eager"


def test_lora_changes_every_adapter_weight_and_no_base_weight(tiny_model, tiny_tokenizer):
    torch.manual_seed(0)  # dropout masks: not whatever earlier tests left in the generator
    cfg = Config()
    model = apply_method(tiny_model, cfg)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    loss_fn = CausalLMLoss(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    batch = collate_packed(_examples(tiny_tokenizer))
    losses = []
    for _ in range(20):
        s, n = loss_fn(**batch)
        (s / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(s.detach() / n))
    # learning the batch: the random tiny model levels off near 10.27 within ~5 steps, where single steps wobble by
    # a few hundredths (the last below the best of the first five held for some seeds only), so compare means
    assert losses[-1] < losses[0] - 0.3 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == ("lora_" in name), name


def test_lora_module_names_that_match_nothing_are_refused_not_dropped(tiny_model):
    """peft raised only when no target matched at all: [q_proj, c_attn] trained q_proj alone, and a
    modules_to_save entry naming nothing changed nothing, both without a word."""
    from tunelab.errors import TunelabError

    for lora, says in (({"target_modules": ["q_proj", "c_attn"]}, "lora.target_modules 'c_attn' ("),
                       ({"modules_to_save": ["foo"]}, "lora.modules_to_save 'foo' ("),
                       ({"target_modules": ["c_attn", "v_proj", "wte"], "modules_to_save": ["lm_head", "foo"]},
                        "lora.target_modules 'c_attn', 'wte' and lora.modules_to_save 'foo' (")):
        with pytest.raises(TunelabError, match="no module of this model matches") as err:
            apply_method(tiny_model, Config.model_validate({"lora": lora}))
        assert says in str(err.value) and "this model's linear layers: down_proj, gate_proj" in str(err.value)
    # a dotted suffix and a module to save are names peft matches: accepted, and each one is adapted or saved
    model = apply_method(tiny_model, Config.model_validate(
        {"lora": {"target_modules": ["layers.0.self_attn.q_proj", "v_proj"], "modules_to_save": ["lm_head"]}}))
    adapted = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                       "model.layers.1.self_attn.v_proj"}
    assert any(type(m).__name__ == "ModulesToSaveWrapper" for m in model.modules())  # peft may save the tied twin


def test_a_lora_rank_above_an_adapted_layers_width_is_one_warning_line(tiny_model_dir, caplog):
    """r=256 on the tiny model (k_proj 64 -> 32) was accepted without a word: the update's rank stops at 32 while
    the scale falls to alpha/r. A warning, not a refusal (some do it on purpose, with rsLoRA)."""
    from transformers import AutoModelForCausalLM

    def lines(lora, own_say=True):
        said: list[str] = []
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        apply_method(model, Config.model_validate({"lora": lora}), said.append if own_say else None)
        return said

    said = lines({"r": 256, "alpha": 32})
    assert said == ["warning: lora.r=256 exceeds the width of the narrowest adapted layer "
                    "(model.layers.0.self_attn.k_proj: 32); its update has rank at most 32 while the scale is 0.125 "
                    "(lora.r <= 32 avoids this)"]
    assert lines({"r": 32}) == [] and lines({"r": 64, "target_modules": ["q_proj", "up_proj"]}) == []
    assert "up_proj: 64)" in lines({"r": 65, "target_modules": ["q_proj", "up_proj"]})[0]
    with caplog.at_level("WARNING", logger="tunelab.model.adapters"):  # a library caller without `say`: logged
        lines({"r": 48, "use_rslora": True}, own_say=False)
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        "warning: lora.r=48 exceeds the width of the narrowest adapted layer (model.layers.0.self_attn.k_proj: 32)"]


def test_length_grouped_batches_cover_every_record_once():
    lengths = [5, 100, 7, 90, 6, 95, 8, 99, 3, 97, 4, 92]
    batches = batches_for_epoch(lengths, 3, seed=1, epoch=0, group_by_length=True)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert max(spread) < 50
    assert batches_for_epoch(lengths, 3, 1, 0) == batches_for_epoch(lengths, 3, 1, 0)
    assert batches_for_epoch(lengths, 3, 1, 0) != batches_for_epoch(lengths, 3, 1, 1)


def test_dtype_auto_says_why():
    from tunelab.model.loading import choose_dtype

    c = choose_dtype("auto")
    assert c.name in {"bf16", "fp16", "fp32"} and c.reason
    assert choose_dtype("fp32").torch_dtype == torch.float32
    assert math.isfinite(1.0)


def test_fast_dropout_masks_are_unbiased_and_back_propagate_through_the_same_mask():
    from tunelab.train.dropout import FastDropout, keep_mask

    torch.manual_seed(0)
    mask, scale = keep_mask(torch.Size([1000, 4000]), 0.05)
    words = mask.view(-1, 4).float()  # the four 16-bit draws cut from each 64-bit word, position by position
    for column in words.unbind(1):
        assert abs(1 - float(column.mean()) - 0.05) < 5 * (0.05 * 0.95 / column.numel()) ** 0.5
    assert scale == pytest.approx(1 / 0.95, rel=1e-5)
    for p in (2**-16, 0.5, 1 - 2**-15):  # the comparison's edges: the share dropped is the rounded p
        drop = 1 - float(keep_mask(torch.Size([4_000_000]), p)[0].float().mean())
        assert abs(drop - p) < 5 * (p * (1 - p) / 4e6) ** 0.5 + 2**-17
    drop = FastDropout(0.1)
    x = torch.randn(64, 300, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert 0.08 < 1 - float(kept.float().mean()) < 0.12
    assert torch.allclose(y[kept], x.detach()[kept] / 0.9, rtol=1e-4)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad == 0, ~kept) and torch.allclose(x.grad[kept], g[kept] / 0.9, rtol=1e-4)
    torch.manual_seed(1)
    a = drop(x.detach())
    torch.manual_seed(1)
    assert torch.equal(a, drop(x.detach())), "masks come from the seeded global generator"
    drop.eval()
    assert torch.equal(drop(x.detach()), x.detach())
    almost_all = FastDropout(1 - 2**-17)(x.detach())  # p rounds to 1: torch's own dropout, no division by zero
    assert torch.isfinite(almost_all).all()


def test_fast_dropout_keeps_the_earlier_random_stream_with_sfc64_dropout_off(monkeypatch):
    """Runs recorded before sfc64_dropout drew their words from torch's generator with 15-bit levels; with the lever
    off (as `tunelab reproduce` sets it for them) the masks are exactly those."""
    from tunelab.train.dropout import drop_levels, keep_mask

    monkeypatch.setenv("TUNELAB_PERF_OFF", "sfc64_dropout")
    assert drop_levels(0.05) == (1638, 1 << 15)
    torch.manual_seed(3)
    mask, scale = keep_mask(torch.Size([50, 60]), 0.05)
    torch.manual_seed(3)
    words = torch.empty(750, dtype=torch.int64).random_()
    assert torch.equal(mask, (words.view(torch.int16)[:3000].view(50, 60) & 32767) >= 1638)
    assert scale == 32768 / (32768 - 1638)
    monkeypatch.delenv("TUNELAB_PERF_OFF")
    assert drop_levels(0.05) == (3277, 1 << 16)
    torch.manual_seed(3)
    assert not torch.equal(keep_mask(torch.Size([50, 60]), 0.05)[0], mask)


@pytest.mark.parametrize("shape", [(1, 7, 13), (3, 512, 576), (5,)])
def test_dropout_masks_are_kept_as_bits_for_backward(shape):
    from tunelab.train.dropout import pack_mask, unpack_mask

    mask = torch.rand(shape) > 0.3
    bits = pack_mask(mask)
    assert bits.numel() == -(-mask.numel() // 8) and bits.dtype == torch.uint8
    assert torch.equal(unpack_mask(bits, mask.shape), mask)


def test_lora_dropout_is_swapped_for_the_fast_cpu_masks(tiny_model):
    from torch import nn

    from tunelab.train.dropout import FastDropout, install_fast_dropout

    model = apply_method(tiny_model, Config.model_validate({"lora": {"dropout": 0.05}}))
    n_lora = sum(1 for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict))
    assert install_fast_dropout(model) == n_lora > 0
    assert all(type(m) is not nn.Dropout or m.p == 0 for m in model.modules())
    assert sum(isinstance(m, FastDropout) for m in model.modules()) == n_lora


def test_a_decoder_layers_lora_masks_come_from_one_draw(tiny_model):
    """layer_masks: the FastDropouts of one decoder layer share a MaskGroup (one per layer); each member takes its
    own segment, of its input's shape, with its bits; a member taking again starts the next draw; restoring torch's
    generator (what gradient checkpointing does before recomputing a layer) draws the same masks again."""
    from tunelab.train.dropout import FastDropout, install_fast_dropout, pack_mask

    model = apply_method(tiny_model, Config.model_validate({"lora": {"dropout": 0.25}}))
    install_fast_dropout(model)
    fast = [(name, m) for name, m in model.named_modules() if isinstance(m, FastDropout)]
    groups = {id(m.group) for _, m in fast}
    assert len(groups) == tiny_model.config.num_hidden_layers and all(m.group is not None for _, m in fast)
    layer0 = [m for name, m in fast if ".layers.0." in name]
    assert {id(m.group) for m in layer0} == {id(layer0[0].group)} and [m.member for m in layer0] == list(range(7))
    widths = layer0[0].group.widths
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = [m.draw(torch.Size([2, 9, w])) for m, w in zip(layer0, widths)]
    for (mask, bits, scale), w in zip(first, widths):
        assert mask.shape == (2, 9, w) and mask.dtype == torch.bool and scale == 65536 / (65536 - 16384)
        assert torch.equal(bits, pack_mask(mask))
    allmasks = torch.cat([mask.flatten() for mask, _, _ in first])
    assert abs(1 - float(allmasks.float().mean()) - 0.25) < 0.05
    again = layer0[0].draw(torch.Size([2, 9, widths[0]]))[0]  # taken already: the next forward's draw
    assert not torch.equal(again, first[0][0])
    torch.set_rng_state(state)
    redo = [m.draw(torch.Size([2, 9, w]))[0] for m, w in zip(layer0, widths)]
    assert all(torch.equal(a, b[0]) for a, b in zip(redo, first))


def test_layer_masks_off_draws_one_mask_per_call_as_before(tiny_model, monkeypatch):
    from tunelab.train.dropout import FastDropout, install_fast_dropout, keep_mask

    model = apply_method(tiny_model, Config.model_validate({"lora": {"dropout": 0.05}}))
    install_fast_dropout(model)
    drop = next(m for m in model.modules() if isinstance(m, FastDropout))
    monkeypatch.setenv("TUNELAB_PERF_OFF", "layer_masks")
    torch.manual_seed(3)
    mask, _, scale = drop.draw(torch.Size([4, 64]))
    torch.manual_seed(3)
    ref, ref_scale = keep_mask(torch.Size([4, 64]), 0.05)
    assert torch.equal(mask, ref) and scale == ref_scale


@pytest.mark.parametrize("chunk", [3, 1024])
def test_frozen_head_loss_matches_autograd_through_full_logits(tiny_model, tiny_tokenizer, chunk, monkeypatch):
    """The fused frozen-head loss (gradient made in forward) equals plain autograd through all logits."""
    from tunelab.model import loss as loss_mod

    model = apply_method(tiny_model, Config()).eval()  # eval: no dropout, the two passes see the same network
    batch = collate_packed(_examples(tiny_tokenizer))
    fused = CausalLMLoss(model, chunk_size=chunk)
    calls = []
    orig = loss_mod._FrozenHeadCE.apply
    monkeypatch.setattr(loss_mod._FrozenHeadCE, "apply", lambda *a: calls.append(1) or orig(*a))
    s, n = fused(**batch)
    monkeypatch.undo()
    assert calls, "a LoRA model's frozen head takes the fused path"
    (2.5 * s / n).backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(**batch, use_cache=False).logits[:, :-1].float()  # (a cache would disable the packed mask)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    ref = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
    assert float(s.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    (2.5 * ref / n).backward()
    ref_grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == ref_grads.keys()
    for k, g in ref_grads.items():
        assert torch.allclose(got[k], g, rtol=1e-3, atol=1e-5 * float(g.abs().max())), (k, (got[k] - g).abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_frozen_head_loss_under_autocast_matches_the_recomputing_path(tiny_model, tiny_tokenizer, dtype,
                                                                     monkeypatch):
    """Under bf16/fp16 autocast the fused head gives the loss and gradients of the checkpointed path."""
    from tunelab.model import loss as loss_mod

    model = apply_method(tiny_model, Config()).eval()
    batch = collate_packed(_examples(tiny_tokenizer))
    fused_calls = []
    orig = loss_mod._FrozenHeadCE.apply
    monkeypatch.setattr(loss_mod._FrozenHeadCE, "apply", lambda *a: fused_calls.append(1) or orig(*a))
    results = []
    for perf_off in ("", "fused_head"):
        monkeypatch.setenv("TUNELAB_PERF_OFF", perf_off)
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            s, n = CausalLMLoss(model)(**batch)
        (s / n).backward()
        results.append((float(s.detach()), {k: p.grad.clone() for k, p in model.named_parameters()
                                            if p.grad is not None}))
    (fused, g1), (recomputed, g2) = results
    assert len(fused_calls) == 1, "the first pass took the fused path, the second the recomputing one"
    assert fused == pytest.approx(recomputed, rel=1e-3)
    for k, g in g2.items():
        assert torch.allclose(g1[k], g, rtol=0.05, atol=0.02 * float(g.abs().max())), k


def _saved_bytes_and_grads(model, batch) -> tuple[int, float, dict]:
    """Bytes autograd keeps for backward (unique storages, parameters excluded), the loss and every gradient."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    model.zero_grad()
    torch.manual_seed(123)  # the same dropout masks for both models
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        s, n = CausalLMLoss(model)(**batch)
    (s / n).backward()
    return sum(seen.values()), float(s.detach()), {k: p.grad.clone() for k, p in model.named_parameters()
                                                   if p.grad is not None}


def test_gradient_checkpointing_keeps_layer_inputs_only_and_the_same_gradients(tiny_model_dir, tiny_tokenizer):
    """The recipe's model trains in training mode, so transformers really checkpoints its layers (it skipped them
    in eval mode, where from_pretrained leaves a model): far fewer saved bytes, the same loss and gradients."""
    from tunelab.config import load_config
    from tunelab.train.distributed import make_accelerator
    from tunelab.train.recipe import build_model

    batch = collate_packed(_examples(tiny_tokenizer))
    results = []
    for ckpt in ("false", "true"):
        cfg = load_config(None, [f"model.name={tiny_model_dir}", "model.dtype=fp32", "lora.dropout=0.1",
                                 f"training.gradient_checkpointing={ckpt}"])
        model, _ = build_model(cfg, make_accelerator(), lambda *_: None)
        assert all(m.training for m in model.modules())
        results.append(_saved_bytes_and_grads(model, batch))
    (plain, loss, grads), (checkpointed, loss_ckpt, grads_ckpt) = results
    assert checkpointed < plain / 2, (checkpointed, plain)
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert grads_ckpt.keys() == grads.keys()
    for k, g in grads.items():
        assert torch.allclose(grads_ckpt[k], g, rtol=1e-4, atol=1e-6), k


def test_segments_read_records_and_branches_from_positions():
    """Positions restarting at 0 start a record; a jump back to p > 0 starts a branch that continues the first p
    tokens of its record (a preference pair's rejected answer after prompt + chosen)."""
    from tunelab.model.attention import packed_kwargs, segments

    pos = torch.tensor([0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 2, 1, 2])
    assert segments(pos) == [(0, 5, 0, 0), (5, 8, 0, 3), (8, 11, 8, 8), (11, 13, 8, 9)]
    assert segments(torch.tensor([0, 1, 2, 0, 1])) == [(0, 3, 0, 0), (3, 5, 3, 3)]
    kw = packed_kwargs(pos[None], 1)
    assert kw["cu_seq_lens_q"].tolist() == [0, 8, 13] and kw["max_length_q"] == 6  # prefix 3 + branch 3
    with pytest.raises(ValueError, match="continues more tokens"):
        segments(torch.tensor([0, 1, 5, 6]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_layers_keep_less_with_the_same_forward_bits_and_gradients(tiny_model_dir, tiny_tokenizer, dtype):
    """install_lean_layers: the model's outputs bit for bit, the LoRA gradients to rounding, fewer saved bytes
    (each RMSNorm keeps its input in its own dtype, not an fp32 copy; the SwiGLU does not keep silu(gate))."""
    from transformers import AutoModelForCausalLM

    from tunelab.model.lean_layers import install_lean_layers

    batch = collate_packed(_examples(tiny_tokenizer))
    results = []
    for lean in (False, True):
        torch.manual_seed(0)  # the same LoRA A for both
        model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype), Config()).train()
        for n, p in model.named_parameters():  # LoRA B not zero, so every gradient is in play
            if "lora_B" in n:
                torch.manual_seed(1)
                p.data.normal_(0, 0.05)
        if lean:
            layers = model.get_base_model().model.layers
            assert install_lean_layers(model) == 2 * len(layers) + 1 + len(layers)  # 2 norms + MLP per layer, final
        with torch.no_grad():
            logits = model.eval()(**{k: batch[k] for k in ("input_ids", "position_ids")}, use_cache=False).logits
        model.train()
        results.append((logits, *_saved_bytes_and_grads(model, batch)))
    (logits, saved, loss, grads), (lean_logits, lean_saved, lean_loss, lean_grads) = results
    assert torch.equal(lean_logits, logits)  # transformers' forward arithmetic, bit for bit
    assert lean_loss == loss
    assert lean_saved < saved, (lean_saved, saved)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for k, g in grads.items():
        assert torch.allclose(lean_grads[k], g, rtol=tol, atol=tol * float(g.abs().max())), (k, (lean_grads[k] - g).abs().max())


def test_lean_layers_leave_other_formulas_alone():
    """Only modules whose forward is Llama's own get the lean forward (Gemma's norm scales by 1 + weight)."""
    from transformers import GemmaConfig, GemmaForCausalLM

    from tunelab.model.lean_layers import install_lean_layers

    cfg = GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, hidden_act="gelu_pytorch_tanh")
    assert install_lean_layers(GemmaForCausalLM(cfg)) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_rms_norm_and_swiglu_equal_transformers_with_trained_weights(dtype):
    """The lean norm against LlamaRMSNorm with its weight trained (method=full): output bit for bit, gradients of
    input and weight to rounding; the lean SwiGLU against silu(gate) * up bit for bit."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from tunelab.model.lean_layers import _norm_forward, _SiluMul

    torch.manual_seed(0)
    norm = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    norm.weight.data.uniform_(0.5, 1.5)
    x = (torch.randn(2, 7, 48) * 3).to(dtype).requires_grad_()
    grad = torch.randn(2, 7, 48).to(dtype)
    outs = []
    for forward in (norm.forward, lambda h: _norm_forward(norm, h)):
        norm.zero_grad()
        x.grad = None
        y = forward(x)
        y.backward(grad)
        outs.append((y.detach(), x.grad.clone(), norm.weight.grad.clone()))
    (y0, gx0, gw0), (y1, gx1, gw1) = outs
    assert torch.equal(y1, y0)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(gx1.float(), gx0.float(), rtol=tol, atol=tol * float(gx0.abs().max()))
    assert torch.allclose(gw1.float(), gw0.float(), rtol=tol, atol=tol * float(gw0.abs().max()))
    gate, up = (torch.randn(5, 32).to(dtype).requires_grad_() for _ in range(2))
    plain = torch.nn.functional.silu(gate) * up
    g_plain = torch.autograd.grad(plain, (gate, up), grad[0, :5, :32])
    lean = _SiluMul.apply(gate, up)
    g_lean = torch.autograd.grad(lean, (gate, up), grad[0, :5, :32])
    assert torch.equal(lean, plain) and all(torch.equal(a, b) for a, b in zip(g_lean, g_plain))


def test_lora_inputs_stay_bf16_under_autocast_with_the_same_bits(tiny_model_dir, tiny_tokenizer):
    """install_autocast_lora_inputs drops peft's fp32 round trip of each LoRA input under bf16 autocast: the same
    loss and gradients bit for bit (dropout on), and peft's cast still happens outside autocast."""
    from transformers import AutoModelForCausalLM

    from tunelab.model.lean_layers import install_autocast_lora_inputs
    from tunelab.train.dropout import install_fast_dropout

    batch = collate_packed(_examples(tiny_tokenizer))
    results = []
    for lean in (False, True):
        torch.manual_seed(0)
        cfg = Config()
        cfg.lora.dropout = 0.1
        model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16), cfg).train()
        install_fast_dropout(model)
        if lean:
            assert install_autocast_lora_inputs(model) == 7 * len(model.get_base_model().model.layers)
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s, n = CausalLMLoss(model)(**batch)
        s.backward()
        results.append((s.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys()
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in results[0][1])
    layer = next(m for m in model.modules() if hasattr(m, "lora_A"))
    x = torch.ones(2, 3, dtype=torch.bfloat16)
    assert layer._cast_input_dtype(x, torch.float32).dtype == torch.float32  # no autocast: peft's cast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._cast_input_dtype(x, torch.float32) is x


def test_heads_that_scale_logits_use_the_models_own_head():
    """Granite divides its logits by `logits_scaling`: the chunked loss must not skip that (it goes through the
    model's own head, as for soft-capping), and a shared-prompt row is refused for such a model."""
    from transformers import GraniteConfig, GraniteForCausalLM

    from tunelab.model.loss import sequence_logps
    from tunelab.train.preference_loss import collate_pairs

    torch.manual_seed(0)
    cfg = GraniteConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, logits_scaling=4.0)
    model = GraniteForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 9))
    labels = ids.clone()
    s, n = CausalLMLoss(model)(input_ids=ids, labels=labels)
    logits = model(input_ids=ids).logits[0, :-1].float()
    ref = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
    assert float(s) == pytest.approx(float(ref), rel=1e-5) and int(n) == 8
    pair = collate_pairs([{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6, 7]}], share_prompt=True)
    with pytest.raises(ValueError, match="shares prompts"):
        sequence_logps(model, pair["input_ids"], pair["groups"], 2, pair["position_ids"])


# ---------------------------------------------------------------- the run's data (train/inputs.py)


def _cfg(**data):
    return Config.model_validate({"data": data})


def test_records_rejected_at_encode_are_listed_whatever_their_file_name(tiny_tokenizer, tmp_path):
    """A record from caf\\xe9.jsonl (a name that is not UTF-8) that training could not encode crashed the listing
    of rejected_at_encode with UnicodeEncodeError."""
    import json
    import os

    from tunelab.train.inputs import _encode

    source = os.fsdecode(b"caf" + bytes([0xE9]) + b".jsonl")
    long = {"messages": [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "a"}],
            "source": source, "location": "line 1"}
    said = []
    assert _encode(_cfg(max_length=16), tiny_tokenizer, [long], "train", tmp_path, True, said.append) == []
    listed = [json.loads(x) for x in (tmp_path / "rejected_at_encode.train.jsonl").read_text().splitlines()]
    assert [(r["source"], r["location"]) for r in listed] == [(source, "line 1")]
    assert "1 train records could not be trained" in said[0]


STRICT = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant', 'system'] %}"
          "{{ raise_exception('Only user, assistant and system roles are supported!') }}{% endif %}"
          "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def strict_tokenizer(tiny_tokenizer):
    """The tiny tokenizer with a chat template that refuses tool turns (jinja's raise_exception)."""
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = STRICT
    return tok


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_a_record_the_chat_template_refuses_at_training_is_set_aside_with_its_reason(strict_tokenizer, tmp_path,
                                                                                      stage):
    """A prepared folder trained with model.chat_template that raises for a record (a tool turn; content 5, a
    TypeError) ended training with jinja2's TemplateError traceback: such records are set aside like any record
    training cannot encode, listed with their location and reason."""
    import json

    from tunelab.train.inputs import _encode

    user, answer = {"role": "user", "content": "weather?"}, {"role": "assistant", "content": "sunny"}
    tool = [user, {"role": "assistant", "content": "call"}, {"role": "tool", "content": "r"}]
    if stage == "sft":
        recs = [{"messages": [user, answer]}, {"messages": tool + [answer]},
                {"messages": [user, {**answer, "content": 5}]}]
    else:
        recs = [{"prompt": [user], "chosen": [answer], "rejected": [{**answer, "content": "no"}]},
                {"prompt": tool, "chosen": [answer], "rejected": [{**answer, "content": "no"}]},
                {"prompt": [{**user, "content": 5}], "chosen": [answer], "rejected": [{**answer, "content": "no"}]}]
    recs = [{**r, "source": "d.jsonl", "location": f"line {i}"} for i, r in enumerate(recs, 1)]
    cfg = Config.model_validate({"training": {"stage": stage}})
    said = []
    out = _encode(cfg, strict_tokenizer, recs, "train", tmp_path, True, said.append)
    assert [e["where"] for e in out] == ["d.jsonl:line 1"]
    listed = [json.loads(x) for x in (tmp_path / "rejected_at_encode.train.jsonl").read_text().splitlines()]
    assert [r["location"] for r in listed] == ["line 2", "line 3"]
    assert "the chat template cannot render this record: Only user, assistant" in listed[0]["reason"]
    assert "2 train records could not be trained" in said[0]


def _alpaca_file(path, n, tag=""):
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"instruction": f"q{tag}{i}", "output": f"a{tag}{i}"}) + "\n" for i in range(n)))
    return path


def test_a_raw_folder_in_the_hugging_face_layout_is_raw_data_not_a_prepared_folder(tiny_tokenizer, tmp_path):
    """data.train=<folder holding train.jsonl and test.jsonl> (raw, the Hugging Face layout), which validate
    accepts, was refused by train as "not a prepared dataset": a prepared folder is told by its own report.json."""
    from tunelab.data.prepare import prepare_dataset
    from tunelab.train.inputs import load_data

    raw = _alpaca_file(tmp_path / "hf" / "train.jsonl", 6).parent
    _alpaca_file(raw / "test.jsonl", 2, "t")
    (tmp_path / "run").mkdir()
    enc = load_data(_cfg(train=str(raw)), tiny_tokenizer, tmp_path / "run", True, True, say=lambda *_: None)
    assert enc.data_info["folder"] == str(tmp_path / "run" / "data") and len(enc.train) + len(enc.val) == 8
    prepare_dataset(str(raw), tmp_path / "prepared", console=lambda *_: None)  # a prepared folder is still one
    (tmp_path / "run2").mkdir()
    enc = load_data(_cfg(train=str(tmp_path / "prepared")), tiny_tokenizer, tmp_path / "run2", True, True)
    assert enc.data_info["folder"] == str(tmp_path / "prepared")


def test_a_prepared_folder_whose_raw_file_changed_since_is_refused(tiny_tokenizer, tmp_path):
    """data.train=<prepared folder> trained on the records of the old raw file after it was edited, without a word:
    report.json now records each source's size, mtime and sha256, and training compares them (a touch is no
    change; a file that is gone is none either: the folder stands on its own)."""
    import os

    from tunelab.data.prepare import prepare_dataset
    from tunelab.errors import TunelabError
    from tunelab.train.inputs import load_data

    raw = _alpaca_file(tmp_path / "raw.jsonl", 4)
    prepare_dataset(str(raw), tmp_path / "prepared", console=lambda *_: None)
    cfg = _cfg(train=str(tmp_path / "prepared"))
    for n in range(3):
        (tmp_path / f"run{n}").mkdir()
    os.utime(raw, ns=(0, 0))  # touched: the same bytes
    load_data(cfg, tiny_tokenizer, tmp_path / "run0", True, True)
    _alpaca_file(raw, 5)
    with pytest.raises(TunelabError, match=f"prepared from files that have changed since: {raw} \\(sha256"):
        load_data(cfg, tiny_tokenizer, tmp_path / "run1", True, True)
    load_data(cfg, tiny_tokenizer, tmp_path / "run2", True, False)  # a resumed run compares fingerprints instead


def test_a_prepared_folder_with_other_data_settings_than_the_config_is_refused(tiny_tokenizer, tmp_path):
    """Prepared with --system-prompt 'You are X.', trained with data.system_prompt='You are Y.': training used X
    while the run's config.yaml said Y. The settings prepare applies are compared with the config's (a default
    asks for nothing; a system prompt the folder lacks is added by training, as prepare would)."""
    from tunelab.data.prepare import prepare_dataset
    from tunelab.errors import TunelabError
    from tunelab.train.inputs import load_data

    raw = _alpaca_file(tmp_path / "raw.jsonl", 4)
    for name, system in (("x", "You are X."), ("none", None)):
        prepare_dataset(str(raw), tmp_path / name, system_prompt=system, console=lambda *_: None)

    def load(folder, **data):
        run = tmp_path / "runs" / f"{folder}-{len(data)}-{data.get('system_prompt')}"
        run.mkdir(parents=True)
        return load_data(_cfg(train=str(tmp_path / folder), **data), tiny_tokenizer, run, True, True)

    with pytest.raises(TunelabError, match=r"prepared with --system-prompt 'You are X.', this run asks for "
                                           r"data.system_prompt='You are Y.'.*tunelab prepare --stage sft "
                                           r"--system-prompt 'You are Y.'"):
        load("x", system_prompt="You are Y.")
    with pytest.raises(TunelabError, match=r"prepared with --map '', this run asks for data.map=instruction=q"):
        load("x", map={"instruction": "q"})
    assert load("x").train and load("x", system_prompt="You are X.").train
    assert load("none", system_prompt="You are Y.").val_records[0]["messages"][0]["content"] == "You are Y."
