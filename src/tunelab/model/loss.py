"""Causal-LM loss that never materialises full-vocabulary logits for tokens that carry no loss.

The decoder runs once; only the hidden states at trained positions go through the output head, in chunks of
`chunk_size` tokens, so at most one chunk of `chunk_size x vocab` logits is alive at a time. With a frozen head
(LoRA, QLoRA, DoRA) the gradient w.r.t. the hidden states is made chunk by chunk in the forward pass itself
(`_FrozenHeadCE`): backward neither keeps nor recomputes logits. A trained head (method=full, modules_to_save)
recomputes each chunk's logits in backward instead. The sum of token losses and the token count are returned,
so callers weight by tokens across micro-batches and processes: loss = sum / count, perplexity = exp(sum / count).

Used by training and by `tunelab eval` alike, so eval perplexity is exactly exp(eval loss) of training.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunelab.data.template import IGNORE_INDEX
from tunelab.runtime import lever_enabled
from tunelab.model.attention import branches_supported, packed_kwargs, segments


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


_BUFFERS = threading.local()  # per thread: the chunk x vocabulary logits buffers of _chunked_ce, kept between calls


F32_ROWS = 128  # rows of a chunk's logits turned into fp32 softmax at a time


def _logit_buffers(rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
    """(logits in the matmul dtype, `rows` x `vocab`; fp32 logits, at most F32_ROWS x `vocab`, None for fp32).

    The head's product fills the first for a whole chunk; the fp32 softmax then runs F32_ROWS rows at a time in the
    second (25 MB instead of 200 MB for a 1,024-row chunk of a 49k vocabulary, with the same bits: every step
    of it is row-wise). On CPU both are kept from call to call (lever `logit_buffers`): a fresh 1024 x 49k fp32
    tensor is 200 MB, above glibc's mmap threshold, so every chunk of every step page-faulted it in anew (150 ms
    per `.float()` against 17 ms into a warm buffer, measured here). They are alive anyway at the peak (the loss
    runs with every activation held), so keeping them does not raise peak memory."""
    f32_rows = min(rows, F32_ROWS)
    if device.type != "cpu" or not lever_enabled("logit_buffers"):
        low = torch.empty(rows, vocab, dtype=dtype, device=device)
        return low, None if dtype == torch.float32 else torch.empty(f32_rows, vocab, device=device)
    key = (str(device), dtype, vocab)
    cache = getattr(_BUFFERS, "by_key", None)
    if cache is None:
        cache = _BUFFERS.by_key = {}
    have = cache.get(key)
    if have is None or have[0].shape[0] < rows:
        have = cache[key] = (torch.empty(rows, vocab, dtype=dtype, device=device),
                             None if dtype == torch.float32 else torch.empty(F32_ROWS, vocab, device=device))
    return have[0][:rows], None if have[1] is None else have[1][:f32_rows]


def _matmul_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def _chunked_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                grad_h: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token cross-entropies [n] (fp32) of `hidden @ weight.T`, one chunk of logits at a time and in place (one
    chunk x vocabulary buffer). With `grad_h`, also write each token's d(CE)/d(hidden) into its row of it from the
    chunk's softmax.

    The matmuls run in autocast's dtype (as F.linear under autocast would), written into reused buffers."""
    n = targets.numel()
    out = torch.empty(n, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return out
    dtype = _matmul_dtype(hidden)
    low, f32 = _logit_buffers(min(chunk_size, n), weight.shape[0], dtype, hidden.device)
    w = weight.to(dtype)
    w32 = weight.float() if grad_h is not None and dtype == torch.float16 else None
    for s in range(0, n, chunk_size):
        h, t = hidden[s:s + chunk_size], targets[s:s + chunk_size]
        rows = t.numel()
        torch.mm(h.to(dtype), w.t(), out=low[:rows])
        step = rows if f32 is None else f32.shape[0]
        for a in range(0, rows, step):  # the fp32 softmax a block of rows at a time (fp32: the whole chunk)
            b = min(a + step, rows)
            logits = low[a:b] if f32 is None else f32[:b - a].copy_(low[a:b])
            picked = logits.gather(1, t[a:b, None])
            top = logits.amax(dim=1, keepdim=True)
            denom = logits.sub_(top).exp_().sum(dim=1, keepdim=True)
            out[s + a:s + b] = (top + denom.log() - picked).squeeze(1)  # log-sum-exp minus the target's logit
            if grad_h is None:
                continue
            g = logits.div_(denom)  # softmax
            g[torch.arange(b - a, device=t.device), t[a:b]] -= 1.0  # d(CE) / d(logits)
            if w32 is not None:
                # fp16 (with a GradScaler): small softmax gradients would underflow before the loss scale
                # reaches them in backward, so this product stays in fp32 (autocast would make it fp16)
                with torch.autocast(hidden.device.type, enabled=False):
                    grad_h[s + a:s + b] = torch.mm(g, w32)
            elif f32 is not None:  # bf16: the gradient rounded to bf16 (as autocast would) into the low buffer
                low[a:b].copy_(g)
        if grad_h is not None and w32 is None:
            grad_h[s:s + rows] = torch.mm(low[:rows], w)
    return out


class _FrozenHeadCE(torch.autograd.Function):
    """`_chunked_ce` for a frozen `weight` under autograd: d(CE)/d(hidden) is made in forward while each chunk's
    logits exist, and backward only scales it by each token's incoming gradient. Versus recomputing each chunk
    under checkpoint: one head matmul and one softmax pass fewer per trained token, and no logits kept."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        autocast = torch.is_autocast_enabled(hidden.device.type)
        grad_h = torch.empty(hidden.shape, dtype=torch.float32 if autocast else hidden.dtype, device=hidden.device)
        per_token = _chunked_ce(hidden, weight, targets, chunk_size, grad_h)
        ctx.save_for_backward(grad_h)
        ctx.hidden_dtype = hidden.dtype
        return per_token

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return (grad_h.float() * grad_out[:, None].float()).to(ctx.hidden_dtype), None, None, None


def _plain_head(head: nn.Module) -> bool:
    """A plain local nn.Linear head whose weight can be read directly (a peft wrapper, a weight sharded by FSDP2 as
    a DTensor or partitioned by ZeRO-3 goes through the module call instead)."""
    return (type(head) is nn.Linear and head.bias is None and type(head.weight) in (torch.Tensor, nn.Parameter)
            and not hasattr(head.weight, "ds_id"))  # DeepSpeed ZeRO-3 gathers it only in head's call


def _own_head(config) -> bool:
    """Models whose head post-processes logits (Gemma 2's soft-capping, Cohere's logit_scale, Granite's
    logits_scaling): their loss goes through the model's own forward."""
    return bool(getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None)
                or getattr(config, "logits_scaling", 1.0) not in (None, 1.0))


def _fused_head_ok(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> bool:
    return (lever_enabled("fused_head") and _plain_head(head) and targets.numel() > 0
            and not head.weight.requires_grad and hidden.requires_grad)


class CausalLMLoss(nn.Module):
    """Wraps a (peft) causal LM; forward returns (loss_sum, num_tokens). DDP/FSDP wrap this module."""

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        base = _base(self.model)
        decoder, head = base.get_decoder(), base.get_output_embeddings()
        if _own_head(base.config):  # their own head, still without storing logits for untrained tokens
            return self._fallback(input_ids, labels, attention_mask, position_ids)
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                      **packed_kwargs(position_ids, input_ids.shape[0]))
        hidden = out.last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        hidden, targets = hidden[keep], targets[keep]
        count = torch.tensor(targets.numel(), device=input_ids.device)
        if _plain_head(head) and not torch.is_grad_enabled():  # evaluation: one in-place logits buffer per chunk
            return _chunked_ce(hidden, head.weight, targets, self.chunk_size).sum(), count
        if _fused_head_ok(head, hidden, targets):
            return _FrozenHeadCE.apply(hidden, head.weight, targets, self.chunk_size).sum(), count
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, targets.numel(), self.chunk_size):
            h, t = hidden[start:start + self.chunk_size], targets[start:start + self.chunk_size]
            if torch.is_grad_enabled():
                total = total + checkpoint(_head_loss, head, h, t, use_reentrant=False)
            else:
                total = total + _head_loss(head, h, t)
        if targets.numel() == 0:  # keep the graph connected so DDP sees every parameter used
            total = total + 0.0 * hidden.sum()
        return total, count

    def _fallback(self, input_ids, labels, attention_mask, position_ids):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).logits[:, :-1]
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        loss = F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")
        return loss, keep.sum()


def autocast_for(device_type: str, dtype_name: str) -> Callable:
    """The one autocast policy of training and evaluation: matmuls in bf16/fp16, fp32 weights kept as loaded."""
    if dtype_name == "fp32":
        return nullcontext
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    return lambda: torch.autocast(device_type, dtype=dtype)


@torch.no_grad()
def eval_loss(loss_fn: CausalLMLoss, examples: list[dict], batch_size: int, pad_id: int, autocast,
              device: torch.device | str = "cpu", max_tokens: int = 0) -> tuple[float, int]:
    """Token-weighted mean loss over `examples` (padded batches of at most `batch_size` records and, when
    `max_tokens`, at most that many tokens with padding, one record at least; identical masking to training).

    The one eval loss: training's evaluations and `tunelab eval` perplexity both call it, with the same autocast.
    Training under training.batch_tokens passes its pass size as `max_tokens`, so that evaluating holds no more
    than a training pass (larger padded batches had made the run's peak memory there).
    """
    from tunelab.data.batching import collate_padded

    was_training = loss_fn.training
    loss_fn.eval()
    total, count = 0.0, 0
    for batch_examples in _eval_batches(examples, batch_size, max_tokens):
        batch = {key: v.to(device) for key, v in collate_padded(batch_examples, pad_id).items()}
        with autocast():
            s, n = loss_fn(**batch)
        total += float(s)
        count += int(n)
    loss_fn.train(was_training)
    return (total / count if count else float("nan")), count


def _eval_batches(examples: list[dict], batch_size: int, max_tokens: int) -> list[list[dict]]:
    """`examples` shortest first, in batches of at most `batch_size` and (when set) `max_tokens` padded tokens."""
    batches: list[list[dict]] = []
    for ex in sorted(examples, key=lambda e: len(e["input_ids"])):
        last = batches[-1] if batches else None
        # shortest first: the new record is the batch's longest, so the padded size is (records) x its length
        if last and len(last) < batch_size and (not max_tokens or (len(last) + 1) * len(ex["input_ids"]) <= max_tokens):
            last.append(ex)
        else:
            batches.append([ex])
    return batches


# ---------------------------------------------------------------- per-sequence log-probabilities (preference stages)


def _target_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for each row of `hidden`, in fp32: the target's logit minus the log-sum-exp of its row."""
    logits = head(hidden).float()
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=1)


def _counted(input_ids: torch.Tensor, groups: torch.Tensor, position_ids: torch.Tensor | None):
    """(flat index of the position whose output predicts each counted token, the token, its group).

    A token is predicted by the one before it, except the first of a branch (a position that jumps back to p > 0,
    see tunelab.model.attention), which continues the first p tokens of its record: the p-th of them predicts it.
    A record's first token (position 0) and the row's first are never counted."""
    rows, length = input_ids.shape
    flat = torch.arange(rows * length, device=input_ids.device).view(rows, length)
    source = flat - 1
    groups = groups.clone()
    groups[:, 0] = -1
    if position_ids is not None:
        first = position_ids == 0
        groups = groups.masked_fill(first, -1)
        branch = torch.zeros_like(first)
        branch[:, 1:] = (position_ids[:, 1:] != position_ids[:, :-1] + 1) & ~first[:, 1:]
        if bool(branch.any()):
            record = torch.cummax(torch.where(first, flat, torch.zeros_like(flat)), dim=1).values
            source = torch.where(branch, record + position_ids - 1, source)
    keep = groups >= 0
    return source[keep], input_ids[keep], groups[keep]


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, groups: torch.Tensor, n_groups: int,
                   position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                   chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of token groups, never holding more than one chunk of vocabulary logits.

    `groups[b, t] = g >= 0` adds log p(input_ids[b, t] | the tokens it follows) to group g (-1: not counted);
    position 0 of a record is never a target. Preference stages make one group per answer (chosen i, rejected i)
    of a packed row, the two answers of a pair as branches of one prompt where the model's attention reads
    branches (`tunelab.model.attention`). Returns (sum of log-probs per group in fp32, tokens per group). With
    gradients enabled and a frozen head, each token's gradient is made while its chunk's logits exist
    (`_FrozenHeadCE`); a trained head's chunks are recomputed in backward (checkpoint) instead.
    """
    base = _base(model)
    source, targets, index = _counted(input_ids, groups, position_ids)
    own_head = _own_head(base.config)
    if ((own_head or not branches_supported(base)) and position_ids is not None and input_ids.shape[0] == 1
            and any(pe > ps for _, _, ps, pe in segments(position_ids[0]))):
        raise ValueError("this row shares prompts between answers (branches), which only tunelab's packed "
                         "attention over the decoder reads correctly; collate without shared prompts for this model")
    if own_head:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits
        logits = logits.reshape(-1, logits.shape[-1])[source].float()
        per_token = logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=1)
    else:
        out = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False, **packed_kwargs(position_ids, input_ids.shape[0]))
        hidden = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])[source]
        head = base.get_output_embeddings()
        if _plain_head(head) and not torch.is_grad_enabled():
            per_token = -_chunked_ce(hidden, head.weight, targets, chunk_size)
        elif _fused_head_ok(head, hidden, targets):
            per_token = -_FrozenHeadCE.apply(hidden, head.weight, targets, chunk_size)
        else:
            parts = [checkpoint(_target_logps, head, hidden[s:s + chunk_size], targets[s:s + chunk_size],
                                use_reentrant=False) if torch.is_grad_enabled()
                     else _target_logps(head, hidden[s:s + chunk_size], targets[s:s + chunk_size])
                     for s in range(0, targets.numel(), chunk_size)]
            per_token = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    sums = per_token.new_zeros(n_groups).index_add(0, index, per_token)
    counts = torch.zeros(n_groups, dtype=torch.long, device=input_ids.device).index_add(
        0, index, torch.ones_like(index))
    return sums, counts
