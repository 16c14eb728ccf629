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
    bounds = getattr(cu, "tunelab_bounds", None) or cu.tolist()  # a list made once per forward (no device sync)
    gqa = query.shape[1] != key.shape[1]
    outs = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout,
                                           scale=scaling, is_causal=True, enable_gqa=gqa)
            for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), None


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


def packed_kwargs(position_ids: torch.Tensor | None, batch_size: int) -> dict:
    """Record boundaries of one packed row (position_ids restart at 0 per record) as flash-attention keywords."""
    if position_ids is None or batch_size != 1:
        return {}
    pos = position_ids[0]
    starts = torch.nonzero(pos == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        return {}
    cu = torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int32)
    bounds = cu.tolist()
    cu.tunelab_bounds = bounds  # read by packed_sdpa_forward in every layer without another device sync
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
