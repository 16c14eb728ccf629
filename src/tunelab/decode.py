"""The decode step shared by `tunelab infer` and `tunelab serve`: a preallocated KV cache and one lean forward.

    kv = KVCache.from_cache(prefill_cache, rows=1)          # after a prefill forward with a DynamicCache
    step = decode_step_for(model)                           # the fast step, or the model's own forward
    logits = step(kv, ids, positions, mask)                 # ids/positions [rows, 1], mask [rows, kv.length + 1]

Why: at batch 1 a 135M model spends most of each token in Python and small-tensor overhead, not in matmuls
(the weights are ~270 MB in bf16, ~15 ms of memory traffic; transformers' forward took ~55 ms a token). Two
things remove most of it:

- The cache is written in place into buffers with headroom (`KVCache`), so a step does not re-allocate and copy
  every layer's keys and values (`torch.cat` in DynamicCache) — 60 copies of the whole cache per token.
- For Llama-shaped models (Llama, SmolLM, Qwen2, Mistral without a sliding window) the step calls the model's own
  modules (projections, norms, MLP, rotary embedding; LoRA wrappers included) in the same order as transformers'
  forward, but skips its per-call machinery: mask building, kwargs decorators, output dataclasses, cache
  bookkeeping. In fp32 the logits equal transformers' to rounding and greedy answers are identical
  (tests/test_decode.py). Other architectures get the model's own forward over the same cache.

The prefill (a whole prompt, or a batch of left-padded prompts) stays with the model's forward and a DynamicCache:
it runs once per request, and its cache is then copied into a KVCache.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

HEADROOM = 256  # columns allocated past the current length; growing doubles, so growth is rare


class KVCache:
    """Per-layer keys and values, [rows, kv heads, capacity, head dim]; columns [0, length) are filled.

    Rows are right-aligned (left padding), as in the serve engine: column `length - 1` is every row's last token.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int):
        self.keys, self.values, self.length = keys, values, length

    @classmethod
    def from_cache(cls, cache, headroom: int = HEADROOM) -> KVCache:
        """Copy a transformers cache (DynamicCache after a prefill) into buffers with `headroom` free columns."""
        keys, values = [], []
        length = cache.layers[0].keys.shape[2]
        for layer in cache.layers:
            for src, out in ((layer.keys, keys), (layer.values, values)):
                b, h, _, d = src.shape
                buf = src.new_empty(b, h, length + headroom, d)
                buf[:, :, :length] = src
                out.append(buf)
        return cls(keys, values, length)

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, columns: int) -> None:
        """Make room for `columns` more columns (doubling the capacity when it runs out)."""
        if self.length + columns <= self.capacity:
            return
        size = max(2 * self.capacity, self.length + columns)
        for bufs in (self.keys, self.values):
            for i, old in enumerate(bufs):
                new = old.new_empty(old.shape[0], old.shape[1], size, old.shape[3])
                new[:, :, :self.length] = old[:, :, :self.length]
                bufs[i] = new

    def select(self, index: list[int], first: int = 0) -> None:
        """Keep rows `index` and columns [first, length): rows that left and padding no row needs any more."""
        rows = None if len(index) == self.rows else torch.tensor(index, device=self.keys[0].device)
        for bufs in (self.keys, self.values):
            for i, buf in enumerate(bufs):
                if rows is not None:
                    buf = buf.index_select(0, rows)
                if first:
                    kept = buf[:, :, first:self.length].clone()
                    buf[:, :, :self.length - first] = kept
                bufs[i] = buf
        self.length -= first

    def join(self, other: KVCache) -> None:
        """Append `other`'s rows; the shorter of the two is left-padded so that both end at the same column."""
        length = max(self.length, other.length)
        capacity = max(self.capacity, other.capacity, length + HEADROOM)
        for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
            for i, (a, b) in enumerate(zip(mine, theirs)):
                buf = a.new_zeros(a.shape[0] + b.shape[0], a.shape[1], capacity, a.shape[3])
                buf[:a.shape[0], :, length - self.length:length] = a[:, :, :self.length]
                buf[a.shape[0]:, :, length - other.length:length] = b[:, :, :other.length]
                mine[i] = buf
        self.length = length


def _packable(module) -> bool:
    w = getattr(module, "weight", None)
    return (type(module) is torch.nn.Linear and w is not None and w.dtype == torch.bfloat16
            and w.device.type == "cpu" and torch.backends.mkldnn.is_available())


def _fast_linears(*modules) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    """x -> (module(x) for each module), for modules that read the same input (q/k/v; gate/up).

    For plain bf16 nn.Linear modules on CPU: one product with their weights stacked and prepacked in oneDNN's
    blocked layout, which makes a one-token bf16 product 1.5-2.5x faster on AVX512-BF16 CPUs (one call instead of
    three or two), with bit-identical results (each output is the same dot product; tests/test_decode.py). fp32
    gains little and rounds differently, so it is left alone, as are LoRA-wrapped projections (their base weight
    is inside the wrapper and the adapter may be switched off). The packed copy costs the weights' size once more.
    """
    if all(_packable(m) for m in modules):
        try:
            w = torch.cat([m.weight.detach() for m in modules])
            biases = [m.bias for m in modules]
            bias = None if all(b is None for b in biases) else torch.cat(
                [b.detach() if b is not None else w.new_zeros(m.out_features) for m, b in zip(modules, biases)])
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
            op = torch.ops.mkldnn._linear_pointwise
            op(torch.zeros(1, w.shape[1], dtype=w.dtype), packed, bias, "none", [], "")  # fails here, not mid-answer
            sizes = [m.out_features for m in modules]
            return lambda x: op(x, packed, bias, "none", [], "").split(sizes, dim=-1)
        except (RuntimeError, AttributeError):  # a torch built without oneDNN's packed linear
            pass
    return lambda x: tuple(m(x) for m in modules)


class _Parts:
    """The modules of a Llama-shaped causal LM, found once (through a PEFT wrapper if there is one)."""

    def __init__(self, model):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.embed = inner.model.embed_tokens
        self.layers = list(inner.model.layers)
        self.norm = inner.model.norm
        self.rotary = inner.model.rotary_emb
        self.lm_head = _fast_linears(inner.lm_head)
        # per layer: x -> (q, k, v), (o,), (gate, up), (down,)
        self.linears = [(_fast_linears(l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj),
                         _fast_linears(l.self_attn.o_proj), _fast_linears(l.mlp.gate_proj, l.mlp.up_proj),
                         _fast_linears(l.mlp.down_proj)) for l in self.layers]
        attn = self.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.groups = attn.num_key_value_groups
        # what the packed copies were made from: a weight changed in place (full fine-tuning between two
        # evaluations) or a module swapped (LoRA attached) makes them stale
        self.version = _weights_version(inner)


def _weights_version(inner) -> tuple:
    mods = [inner.lm_head] + [m for l in inner.model.layers for m in l.modules() if isinstance(m, torch.nn.Linear)]
    return tuple((id(m), m.weight.data_ptr(), m.weight._version) for m in mods)


_PARTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its _Parts, gone with the model


def _llama_shaped(model) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(inner, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in {"llama", "qwen2", "mistral"}:
        return False
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default" or getattr(cfg, "sliding_window", None) is not None:
        return False  # scaled RoPE and sliding windows: the model's own forward knows them
    if getattr(cfg, "_attn_implementation", "sdpa") not in {"sdpa", "eager"} or cfg.hidden_act != "silu":
        return False
    try:
        layer = inner.model.layers[0]
        return all(hasattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) and not hasattr(
            layer.self_attn, "q_norm") and hasattr(layer, "mlp") and hasattr(inner, "lm_head")
    except (AttributeError, IndexError):
        return False


Step = Callable[[KVCache, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def decode_step_for(model) -> Step:
    """The fastest correct decode step for `model`: (kv, ids, positions, mask) -> logits [rows, vocab]."""
    if _llama_shaped(model):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        parts = _PARTS.get(model)
        if parts is None or parts.version != _weights_version(inner):
            parts = _PARTS[model] = _Parts(model)
        return functools.partial(_llama_step, parts)
    return functools.partial(_model_step, model)


def _llama_step(p: _Parts, kv: KVCache, ids, positions, mask) -> torch.Tensor:
    """One token per row through every layer, writing its key and value into column kv.length in place.

    The same operations as transformers' LlamaModel.forward for one query token (sdpa with the query heads
    grouped by key/value head, as its `pack_gqa` does), minus the machinery around them.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    kv.reserve(1)
    n, rows = kv.length, ids.shape[0]
    hidden = p.embed(ids)
    cos, sin = p.rotary(hidden, position_ids=positions)
    # [rows, 1, 1, n + 1], True where the row may attend, shared by the heads; None when no row has padding
    # (transformers passes no mask then either: the same sdpa kernel, so bf16 rounds the same way)
    allowed = None if bool(mask.all()) else mask[:, None, None, :].bool()
    for i, layer in enumerate(p.layers):
        x = layer.input_layernorm(hidden)
        qkv, o_proj, gate_up, down = p.linears[i]
        q, k, v = (t.reshape(rows, 1, -1, p.head_dim).transpose(1, 2) for t in qkv(x))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        kv.keys[i][:, :, n:n + 1] = k
        kv.values[i][:, :, n:n + 1] = v
        keys, values = kv.keys[i][:, :, :n + 1], kv.values[i][:, :, :n + 1]
        if p.groups > 1:  # [rows, heads, 1, d] -> [rows, kv heads, groups, d]: attention on the kv heads
            q = q.reshape(rows, -1, p.groups, p.head_dim)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=p.scaling)
        out = out.reshape(rows, -1, 1, p.head_dim).transpose(1, 2).reshape(rows, 1, -1)
        hidden = hidden + o_proj(out)[0]
        gate, up = gate_up(layer.post_attention_layernorm(hidden))
        hidden = hidden + down(F.silu(gate) * up)[0]
    kv.length = n + 1
    return p.lm_head(p.norm(hidden))[0][:, -1]


class _CacheView:
    """A transformers-cache-shaped view of a KVCache, for models that keep their own forward."""

    def __init__(self, kv: KVCache):
        from transformers import DynamicCache

        self.cache = DynamicCache([(k[:, :, :kv.length], v[:, :, :kv.length]) for k, v in zip(kv.keys, kv.values)])


def _model_step(model, kv: KVCache, ids, positions, mask) -> torch.Tensor:
    """The model's own forward over the cache's filled columns; the new column is then written into the buffers."""
    view = _CacheView(kv).cache
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=view, use_cache=True,
                logits_to_keep=1)
    kv.reserve(1)
    for i, layer in enumerate(view.layers):
        kv.keys[i][:, :, kv.length] = layer.keys[:, :, -1]
        kv.values[i][:, :, kv.length] = layer.values[:, :, -1]
    kv.length += 1
    return out.logits[:, -1]
