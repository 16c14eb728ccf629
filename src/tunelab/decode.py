"""The decode step shared by `tunelab infer` and `tunelab serve`: a preallocated KV cache and one lean forward.

    kv = KVCache.from_cache(prefill_cache, rows=1)          # after a prefill forward with a DynamicCache
    step = decode_step_for(model)                           # the fast step, or the model's own forward
    logits = step(kv, ids, positions, mask)                 # ids/positions [rows, 1], mask [rows, kv.length + 1]

Why: at batch 1 a 135M model spends most of each token in Python and small-tensor overhead, not in matmuls
(the weights are ~270 MB in bf16, ~15 ms of memory traffic; transformers' forward took ~55 ms a token). Two
things remove most of it:

- The cache is written in place into buffers with headroom (`KVCache`), so a step does not re-allocate and copy
  every layer's keys and values (`torch.cat` in DynamicCache) — 60 copies of the whole cache per token.
- For Llama-shaped models (Llama, SmolLM, Qwen2, Mistral without a sliding window) the step does the arithmetic of
  transformers' forward with the model's own weights (projections, norms, MLP, rotary embedding; LoRA wrappers
  included) but skips its per-call machinery (mask building, kwargs decorators, output dataclasses, cache
  bookkeeping) and makes fewer calls: bf16 projections that read the same input are one prepacked product, q and
  k are rotated together, a norm is two calls instead of eight, residuals are added in place. The logits are
  those of the model's forward over the same cache bit for bit in bf16 and to rounding in fp32, where greedy
  answers equal transformers' `generate` token for token (tests/test_decode.py).
  Other architectures get the model's own forward over the same cache.

One row at a time (`decode_step_for(model, max_rows=1)`: `tunelab infer` with one prompt and its chat, the
dashboard's chat, a server of one row), bf16 products go through torch's own matrix-vector kernel instead of
oneDNN's: at batch 1 a step only streams the weights, and oneDNN's one-row bf16 product was 1.2-1.8x slower at
that than torch's on the 2-core AVX512-BF16 machine (bench/kernels.py). Its fp32 sums round a few values differently in the last bit, so it is kept to engines that
only ever decode one row: an answer must not depend on which other requests shared its batch, and a batching
engine (the server) always multiplies with the oneDNN kernel, whose rows do not depend on each other. torch picks
oneDNN for every bf16 product while it is enabled, so a one-row step switches it off for its duration, under
`KERNELS`, a lock every engine step takes (a prefill in another thread would otherwise run with it off).

Opt-in, `set_decode_weights(model, "int8")` (`infer.generate(..., weights="int8")`): the decode steps multiply
with int8 copies of the weights, which halves the bytes read per token (the bound at batch 1), as llama.cpp's
q8_0 does. Faster, and the answers are close to the model's, not equal.

The prefill (a whole prompt, or a batch of left-padded prompts) stays with the model's forward and a DynamicCache:
it runs once per request, and its cache is then copied into a KVCache.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

HEADROOM = 256  # columns allocated past the current length; growing doubles, so growth is rare
# Held by every engine step (prefill and decode): a one-row step switches oneDNN off process-wide while it runs
KERNELS = threading.RLock()


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


def _stacked(modules) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The modules' weights (and biases, zeros where one has none) stacked along the output dimension."""
    w = torch.cat([m.weight.detach() for m in modules])
    biases = [m.bias for m in modules]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b.detach() if b is not None else w.new_zeros(m.out_features) for m, b in zip(modules, biases)])
    return w, bias


def _fast_linears(*modules) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> torch.cat([module(x) for module in modules], -1), for modules that read the same input (q/k/v; gate/up).

    For plain bf16 nn.Linear modules on CPU: one product with their weights stacked and prepacked in oneDNN's
    blocked layout, which makes a one-token bf16 product 1.5-2.5x faster on AVX512-BF16 CPUs (one call instead of
    three or two), with bit-identical results (each output is the same dot product; tests/test_decode.py). fp32
    gains little and rounds differently, so it is left alone, as are LoRA-wrapped projections (their base weight
    is inside the wrapper and the adapter may be switched off). The packed copy costs the weights' size once more.
    """
    if all(_packable(m) for m in modules):
        try:
            w, bias = _stacked(modules)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
            op = torch.ops.mkldnn._linear_pointwise
            op(torch.zeros(1, w.shape[1], dtype=w.dtype), packed, bias, "none", [], "")  # fails here, not mid-answer
            return lambda x: op(x, packed, bias, "none", [], "")
        except (RuntimeError, AttributeError):  # a torch built without oneDNN's packed linear
            pass
    if len(modules) == 1:
        return modules[0]
    return lambda x: torch.cat([m(x) for m in modules], dim=-1)


def _int8_linears(*modules) -> Callable[[torch.Tensor], torch.Tensor]:
    """Like `_fast_linears`, with the weights rounded to int8 (one scale per output row): `weights="int8"`.

    The product is fbgemm's dynamic int8 linear (the activations are quantised per call, as llama.cpp's q8_0
    does per block), which reads half the bytes of bf16 and runs ~2.5x faster per product on this CPU. The
    answers are no longer the model's own: close, not equal (tests/test_decode.py). LoRA-wrapped projections and
    a torch without fbgemm keep `_fast_linears`.
    """
    if not all(type(m) is torch.nn.Linear and m.weight.device.type == "cpu" for m in modules):
        return _fast_linears(*modules)
    try:
        import warnings

        w, bias = _stacked(modules)
        w = w.float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        with warnings.catch_warnings():  # torch marks its quantised tensors deprecated; the kernels are current
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(w, scales.double(), torch.zeros(w.shape[0], dtype=torch.long), 0,
                                            torch.qint8)
            packed = torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.float())
        op = torch.ops.quantized.linear_dynamic
        op(torch.zeros(1, w.shape[1]), packed, True)  # fails here, not mid-answer
    except (RuntimeError, AttributeError):  # a torch built without fbgemm
        return _fast_linears(*modules)
    # 8-bit activations need VNNI (int32 sums); without it fbgemm's int16 partial sums could saturate, so the
    # activations get 7 bits there (reduce_range), which costs agreement (bench/README.md)
    reduce_range = not _cpu_has_vnni()
    return lambda x: op(x.float(), packed, reduce_range).to(x.dtype)


def _one_row_linears(*modules) -> Callable[[torch.Tensor], torch.Tensor]:
    """Like `_fast_linears` for one row, run with oneDNN switched off (`_native_products`): plain bf16 weights
    (stacked when several modules read the same input) through torch's own matrix-vector kernel, which streams the
    weights faster than oneDNN's one-row product on this CPU and needs no packed copy. Each output is its own dot
    product, so stacking changes no bit. LoRA-wrapped projections are called as they are (their products run with
    the same kernel)."""
    if not all(type(m) is torch.nn.Linear for m in modules):
        return modules[0] if len(modules) == 1 else (lambda x: torch.cat([m(x) for m in modules], dim=-1))
    if len(modules) == 1:
        w, bias = modules[0].weight.detach(), modules[0].bias
        bias = None if bias is None else bias.detach()
    else:
        w, bias = _stacked(modules)
    return lambda x: F.linear(x, w, bias)


def _one_row_native(inner) -> bool:
    """Whether one-row steps of this model multiply with torch's own bf16 kernel (`one_row_gemv`)."""
    from tunelab.runtime import lever_enabled

    w = inner.lm_head.weight
    return (w.dtype == torch.bfloat16 and w.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and lever_enabled("one_row_gemv"))


@contextlib.contextmanager
def _native_products() -> Iterator[None]:
    """oneDNN off for this step's products (torch would hand every bf16 product to it), under `KERNELS`."""
    with KERNELS:
        before = torch._C._get_mkldnn_enabled()
        torch._C._set_mkldnn_enabled(False)
        try:
            yield
        finally:
            torch._C._set_mkldnn_enabled(before)


@functools.cache
def _cpu_has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return False
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


WEIGHTS = ("model", "int8")  # what decode steps multiply with: the model's own weights, or int8 copies of them


class _Parts:
    """The modules of a Llama-shaped causal LM, found once (through a PEFT wrapper if there is one)."""

    def __init__(self, model, weights: str = "model", one_row: bool = False):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.embed = inner.model.embed_tokens
        self.layers = list(inner.model.layers)
        self.norm = inner.model.norm
        self.rotary = inner.model.rotary_emb
        self.weights = weights
        self.native = weights == "model" and one_row and _one_row_native(inner)
        fast = _int8_linears if weights == "int8" else _one_row_linears if self.native else _fast_linears
        self.lm_head = fast(inner.lm_head)
        # per layer: x -> [q|k|v], o, [gate|up], down
        self.linears = [(fast(l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj), fast(l.self_attn.o_proj),
                         fast(l.mlp.gate_proj, l.mlp.up_proj), fast(l.mlp.down_proj)) for l in self.layers]
        # the norms as (weight, eps): LlamaRMSNorm's arithmetic in three calls instead of eight (same bits)
        self.norms = [(_norm(l.input_layernorm), _norm(l.post_attention_layernorm)) for l in self.layers]
        self.final_norm = _norm(self.norm)
        attn = self.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.groups = attn.num_key_value_groups
        self.heads = inner.config.num_attention_heads
        self.kv_heads = inner.config.num_key_value_heads
        self.intermediate = self.layers[0].mlp.gate_proj.out_features
        # what the packed copies were made from: a weight changed in place (full fine-tuning between two
        # evaluations) or a module swapped (LoRA attached) makes them stale
        self.version = _weights_version(inner)


def _norm(module) -> tuple[torch.Tensor, float]:
    return module.weight, module.variance_epsilon


def _rms_norm(x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
    """LlamaRMSNorm: normalised in fp32 and rounded to x's dtype (what torch's rms_norm does for bf16 without a
    weight), then scaled in x's dtype: bit for bit transformers' result in two calls instead of eight."""
    weight, eps = norm
    return weight * F.rms_norm(x, (x.shape[-1],), None, eps)


def _weights_version(inner) -> tuple:
    mods = [inner.lm_head] + [m for l in inner.model.layers for m in l.modules() if isinstance(m, torch.nn.Linear)]
    return tuple((id(m), m.weight.data_ptr(), m.weight._version) for m in mods)


_PARTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {weights: _Parts}, gone with the model
_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> "int8" when asked for


def set_decode_weights(model, weights: str = "model") -> None:
    """Decode `model` with its own weights ("model", the default) or with int8 copies of them ("int8").

    int8 halves the bytes read per token (a step ~1.8x as fast as bf16's on a 2-core AVX512-BF16 CPU, see
    bench/README.md) and changes the answers: opt-in. It applies to the decode steps of Llama-shaped models (the
    prompt is still read by the model's forward) and to plain linear layers (not LoRA-wrapped ones).
    """
    if weights not in WEIGHTS:
        from tunelab.errors import TunelabError

        raise TunelabError(f"unknown decode weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
    if weights == "model":
        _WEIGHTS.pop(model, None)
    else:
        _WEIGHTS[model] = weights


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
            layer.self_attn, "q_norm") and hasattr(layer, "mlp") and hasattr(inner, "lm_head") and hasattr(
            layer.input_layernorm, "variance_epsilon")
    except (AttributeError, IndexError):
        return False


Step = Callable[[KVCache, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def decode_step_for(model, max_rows: int | None = None) -> Step:
    """The fastest correct decode step for `model`: (kv, ids, positions, mask) -> logits [rows, vocab].

    `max_rows=1`: the caller never decodes more than one row (a single stream), which allows the one-row kernels.
    """
    if _llama_shaped(model):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        key = (_WEIGHTS.get(model, "model"), max_rows == 1)
        made = _PARTS.setdefault(model, {})  # per kind of weights: switching back and forth packs nothing again
        parts = made.get(key)
        if parts is None or parts.version != _weights_version(inner):
            parts = made[key] = _Parts(model, *key)
        return functools.partial(_native_step if parts.native else _llama_step, parts)
    return functools.partial(_model_step, model)


def _native_step(p: _Parts, kv: KVCache, ids, positions, mask) -> torch.Tensor:
    if ids.shape[0] != 1:
        raise ValueError("this decode step was made for one row (decode_step_for(model, max_rows=1))")
    with _native_products():
        return _llama_step(p, kv, ids, positions, mask)


def _llama_step(p: _Parts, kv: KVCache, ids, positions, mask) -> torch.Tensor:
    """One token per row through every layer, writing its key and value into column kv.length in place.

    The same operations as transformers' LlamaModel.forward for one query token (sdpa with the query heads
    grouped by key/value head, as its `pack_gqa` does), minus the machinery around them, and with fewer calls:
    q and k are rotated together, norms are one fused call, residuals are added in place. In bf16 each of these
    rounds as transformers' separate operations do.
    """
    kv.reserve(1)
    n, rows, d = kv.length, ids.shape[0], p.head_dim
    q_heads, qk_heads = p.heads, p.heads + p.kv_heads
    hidden = p.embed(ids)
    cos, sin = p.rotary(hidden, position_ids=positions)  # [rows, 1, d], shared by the heads
    half, inter = d // 2, p.intermediate
    # rotate_half(x) * sin == x.roll(half) * sin_signed: the sign moved onto sin, the same products exactly
    sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    # [rows, 1, 1, n + 1], True where the row may attend, shared by the heads; None when no row has padding
    # (transformers passes no mask then either: the same sdpa kernel, so bf16 rounds the same way)
    allowed = None if bool(mask.all()) else mask[:, None, None, :].bool()
    for i, (qkv, o_proj, gate_up, down) in enumerate(p.linears):
        norm_in, norm_post = p.norms[i]
        heads = qkv(_rms_norm(hidden, norm_in)).view(rows, -1, d)  # [rows, q + k + v heads, d]
        qk = heads.narrow(1, 0, qk_heads)
        qk = qk * cos + qk.roll(half, -1) * sin  # RoPE on q and k at once (narrow: a view, cheaper than [])
        kv.keys[i].narrow(2, n, 1).copy_(qk.narrow(1, q_heads, p.kv_heads).unsqueeze(2))
        kv.values[i].narrow(2, n, 1).copy_(heads.narrow(1, qk_heads, p.kv_heads).unsqueeze(2))
        # [rows, heads, d] -> [rows, kv heads, groups, d]: attention on the kv heads, the groups as queries
        q = qk.narrow(1, 0, q_heads).view(rows, p.kv_heads, p.groups, d)
        out = F.scaled_dot_product_attention(q, kv.keys[i].narrow(2, 0, n + 1), kv.values[i].narrow(2, 0, n + 1),
                                             attn_mask=allowed, scale=p.scaling)
        hidden += o_proj(out.reshape(rows, 1, -1))
        gate_up_out = gate_up(_rms_norm(hidden, norm_post))
        hidden += down(F.silu(gate_up_out.narrow(-1, 0, inter)).mul_(gate_up_out.narrow(-1, inter, inter)))
    kv.length = n + 1
    return p.lm_head(_rms_norm(hidden, p.final_norm))[:, -1]


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
