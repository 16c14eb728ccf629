"""Dropout for LoRA inputs on CPU with cheap random masks.

peft applies `nn.Dropout` to the input of every adapted linear layer: 210 masks per forward for SmolLM2 with all
linear layers targeted. On CPU `torch.bernoulli_` draws one Mersenne-Twister number per element and converts it to
float; measured here it was 11% of a LoRA step. `FastDropout` cuts four 16-bit integers from each 64-bit random
word and compares them with the drop level (about 5x less time for the same mask size). The words come from
numpy's SFC64 generator, seeded for each mask by one draw from torch's global generator: 2.5 ns a word against
4.8 for torch's own `random_` (single-threaded either way; 7% of a step at 4 passes of 512 tokens, docs/perf-notes.md
section 12). A seeded run, and a resumed one (torch's generator state is checkpointed), draws the same masks every
time. The drop probability is rounded to a multiple of 2^-16 (|change| <= 7.7e-6) and kept elements are scaled by
the exact inverse keep rate, so the layer stays unbiased.

With the lever `sfc64_dropout` off (and for runs recorded before it existed, `tunelab reproduce`), the words come
from torch's `random_` and the levels are 15-bit, as before. On GPUs (fast Philox dropout), and in eval mode, it is
plain `nn.Dropout`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tunelab.runtime import lever_enabled


def drop_levels(p: float) -> tuple[int, int]:
    """(levels dropped, levels in all) of the integer comparison that draws a mask with drop probability p."""
    levels = 1 << 16 if lever_enabled("sfc64_dropout") else 1 << 15
    return round(p * levels), levels


def keep_mask(shape: torch.Size, p: float, device=None) -> tuple[torch.Tensor, float]:
    """(bool mask with P(False) = drop_levels(p) as a fraction, 1 / keep-probability), on the CPU."""
    n = math.prod(shape)
    drop, levels = drop_levels(p)
    if levels == 1 << 16:
        seed = int(torch.empty((), dtype=torch.int64).random_())
        words = torch.from_numpy(np.random.SFC64(seed).random_raw((n + 3) // 4).view(np.int64))
        # four uniform 16-bit integers per word, read as int16: uniform over [-2^15, 2^15), one comparison
        return words.view(torch.int16)[:n].view(shape) >= drop - (1 << 15), levels / (levels - drop)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()  # 63 random bits each
    masked = words.view(torch.int16)[:n].view(shape) & (levels - 1)  # four uniform 15-bit integers per word
    return masked >= drop, levels / (levels - drop)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A CPU bool mask as bits (numpy.packbits), what backward keeps of it: 1 bit an element instead of a byte
    (4.2 of ~22 KiB per token per layer in a LoRA step); packing and unpacking cost ~0.15 ns an element."""
    return torch.from_numpy(np.packbits(mask.contiguous().numpy(), axis=None))


def unpack_mask(bits: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=math.prod(shape)).view(np.bool_)).view(shape)


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, scale):
        ctx.save_for_backward(pack_mask(mask))
        ctx.scale, ctx.shape = scale, mask.shape
        return x.mul(mask).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (bits,) = ctx.saved_tensors
        return grad.mul(unpack_mask(bits, ctx.shape)).mul_(ctx.scale), None, None


class FastDropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        drop, levels = drop_levels(self.p)
        if not self.training or x.device.type != "cpu" or drop == 0 or drop >= levels:
            return F.dropout(x, self.p, self.training, self.inplace)  # also p == 0, and p within 2^-16 of 1
        mask, scale = keep_mask(x.shape, self.p, x.device)
        return _MaskedScale.apply(x, mask, scale)


def install_fast_dropout(model: nn.Module) -> int:
    """Swap every `nn.Dropout` inside a peft LoRA layer's `lora_dropout` for FastDropout; returns how many."""
    count = 0
    for module in model.modules():
        table = getattr(module, "lora_dropout", None)
        if not isinstance(table, nn.ModuleDict):
            continue
        for name, drop in list(table.items()):
            if type(drop) is nn.Dropout and drop.p > 0:
                table[name] = FastDropout(drop.p, drop.inplace)
                count += 1
    return count
