"""Packed (padding-free) attention on SDPA, one causal attention per record.

A packed row holds several records back to back with `position_ids` restarting at 0 for each. transformers'
`sdpa` then builds a block-diagonal (L x L) mask and the kernel computes every score of the row, (sum of lengths)^2,
although only the blocks on the diagonal are used; a mask also stops SDPA from using its causal fast path. Here
each record is attended to separately with `is_causal=True`: sum(length^2) / 2 scores, the same result (the mask
is still built, once per forward, for the fallback; it is not used). On this
project's 2-core CPU that was ~16% of a LoRA step for 4 Alpaca records per row (see docs/perf-notes.md).

The record boundaries reach the attention function as `cu_seq_lens_q` (the keyword flash_attention_2 also reads,
so the same call is padding-free there too). Without them (padded batches, evaluation, generation with a cache)
the function is transformers' own SDPA path, so setting it on a model changes nothing else.

Branches (preference pairs with their prompt once): where a row's positions jump back to a value p > 0, the
tokens from there on continue the first p tokens of the current record instead of the tokens just before them:

    tokens     P0 P1 P2 | C3 C4 | R3 R4 R5        one prompt, then the chosen answer, then the rejected one
    positions   0  1  2 |  3  4 |  3  4  5        R attends to P and itself; C to P and itself, never to R

Each branch is attended to as its own causal record over [prefix; branch] (the prefix's queries are computed
again and dropped), so its outputs equal those of the standalone record P + R, and P's keys and values are made
once for both answers. Only this attention function knows branches (`branches_supported`): transformers' own
masks would read a branch as a new record without its prefix.

bf16 training on CPU (`bmm_attention`): a record of at most BMM_MAX_LENGTH tokens is attended to with batched
bf16 products and an fp32-normalised softmax (`CausalAttention`) instead of SDPA's CPU flash kernel, whose bf16
backward ran at ~60 GFLOP/s here against ~390 for the products. Forward + backward of one record was 2-3x
faster at 64-256 tokens and 1.5-2x at 384-512 (bench/kernels.py, docs/perf-notes.md sections 10-11); from ~640
tokens on the flash kernel is faster. It keeps only q, k and v for backward and computes the probabilities again
there (no [heads, L, L] tensor is kept; the causal bias of a record length is made once per forward and shared by
the layers); the scores are rounded to bf16 once, as transformers' eager attention rounds them, so results equal
SDPA's within bf16 rounding (fp32: within 1e-5; tests/test_train_units.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "tunelab_packed_sdpa"
_registered = False


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    special = any(kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux", "position_bias"))
    if cu is None or special or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    segments = getattr(cu, "tunelab_segments", None)  # a list made once per forward (no device sync)
    if segments is None:
        bounds = cu.tolist()
        segments = [(s, e, s, s) for s, e in zip(bounds[:-1], bounds[1:])]
    gqa = query.shape[1] != key.shape[1]
    bmm = _bmm_attention(query, dropout) and query.shape[1] % key.shape[1] == 0
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5

    def part(x, s, e, ps, pe):
        return x[:, :, s:e] if ps == pe else torch.cat((x[:, :, ps:pe], x[:, :, s:e]), dim=2)

    # one causal bias per record length and forward, made in the first layer and shared by all (backward keeps
    # it once, not once per layer: 30 x 1.1 MB for a 436-token record of SmolLM2)
    biases = getattr(cu, "tunelab_biases", None)
    if biases is None:
        biases = cu.tunelab_biases = {}
    outs = []
    for s, e, ps, pe in segments:
        if e > s and bmm and ps == pe and e - s <= BMM_MAX_LENGTH:
            key_ = (e - s, query.shape[1], key.shape[1], query.dtype)
            if key_ not in biases:
                biases[key_] = causal_bias(e - s, query.shape[1] // key.shape[1], key.shape[1], query.dtype,
                                           query.device)
            outs.append(CausalAttention.apply(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], biases[key_],
                                              scale))
        elif e > s:
            out = F.scaled_dot_product_attention(part(query, s, e, ps, pe), part(key, s, e, ps, pe),
                                                 part(value, s, e, ps, pe), dropout_p=dropout, scale=scaling,
                                                 is_causal=True, enable_gqa=gqa)
            outs.append(out[:, :, pe - ps:] if pe > ps else out)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), None


class CausalAttention(torch.autograd.Function):
    """Causal self-attention of one record: q [1, H, L, d], k and v [1, KV, L, d] (H a multiple of KV, query head
    h reading key/value head h // (H / KV) as SDPA's enable_gqa does) -> [1, H, L, d]. `bias`: `causal_bias`.

    The query heads of one key/value head are stacked into one product ([KV, H/KV * L, d] x [KV, d, L]), so keys
    and values are never repeated; the scale and the causal mask (an additive bias) are applied inside that
    product (baddbmm), and the softmax normalises in fp32 and rounds the probabilities once to the compute dtype,
    as transformers' eager attention does. Backward recomputes the same probabilities (the same calls, the same
    bits) instead of keeping a [heads, L, L] tensor per record and layer."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale: float):
        kv_heads, length, dim = k.shape[1], k.shape[2], k.shape[3]
        qg = q.reshape(kv_heads, -1, dim)
        kk, vv = k.reshape(kv_heads, length, dim), v.reshape(kv_heads, length, dim)
        out = torch.bmm(_probabilities(qg, kk, bias, scale), vv)
        ctx.save_for_backward(qg, kk, vv, bias)
        ctx.scale = scale
        return out.view(q.shape)

    @staticmethod
    def backward(ctx, grad):
        qg, kk, vv, bias = ctx.saved_tensors
        scale = ctx.scale
        g = grad.reshape(qg.shape).to(qg.dtype)
        p = _probabilities(qg, kk, bias, scale)
        grad_v = torch.bmm(p.transpose(1, 2), g)
        # d loss / d scores = P * (dP - sum_j P_ij dP_ij): softmax's own backward kernel, one pass (0 where masked)
        ds = torch._softmax_backward_data(torch.bmm(g, vv.transpose(1, 2)), p, -1, p.dtype)
        grad_q = torch.baddbmm(torch.empty_like(qg), ds, kk, beta=0, alpha=scale)
        grad_k = torch.baddbmm(torch.empty_like(kk), ds.transpose(1, 2), qg, beta=0, alpha=scale)
        return (grad_q.view(grad.shape), grad_k.view(1, *kk.shape), grad_v.view(1, *vv.shape), None, None)


def causal_bias(length: int, groups: int, kv_heads: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[KV, groups * L, L] (expanded over KV): 0 where query i may see key j (j <= i), -inf above the diagonal."""
    bias = torch.full((length, length), float("-inf"), dtype=dtype, device=device).triu_(1)
    return bias.repeat(groups, 1).expand(kv_heads, groups * length, length)


def _probabilities(qg: torch.Tensor, kk: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * q k^T + bias) normalised in fp32, in q's dtype: [KV, G * L, L]."""
    return torch.softmax(torch.baddbmm(bias, qg, kk.transpose(1, 2), alpha=scale), dim=-1)


BMM_MAX_LENGTH = 512  # longer records keep SDPA: from ~640 tokens the flash kernel was faster (docs/perf-notes.md)


def _bmm_attention(query: torch.Tensor, dropout: float) -> bool:
    """Whether records are attended to with CausalAttention: bf16 on CPU with gradients (training; evaluation keeps
    SDPA), no attention dropout, lever on."""
    from tunelab.runtime import lever_enabled

    return (query.device.type == "cpu" and query.dtype == torch.bfloat16 and not dropout
            and query.requires_grad and lever_enabled("bmm_attention"))


def register() -> None:
    """Make NAME a transformers attention implementation (with SDPA's masks for unpacked inputs)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


# Decoders whose attention is plain causal self-attention (no sliding window in effect, no logit soft-capping,
# no attention sinks): for them per-record causal SDPA is exactly what the block-diagonal mask computes.
_PLAIN_CAUSAL = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "granite", "olmo", "olmo2", "stablelm",
                 "starcoder2", "internlm2", "yi"}


def _plain_causal(config) -> bool:
    if getattr(config, "model_type", None) not in _PLAIN_CAUSAL:
        return False
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        return False
    window = getattr(config, "sliding_window", None)
    return not window or getattr(config, "use_sliding_window", True) is False


def use_packed_attention(model) -> bool:
    """Switch a model that uses SDPA to per-record packed attention; False (unchanged) for any other model or
    attention implementation."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa" or not _plain_causal(config):
        return False
    register()
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME


def branches_supported(model) -> bool:
    """Whether `model` (or the model inside a peft wrapper) attends with this module's function, which alone
    reads branches correctly (see the module docstring)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(inner, "config", None), "_attn_implementation", None) == NAME


def segments(position_ids: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(start, end, prefix start, prefix end) per record or branch of one packed row's positions [L].

    A record starts where the position is 0; a branch where it jumps to p > 0 other than by +1, with the first p
    tokens of its record as prefix (empty for records)."""
    breaks = [0] + (torch.nonzero(position_ids[1:] != position_ids[:-1] + 1).flatten() + 1).tolist()
    ends = breaks[1:] + [position_ids.numel()]
    out, record = [], 0
    for start, end, p in zip(breaks, ends, position_ids[breaks].tolist()):
        if p == 0:
            record = start
        elif record + p > start:
            raise ValueError(f"position {p} at token {start} continues more tokens than its record has")
        out.append((start, end, record, record + p))
    return out


def packed_kwargs(position_ids: torch.Tensor | None, batch_size: int) -> dict:
    """Record boundaries of one packed row (position_ids restart at 0 per record) as flash-attention keywords;
    the records and branches (`segments`) for packed_sdpa_forward on the boundary tensor."""
    if position_ids is None or batch_size != 1:
        return {}
    pos = position_ids[0]
    starts = torch.nonzero(pos == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        return {}
    cu = torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int32)
    cu.tunelab_segments = segments(pos)  # read by packed_sdpa_forward in every layer without another device sync
    longest = max(e - s + pe - ps for s, e, ps, pe in cu.tunelab_segments)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
