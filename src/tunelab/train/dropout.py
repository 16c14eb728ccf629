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

Masks drawn per decoder layer (lever `layer_masks`, docs/perf-notes.md section 13): the LoRA layers of one decoder
layer (q, k, v, o, gate, up, down) take their inputs' masks, one after another, from one draw for all of them
(`MaskGroup`): one seed from torch's generator, one run of SFC64, one comparison and one `packbits` instead of seven
of each. Inside a step each of those calls cost far more than its arithmetic (~0.6 ms a mask at 512 tokens against
~0.2 ms in a loop on its own: the products between them leave the caches cold). A recomputed forward (gradient
checkpointing restores torch's generator) draws the same masks again. Runs recorded before this lever reproduce
with it off, one draw per mask as above.
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
        return torch.from_numpy(_sfc64_keep(n, drop)).view(shape), levels / (levels - drop)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()  # 63 random bits each
    masked = words.view(torch.int16)[:n].view(shape) & (levels - 1)  # four uniform 15-bit integers per word
    return masked >= drop, levels / (levels - drop)


def _sfc64_keep(n: int, drop: int) -> np.ndarray:
    """n keep flags (numpy bool): numpy's SFC64, seeded by one draw from torch's global generator, four uniform 16-bit
    integers cut from each word and read as int16 (uniform over [-2^15, 2^15)), kept where >= drop - 2^15. The
    comparison is numpy's: 13 us for 512 x 576 against 89 for torch's on int16 here."""
    seed = int(torch.empty((), dtype=torch.int64).random_())
    words = np.random.SFC64(seed).random_raw((n + 3) // 4)
    return np.greater_equal(words.view(np.int16)[:n], drop - (1 << 15))


class MaskGroup:
    """The dropout masks of layers that run one after another on the same tokens (one decoder layer's LoRA inputs),
    drawn together. Member i has inputs `widths[i]` wide; a draw for t tokens covers every member (each one's
    segment starting on a whole byte of the packed bits), and each member takes its own segment once. A member that
    finds its segment taken, or drawn for other tokens or another p, starts a new draw: the next forward, or a
    recomputed one."""

    def __init__(self, widths: list[int]):
        self.widths = widths
        self.drawn: list | None = None
        self.key: tuple | None = None

    def take(self, member: int, shape: torch.Size, p: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(bool keep mask of `shape`, the same as bits for backward, 1 / keep-probability)."""
        tokens = math.prod(shape[:-1])
        if self.drawn is None or self.drawn[member] is None or self.key != (tokens, p):
            self._draw(tokens, p)
        taken, self.drawn[member] = self.drawn[member], None
        mask, bits, scale = taken
        return mask.view(shape), bits, scale

    def _draw(self, tokens: int, p: float) -> None:
        drop, levels = drop_levels(p)
        sizes = [tokens * w for w in self.widths]
        starts = np.cumsum([0] + [-(-n // 8) * 8 for n in sizes])  # segments start on whole bytes
        keep = _sfc64_keep(int(starts[-1]), drop)
        bits = torch.from_numpy(np.packbits(keep))
        keep = torch.from_numpy(keep)
        scale = levels / (levels - drop)
        self.drawn = [(keep[s:s + n], bits[s // 8:(s + n + 7) // 8], scale) for s, n in zip(starts, sizes)]
        self.key = (tokens, p)


def apply_mask(x: torch.Tensor, mask: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """x where `mask` (bool, x's shape) is True and 0 where it is False: dropout's `x * mask`, with the mask read as
    uint8 (a float times a bool goes through torch's slower mixed-dtype path: 260 us for a 512 x 576 bf16 input
    here, against 51-61 us)."""
    keep = mask.view(torch.uint8)
    return x.mul_(keep) if inplace else x * keep


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A CPU bool mask as bits (numpy.packbits), what backward keeps of it: 1 bit an element instead of a byte
    (4.2 of ~22 KiB per token per layer in a LoRA step); packing and unpacking cost ~0.15 ns an element."""
    return torch.from_numpy(np.packbits(mask.contiguous().numpy(), axis=None))


def unpack_mask(bits: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=math.prod(shape)).view(np.bool_)).view(shape)


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, bits, scale):
        ctx.save_for_backward(bits)
        ctx.scale, ctx.shape = scale, mask.shape
        return apply_mask(x, mask).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (bits,) = ctx.saved_tensors
        return apply_mask(grad, unpack_mask(bits, ctx.shape)).mul_(ctx.scale), None, None, None


class FastDropout(nn.Dropout):
    group: MaskGroup | None = None  # set by install_fast_dropout (lever layer_masks), with this layer's member index
    member = 0

    def active(self, x: torch.Tensor) -> bool:
        """Whether this call draws a mask here (training on CPU, p not 0 or 1 once rounded to the levels)."""
        drop, levels = drop_levels(self.p)
        return self.training and x.device.type == "cpu" and 0 < drop < levels

    def draw(self, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(bool keep mask, its bits, 1 / keep-probability) for an input of `shape`."""
        if self.group is not None and lever_enabled("layer_masks"):
            return self.group.take(self.member, shape, self.p)
        mask, scale = keep_mask(shape, self.p)
        return mask, pack_mask(mask), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active(x):
            return F.dropout(x, self.p, self.training, self.inplace)  # also p == 0, and p within 2^-16 of 1
        return _MaskedScale.apply(x, *self.draw(x.shape))


def install_fast_dropout(model: nn.Module) -> int:
    """Swap every `nn.Dropout` inside a peft LoRA layer's `lora_dropout` for FastDropout; returns how many. The
    layers under one parent's parent (a decoder layer: its attention's and MLP's projections) share a MaskGroup."""
    count, groups = 0, {}
    for path, module in model.named_modules():
        table = getattr(module, "lora_dropout", None)
        if not isinstance(table, nn.ModuleDict):
            continue
        for name, drop in list(table.items()):
            if type(drop) is nn.Dropout and drop.p > 0:
                fast = table[name] = FastDropout(drop.p, drop.inplace)
                count += 1
                if isinstance(getattr(module, "in_features", None), int):
                    groups.setdefault((path.rsplit(".", 2)[0], name), []).append((fast, module.in_features))
    for members in groups.values():
        group = MaskGroup([width for _, width in members])
        for i, (fast, _) in enumerate(members):
            fast.group, fast.member = group, i
    return count
