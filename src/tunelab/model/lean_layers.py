"""Llama-family RMSNorm and SwiGLU product that keep less for backward, with the same forward bits.

What autograd keeps per token and decoder layer in a LoRA step (bf16, SmolLM2-135M, docs/perf-notes.md): each
RMSNorm keeps its input converted to fp32 (2.25 KiB each, two per layer), and the MLP's `silu(gate) * up` keeps
gate, silu(gate) and up (3 KiB each). Here:

- `_RMSNorm` keeps the input in its own dtype (bf16: half the bytes) and the row statistics (one fp32 number per
  token).
- `_SiluMul` keeps gate and up; silu(gate) is recomputed in backward (an elementwise pass).
- Both outputs carry a `Rebuild` (`tunelab_rebuild`): how to make them again, bit for bit, from what their own
  backward keeps anyway (the norm's input, weight and statistics: two elementwise passes; gate and up). The fused
  LoRA layers reading them (q/k/v and gate/up after the two norms, down_proj after the SwiGLU;
  `tunelab.model.fused_lora`) keep those instead of their input and make it again once in backward: three
  [tokens, hidden or intermediate] tensors per layer less, for two elementwise passes more in backward (the
  lever rebuild_inputs; off, the LoRA layers keep their inputs).

That is 5.3 of ~28 KiB per token per layer less in bf16 from the norms and SwiGLU themselves, and 5.3 more (10.5
in fp32) from the rebuilt LoRA inputs, with no matmul recomputed. The forward is transformers' own
arithmetic (`LlamaRMSNorm.forward`, `LlamaMLP.forward`), so outputs are bit for bit those of the model; the
gradients are the same formulas (the SwiGLU's bit for bit, the norm's to fp32 rounding inside the row statistics;
tests/test_train_units.py). Installed (`install_lean_layers`) only on modules whose `forward` source is exactly
Llama's (Llama, Mistral, Qwen2, Qwen3, ... share it); anything else is left as it is.

`install_autocast_lora_inputs`: peft casts each LoRA layer's input to the adapter's dtype (fp32, the master
weights) before dropout and lora_A, and under bf16 autocast lora_A's matmul casts it straight back to bf16: two
copies of every adapted layer's input per forward (and two more in backward) that change no value (a bf16 number
is exact in fp32, and dropout's product rounds to bf16 the same either way). Under autocast the input now stays
as it is; without autocast (fp32 runs, or code that calls the model outside autocast) peft's cast is kept.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch
import torch.nn.functional as F
from torch import nn


class Rebuild:
    """Set on a tensor as `tunelab_rebuild`: `make(*tensors)` gives it again, bit for bit, from tensors that its
    own layer keeps for backward anyway. A fused LoRA layer given the tensor keeps `tensors` instead and calls
    `share.take` in backward; the layers sharing one input (q/k/v, gate/up) make it once between them. `share` holds
    no tensor of the forward (it lives in each user's autograd context, where saved tensors must go through
    save_for_backward for checkpointing's hooks to see them)."""

    __slots__ = ("tensors", "share")

    def __init__(self, make, *tensors):
        self.tensors, self.share = tensors, _Shared(make)


class _Shared:
    __slots__ = ("make", "users", "left", "value")

    def __init__(self, make):
        self.make, self.users, self.left, self.value = make, 0, 0, None

    def join(self) -> None:
        """One more layer reads the tensor (called in its forward)."""
        self.users += 1
        self.left = self.users

    def take(self, tensors) -> torch.Tensor:
        """The tensor again (made by the first reader's backward, dropped after the last one's)."""
        if self.value is None:
            self.value = self.make(*tensors)
        value = self.value
        self.left -= 1
        if self.left <= 0:  # the last reader: drop it (a graph kept for another backward starts over)
            self.value, self.left = None, self.users
        return value


def _rstd(x, eps):
    """LlamaRMSNorm.forward's statistics: 1 / sqrt(mean(x^2) + eps) per row, in fp32 ([..., 1])."""
    xf = x.float()
    squares = xf.pow(2) if xf is x else xf.pow_(2)  # into x's fp32 copy where there is one (the same bits)
    return squares.mean(-1, keepdim=True).add_(eps).rsqrt_()


def _rms_scale(x, weight, rstd):
    """The rest of LlamaRMSNorm.forward's arithmetic, `weight * (x.float() * rstd).to(x.dtype)` (the forward, and its
    rebuild in backward). Each product goes into a tensor made by the call itself where the result has its
    dtype (the same bits: a product is the same either way round); a second [tokens, hidden] tensor made and freed
    at every call cost far more than the product here (fresh pages)."""
    xf = x.float()
    normed = (xf * rstd if xf is x else xf.mul_(rstd)).to(x.dtype)  # into x's fp32 copy where there is one
    return normed.mul_(weight) if torch.result_type(weight, normed) == normed.dtype else weight * normed


def _silu_mul(gate, up):
    return F.silu(gate) * up


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, rstd):
        ctx.save_for_backward(x, weight, rstd)
        return _rms_scale(x, weight, rstd)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        xf = x.float()
        g = (grad * weight).to(x.dtype).float()  # through `weight * normed` and normed's cast to x's dtype
        # normed = xf * rstd, rstd = (mean(xf^2) + eps)^-1/2: d rstd / d xf = -rstd^3 * xf / d
        dot = (g * xf).sum(-1, keepdim=True)
        grad_x = g * rstd - xf * (dot * rstd.pow(3) / x.shape[-1])
        grad_w = None
        if ctx.needs_input_grad[1]:
            normed = (xf * rstd).to(x.dtype)
            grad_w = (grad * normed).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return grad_x.to(x.dtype), grad_w, None


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _silu_mul(gate, up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def _cast_unless_autocast(self, x, dtype):
    if (x is None or x.dtype == dtype or torch.is_autocast_enabled(x.device.type)
            or not getattr(self, "cast_input_dtype_enabled", True)):  # peft's disable_input_dtype_casting
        return x
    return x.to(dtype=dtype)


def install_autocast_lora_inputs(model: nn.Module) -> int:
    """Plain LoRA linear layers (no DoRA or other variant) keep their input's dtype under autocast; returns how
    many."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for module in model.modules():
        if type(module) is Linear and not getattr(module, "lora_variant", None):
            module._cast_input_dtype = types.MethodType(_cast_unless_autocast, module)
            count += 1
    return count


def _norm_forward(self, hidden_states):
    with torch.no_grad():
        rstd = _rstd(hidden_states, self.variance_epsilon)  # [tokens, 1]: kept, not computed again in backward
    out = _RMSNorm.apply(hidden_states, self.weight, rstd)
    # all three are kept for the norm's own backward (the first layer's input, the frozen embeddings' output, is not:
    # there the LoRA layers keep the output as before)
    if getattr(self, "tunelab_rebuild_output", True) and out.requires_grad and hidden_states.requires_grad:
        out.tunelab_rebuild = Rebuild(_rms_scale, hidden_states, self.weight, rstd)
    return out


def _mlp_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    h = _SiluMul.apply(gate, up)
    if getattr(self, "tunelab_rebuild_output", True):  # the fused down_proj makes h again from gate and up,
        h.tunelab_rebuild = Rebuild(_silu_mul, gate, up)  # which are kept for backward already
    return self.down_proj(h)


@functools.cache
def _source(func) -> str:
    try:
        return inspect.getsource(func).strip()
    except (OSError, TypeError):
        return ""


def _llama_norm(module: nn.Module) -> bool:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return hasattr(module, "variance_epsilon") and _source(type(module).forward) == _source(LlamaRMSNorm.forward)


def _llama_mlp(module: nn.Module) -> bool:
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaMLP

    return (isinstance(getattr(module, "act_fn", None), (SiLUActivation, nn.SiLU))
            and _source(type(module).forward) == _source(LlamaMLP.forward))


def install_lean_layers(model: nn.Module, rebuild: bool = True) -> int:
    """Give every Llama-formula RMSNorm and SiLU MLP of `model` the lean forward; returns how many. `rebuild`: their
    outputs carry a `Rebuild` (the lever rebuild_inputs), so that fused LoRA layers reading them keep less."""
    count = 0
    for module in model.modules():
        if _llama_norm(module):
            module.forward = types.MethodType(_norm_forward, module)
        elif _llama_mlp(module):
            module.forward = types.MethodType(_mlp_forward, module)
        else:
            continue
        module.tunelab_rebuild_output = rebuild
        count += 1
    return count
