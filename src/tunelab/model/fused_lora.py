"""A LoRA linear layer's frozen matmul, dropout and both adapter matmuls in one autograd function.

peft computes `base(x) + lora_B(lora_A(dropout(x.to(fp32)))) * scaling`. With a bf16 base under autocast that is,
per adapted layer and token: a copy of the input to fp32 (the adapters are fp32), dropout on the fp32 copy, an
autocast cast back to bf16 for lora_A, the dropped input saved for lora_A's gradient, then `* scaling` and `+` as
separate passes, each mirrored in backward. Profiled on the AVX512-BF16 machine, casts (`copy_`), `mul`, `fill_`
and `add_` over those input-sized tensors took about as long as all the matmuls (docs/perf-notes.md).

`LoraFn` does the same arithmetic with the input-sized passes cut to the minimum:
- forward: base = x W^T; h = (x * mask) A^T; out = base + (scaling / keep) * h B^T, the last as one in-place
  `addmm_` whose factor carries the dropout's inverse keep rate (never a pass over the 576-1536 wide input);
- saved: x itself (layers that share an input save the same tensor once), or, where lean_layers made x (the
  RMSNorm outputs read by q/k/v and gate/up, the SwiGLU's silu(gate) * up read by down_proj), what that layer keeps
  anyway (its input, weight and statistics; gate and up), x being made again once in backward for the layers
  sharing it; the keep mask as bits (`tunelab.train.dropout.pack_mask`) and h; the dropped input is rebuilt in
  backward with one pass instead of being kept;
- backward: the input gradient g W + ((g B * scaling / keep) A) * mask as one `addmm_` into the masked adapter
  term; adapter gradients made in the compute dtype and returned in the adapters' dtype (fp32), as autocast does.
Masks come from the layer's FastDropout (`FastDropout.draw`: its decoder layer's draw, or one of its own) in the
same order as peft's forward draws them, so a seeded run draws the same masks with or without this lever; results
equal the unfused path within float rounding (test).

Only plain LoRA on an `nn.Linear` in training mode on CPU, one active adapter, not merged; anything else (DoRA,
QLoRA's 4-bit layers, eval, GPUs) keeps peft's own forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.train.dropout import FastDropout, apply_mask, drop_levels, unpack_mask


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype the matmuls run in, or None when this path does not apply."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if x.dtype == weight.dtype == torch.float32 else None


class LoraFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, a, b, scaling: float, drop: FastDropout | None,
                dtype: torch.dtype):
        # a, b: lora_a and lora_b in the compute dtype (`_cast`)
        xc, w = x.to(dtype), weight.to(dtype)
        mask, bits, keep = drop.draw(x.shape) if drop is not None else (None, None, 1.0)
        out = F.linear(xc, w, None if bias is None else bias.to(dtype))
        h = F.linear(xc if mask is None else apply_mask(xc, mask), a)  # without dropout's 1 / keep
        out2 = out.view(-1, out.shape[-1])
        out2.addmm_(h.view(-1, h.shape[-1]), b.t(), alpha=scaling * keep)  # out += scaling / keep * h B^T
        # an input that lean_layers can make again (a norm's output, silu(gate) * up) is kept as what its own layer
        # keeps anyway
        rebuild = getattr(x, "tunelab_rebuild", None)
        ctx.save_for_backward(weight, a, b, bits, h, *(rebuild.tensors if rebuild else (x,)))
        ctx.rebuild = rebuild and rebuild.share
        if rebuild:
            rebuild.share.join()
        ctx.scaling, ctx.keep, ctx.dtype, ctx.bias_dtype = scaling, keep, dtype, bias is not None and bias.dtype
        ctx.adapter_dtype = lora_a.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, a, b, bits, h, *source = ctx.saved_tensors
        x = ctx.rebuild.take(source) if ctx.rebuild else source[0]  # the same calls as its forward: the same bits
        dtype, scaling, keep = ctx.dtype, ctx.scaling, ctx.keep
        mask = None if bits is None else unpack_mask(bits, x.shape)
        g = grad.to(dtype).reshape(-1, grad.shape[-1])
        h2 = h.reshape(-1, h.shape[-1])
        grad_b = (g.t() @ h2).mul_(scaling * keep)  # (out, r)
        gh = (g @ b).mul_(scaling * keep)  # d/d(x_dropped A^T), with dropout's 1/keep folded in: (N, r)
        xd = x.to(dtype)
        if mask is not None:
            xd = apply_mask(xd, mask, inplace=xd is not x)  # a cast is this function's own copy
        xd = xd.reshape(-1, xd.shape[-1])
        grad_a = gh.t() @ xd  # (r, in)
        grad_x = None
        if ctx.needs_input_grad[0]:
            gx = gh @ a  # (N, in): the adapter's share of the input gradient
            if mask is not None:
                apply_mask(gx, mask.view(gx.shape), inplace=True)
            gx.addmm_(g, weight.to(dtype))  # + g W, into the same buffer
            grad_x = gx.view(x.shape).to(x.dtype)
        grad_bias = g.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype and ctx.needs_input_grad[2] else None
        return (grad_x, None, grad_bias, grad_a.to(ctx.adapter_dtype), grad_b.to(ctx.adapter_dtype), None, None, None,
                None, None)


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's lora.Linear.forward, through LoraFn whenever the layer is in the plain case."""
    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    base = self.base_layer
    dtype = _compute_dtype(x, base.weight) if name else None
    if (dtype is None or args or kwargs or not self.training or self.disable_adapters or self.merged
            or x.device.type != "cpu" or name not in self.lora_A or name in self.lora_variant
            or base.weight.requires_grad):
        return self._tunelab_unfused_forward(x, *args, **kwargs)
    drop = self.lora_dropout[name]
    if not isinstance(drop, (FastDropout, nn.Identity)):  # torch's own dropout (fast_dropout off): its masks
        return self._tunelab_unfused_forward(x, *args, **kwargs)
    draws = isinstance(drop, FastDropout) and drop.active(x)
    if isinstance(drop, FastDropout) and not draws and drop_levels(drop.p)[0]:
        return self._tunelab_unfused_forward(x, *args, **kwargs)  # p rounds to 1: torch's own dropout
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    return LoraFn.apply(x, base.weight, base.bias, a, b, _cast(self, "a", a, dtype), _cast(self, "b", b, dtype),
                        float(self.scaling[name]), drop if draws else None, dtype)


def _cast(module: nn.Module, slot: str, param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`param` in `dtype`, cast again only when the parameter has changed since (the optimiser's in-place step
    moves its version counter): once per step instead of twice per pass (forward and backward)."""
    if param.dtype == dtype:
        return param.detach()
    cache = module.__dict__.setdefault("_tunelab_casts", {})
    key = (param._version, dtype, param.data_ptr())
    if slot not in cache or cache[slot][0] != key:
        cache[slot] = (key, param.detach().to(dtype))
    return cache[slot][1]


def install_fused_lora(model: nn.Module) -> int:
    """Route every plain peft lora.Linear over an nn.Linear through LoraFn (the layer falls back to peft's forward
    by itself where LoraFn does not apply); returns how many layers. Saved adapters are unchanged: only the
    forward of the module instances is replaced."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.base_layer) is nn.Linear and not module.lora_variant:
            module._tunelab_unfused_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
