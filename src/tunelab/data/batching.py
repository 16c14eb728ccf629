"""Batches from encoded records: padding-free packing or padded (optionally length-grouped) batches.

Packing concatenates the records of a micro-batch into one row and restarts `position_ids` at 0 for each record;
transformers then builds a block-diagonal causal mask from the position resets (no attention across records),
and the first token of each record is never a target of the previous one. The loss is the same token-weighted
mean as with padded batches, with no compute spent on padding.

A micro-batch holds `training.batch_size` records, or with `training.batch_tokens` as many records as fit in that
many tokens (`token_bins`): equal work per step whatever the record lengths, and bigger packed rows (bigger
matmuls) than a few records give. Such a micro-batch runs as `Config.token_passes()` passes (bins of at most
`training.pass_tokens`), so that the memory a pass keeps for backward does not grow with the step.
"""

from __future__ import annotations

import random
from bisect import bisect_left, insort
from typing import Sequence

import torch

from tunelab.data.template import IGNORE_INDEX


def collate_packed(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    ids, labels, pos = [], [], []
    for ex in examples:
        n = len(ex["input_ids"])
        ids.extend(ex["input_ids"])
        lab = list(ex["labels"])
        lab[0] = IGNORE_INDEX  # position 0 is never predicted; do not let the previous record predict it
        labels.extend(lab)
        pos.extend(range(n))
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([pos])}


def collate_padded(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ex["input_ids"]) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[i, :n] = torch.tensor(ex["input_ids"])
        labels[i, :n] = torch.tensor(ex["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The record order of one epoch: a permutation fixed by (seed, epoch), so a resumed run sees the same."""
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batches_for_epoch(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                      group_by_length: bool = False) -> list[list[int]]:
    """Index lists of the micro-batches of one epoch (the last one may be smaller)."""
    order = epoch_order(len(lengths), seed, epoch)
    if group_by_length:
        # Sort within mega-batches of 50 batches by length, then shuffle the batches: similar lengths share a
        # batch (little padding) while the epoch order stays random.
        mega = batch_size * 50
        order = [i for k in range(0, len(order), mega)
                 for i in sorted(order[k:k + mega], key=lambda j: -lengths[j])]
        batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
        random.Random(seed * 7919 + epoch).shuffle(batches)
        return batches
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def token_bins(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Record indices packed into bins of at most `budget` tokens, best fit decreasing: each record, longest
    first, goes to the fullest bin that still has room for it. Nearly every bin ends up full (few micro-batches per
    epoch) and the bins depend only on the lengths, so every epoch has as many steps as the plan counted. A record
    longer than the budget gets a bin of its own."""
    free: list[tuple[int, int]] = []  # (tokens left, bin) of bins with room, sorted
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        k = bisect_left(free, (lengths[i], -1))
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(i)
        else:
            room, b = budget, len(bins)
            bins.append([i])
        room -= lengths[i]
        if room > 0:
            insort(free, (room, b))
    return bins


def token_batches_for_epoch(lengths: Sequence[int], budget: int, seed: int, epoch: int) -> list[list[int]]:
    """The micro-batches of one epoch under a token budget: the bins of `token_bins` in an order fixed by
    (seed, epoch), each record exactly once."""
    bins = token_bins(lengths, budget)
    return [bins[b] for b in epoch_order(len(bins), seed, epoch)]


def step_batches_for_epoch(lengths: Sequence[int], t_cfg, epoch: int, pass_tokens: int = 0) -> list[list[int]]:
    """The forward passes of one epoch as `training` (TrainingConfig) asks: bins of at most `pass_tokens` tokens
    (default batch_tokens) under a token budget, else micro-batches of batch_size records."""
    if t_cfg.batch_tokens:
        return token_batches_for_epoch(lengths, pass_tokens or t_cfg.batch_tokens, t_cfg.seed, epoch)
    return batches_for_epoch(lengths, t_cfg.batch_size, t_cfg.seed, epoch, t_cfg.group_by_length)


def micro_batches_per_epoch(lengths: Sequence[int], t_cfg, pass_tokens: int = 0) -> int:
    """How many forward passes `step_batches_for_epoch` makes of one epoch."""
    if t_cfg.batch_tokens:
        return len(token_bins(lengths, pass_tokens or t_cfg.batch_tokens))
    return -(-len(lengths) // t_cfg.batch_size)
