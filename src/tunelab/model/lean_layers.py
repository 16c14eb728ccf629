"""Llama-family RMSNorm and SwiGLU product that keep less for backward, with the same forward bits.

What autograd keeps per token and decoder layer in a LoRA step (bf16, SmolLM2-135M, docs/perf-notes.md): each
RMSNorm keeps its input converted to fp32 (2.25 KiB each, two per layer), and the MLP's `silu(gate) * up` keeps
gate, silu(gate) and up (3 KiB each). Here:

- `_RMSNorm` keeps the input in its own dtype (bf16: half the bytes) and redoes the fp32 statistics in backward
  (one row-wise pass).
- `_SiluMul` keeps gate and up; silu(gate) is recomputed in backward (an elementwise pass). Its product h carries
  (gate, up) as `tunelab_silu_mul`, so a fused LoRA down_proj (`tunelab.model.fused_lora`) keeps those two, already
  kept, instead of h (3 KiB per token and layer) and rebuilds h with the same two calls, bit for bit.

That is 5.3 of ~28 KiB per token per layer less, with no matmul recomputed. The forward is transformers' own
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


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        xf = x.float()
        return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + ctx.eps)
        normed = (xf * rstd).to(x.dtype)
        g = (grad * weight).to(x.dtype).float()  # through `weight * normed` and normed's cast to x's dtype
        # normed = xf * rstd, rstd = (mean(xf^2) + eps)^-1/2: d rstd / d xf = -rstd^3 * xf / d
        dot = (g * xf).sum(-1, keepdim=True)
        grad_x = g * rstd - xf * (dot * rstd.pow(3) / x.shape[-1])
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * normed).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return grad_x.to(x.dtype), grad_w, None


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

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
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    h = _SiluMul.apply(gate, up)
    h.tunelab_silu_mul = (gate, up)  # kept for backward already: the fused LoRA down_proj rebuilds h from them
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


def install_lean_layers(model: nn.Module) -> int:
    """Give every Llama-formula RMSNorm and SiLU MLP of `model` the lean forward; returns how many."""
    count = 0
    for module in model.modules():
        if _llama_norm(module):
            module.forward = types.MethodType(_norm_forward, module)
        elif _llama_mlp(module):
            module.forward = types.MethodType(_mlp_forward, module)
        else:
            continue
        count += 1
    return count
