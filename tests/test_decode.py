"""The shared decode step (tunelab.decode): same answers as transformers' generate, same logits as its forward."""

from __future__ import annotations

import pytest

PROMPTS = ["Hi", "What is the capital of France? Answer briefly, please.", "Tell me a story about a dragon",
           "2+2?", "Name three colours"]


@pytest.fixture(scope="module")
def tiny(model_dir):
    from tunelab.infer import load

    return load(str(model_dir), dtype="fp32")


def _hf_generate(model, tok, convo, max_new_tokens):
    """The path `tunelab infer` used before: transformers' generate, greedy, one prompt."""
    import torch

    from tunelab.data.template import render
    from tunelab.model.stop_tokens import stop_token_ids

    ids = torch.tensor([tok(render(tok, convo, add_generation_prompt=True), add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stop_token_ids(tok), pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.parametrize("batch_size", [1, 16])
def test_greedy_answers_equal_transformers_generate(tiny, batch_size):
    from tunelab.infer import as_conversation, generate

    model, tok = tiny
    convos = [as_conversation(p) for p in PROMPTS]
    ours = generate(model, tok, convos, max_new_tokens=24, batch_size=batch_size)
    assert ours == [_hf_generate(model, tok, c, 24) for c in convos]
    assert len(set(ours)) > 1


def _prefill(model, prompts, headroom):
    """Left-padded prefill of token lists with the model's forward; returns (kv, mask, next token ids)."""
    import torch
    from transformers import DynamicCache

    from tunelab.decode import KVCache

    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), cache=cache,
                use_cache=True)
    return KVCache.from_cache(cache, headroom=headroom), mask, out.logits[:, -1].argmax(-1)


def _paired_steps(model, step_a, step_b, prompts, steps, headroom):
    """Prefill `prompts` twice, then feed both decode steps the same tokens (step_a's greedy picks) `steps` times.

    Returns the [(logits_a, logits_b)] of every step and both caches."""
    import torch

    with torch.inference_mode():
        kv_a, mask, token = _prefill(model, prompts, headroom=headroom)
        kv_b, _, _ = _prefill(model, prompts, headroom=headroom)
        lengths = torch.tensor([len(p) for p in prompts])
        pairs = []
        for _ in range(steps):
            mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
            a = step_a(kv_a, token[:, None], lengths[:, None], mask)
            pairs.append((a, step_b(kv_b, token[:, None], lengths[:, None], mask)))
            token, lengths = a.argmax(-1), lengths + 1
    assert kv_a.length == kv_b.length == mask.shape[1]
    return pairs, kv_a, kv_b


def test_fast_step_equals_the_model_forward_with_padding_and_growing_cache(tiny):
    """Rows of different lengths (left padding), a cache that must grow twice: the lean Llama step and the model's
    own forward give the same logits at every step (fp32)."""
    import functools

    import torch

    from tunelab.decode import _llama_step, _model_step, decode_step_for

    model, _ = tiny
    fast = decode_step_for(model)
    assert fast.func is _llama_step  # the lean path was chosen for this Llama
    pairs, kv, _ = _paired_steps(model, fast, functools.partial(_model_step, model),
                                 [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]], steps=6, headroom=1)
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert kv.capacity >= kv.length


def test_dropping_rows_and_padding_columns_keeps_the_rest_unchanged(tiny):
    import torch

    from tunelab.decode import decode_step_for

    model, _ = tiny
    step = decode_step_for(model)
    with torch.inference_mode():
        kv, mask, token = _prefill(model, [[5, 6, 7, 8, 9, 10, 11], [12, 13]], headroom=8)
        alone, mask1, token1 = _prefill(model, [[12, 13]], headroom=8)
        kv.select([1], first=5)  # the long row leaves: its five columns of padding in row 1 go too
        mask = mask[1:, 5:]
        assert torch.equal(mask, mask1) and kv.length == alone.length == 2
        pos = torch.tensor([[2]])
        a = step(kv, token[1:, None], pos, torch.cat([mask, mask.new_ones(1, 1)], 1))
        b = step(alone, token1[:, None], pos, torch.cat([mask1, mask1.new_ones(1, 1)], 1))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_stacked_packed_linears_are_bit_identical(dtype):
    """q/k/v (and gate/up) as one prepacked bf16 product give exactly what the three modules give."""
    import torch

    from tunelab.decode import _fast_linears

    torch.manual_seed(0)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    mods = [torch.nn.Linear(576, n, bias=b).to(dt) for n, b in ((576, False), (192, True), (192, False))]
    x = torch.randn(3, 1, 576, dtype=dt)
    with torch.inference_mode():
        got = _fast_linears(*mods)(x).split([m.out_features for m in mods], dim=-1)
        for got, want in zip(got, (m(x) for m in mods)):
            assert torch.equal(got, want)


def test_weights_changed_in_place_are_seen_by_the_next_decode(model_dir):
    """Generation metrics during full fine-tuning: the optimiser changes weights between two generate calls."""
    import torch

    from tunelab.infer import as_conversation, generate, load

    def change(model):
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.down_proj.weight.mul_(-3.0)

    model, tok = load(str(model_dir), dtype="bf16")
    convo = [as_conversation("Tell me a story about a dragon")]
    before = generate(model, tok, convo, max_new_tokens=12)
    change(model)
    after = generate(model, tok, convo, max_new_tokens=12)
    fresh, _ = load(str(model_dir), dtype="bf16")
    change(fresh)
    assert after == generate(fresh, tok, convo, max_new_tokens=12) != before


@pytest.mark.parametrize("prompts", [[[5, 6, 7, 8, 9, 10, 11]], [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]])
def test_bf16_step_is_bit_identical_to_the_model_forward(model_dir, prompts):
    """The fused calls of the lean step (q and k rotated together, rms_norm, in-place residuals) round as
    transformers' separate operations do: in bf16 its logits equal the model's own forward bit for bit."""
    import functools

    import torch

    from tunelab.decode import _llama_step, _model_step, decode_step_for
    from tunelab.infer import load

    model, _ = load(str(model_dir), dtype="bf16")
    step = decode_step_for(model)
    assert step.func is _llama_step  # a batching caller: the oneDNN products, whose rows do not depend on each other
    pairs, _, _ = _paired_steps(model, step, functools.partial(_model_step, model), prompts, steps=5, headroom=2)
    for a, b in pairs:
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)


def test_one_row_bf16_step_is_the_model_forward_with_torchs_own_kernel(model_dir):
    """A single stream (max_rows=1) multiplies with torch's matrix-vector kernel, oneDNN switched off for the step:
    bit for bit the model's own forward run with that kernel, within rounding of the oneDNN step, oneDNN back on
    afterwards; given two rows it refuses."""
    import functools

    import torch

    from tunelab.decode import _model_step, _native_products, _native_step, decode_step_for
    from tunelab.infer import load

    def model_forward_native(*args):
        with _native_products():
            return _model_step(model, *args)

    model, _ = load(str(model_dir), dtype="bf16")
    one_row = decode_step_for(model, max_rows=1)
    if not torch.backends.mkldnn.is_available():
        pytest.skip("a torch without oneDNN multiplies with its own kernel anyway")
    assert one_row.func is _native_step
    prompt = [[5, 6, 7, 8, 9, 10, 11]]
    pairs, _, _ = _paired_steps(model, one_row, model_forward_native, prompt, steps=5, headroom=2)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert torch.backends.mkldnn.enabled
    onednn, _, _ = _paired_steps(model, one_row, decode_step_for(model), prompt, steps=5, headroom=2)
    for a, b in onednn:
        torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.02 * float(b.float().abs().max()))
    with pytest.raises(ValueError, match="one row"), torch.inference_mode():
        kv, mask, token = _prefill(model, [[5, 6], [7, 8]], headroom=2)
        one_row(kv, token[:, None], torch.tensor([[2], [2]]), torch.cat([mask, mask.new_ones(2, 1)], 1))
    assert torch.backends.mkldnn.enabled


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_int8_weights_give_logits_close_to_the_models(model_dir, dtype):
    """weights="int8" (opt-in): each step's logits stay close to those of the model's own weights and mostly
    pick the same next token, over the same tokens (teacher-forced)."""
    import torch

    from tunelab.decode import decode_step_for, set_decode_weights
    from tunelab.infer import load

    model, _ = load(str(model_dir), dtype=dtype)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 40, 41], [14, 15, 16, 17, 300, 301, 302, 303]]
    set_decode_weights(model, "int8")
    int8 = decode_step_for(model)
    set_decode_weights(model, "model")
    own = decode_step_for(model)
    pairs, _, _ = _paired_steps(model, own, int8, prompts, steps=12, headroom=16)
    for a, b in ((a.float(), b.float()) for a, b in pairs):
        assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99
        assert (a - b).abs().max() < 0.1 * a.abs().max()
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in pairs)
    assert agree >= 0.75 * len(pairs) * len(prompts)


def test_int8_answers_mostly_agree_and_model_weights_come_back(tiny):
    from tunelab.errors import TunelabError
    from tunelab.infer import as_conversation, generate

    model, tok = tiny
    convos = [as_conversation(p) for p in PROMPTS]
    own = generate(model, tok, convos, max_new_tokens=16)
    int8 = generate(model, tok, convos, max_new_tokens=16, weights="int8")
    # a random tiny model has many near-ties, so answers drift apart sooner than a trained model's do
    # (bench/README.md measures the bundled model); most still start alike
    assert sum(a.split()[:3] == b.split()[:3] for a, b in zip(own, int8)) >= 3
    assert generate(model, tok, convos, max_new_tokens=16, weights="model") == own
    with pytest.raises(TunelabError, match="int8"):
        generate(model, tok, convos, weights="int4")
