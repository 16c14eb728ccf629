"""Perplexity over the trained tokens, with exactly the masking and loss of training.

Each record is encoded by `encode_record` with the run's `max_length`, `train_on` and `overflow` (raw text of a pt
run: every token of each `max_length` piece, `tunelab.data.text.encode_text`), and the loss is
`CausalLMLoss` — the same function training optimises — summed over every trained token and divided by their
count (token-weighted, not an average of per-record means). So on the same records this is exp(eval loss) of
training, to floating-point rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence


@dataclass
class PerplexityResult:
    loss: float  # mean cross-entropy (nats) per trained token
    perplexity: float
    tokens: int  # trained tokens scored
    records: int  # records scored
    rejected: list[dict[str, Any]]  # records not scored (nothing to train, as training; the template refuses it)

    @property
    def as_metrics(self) -> dict[str, float]:
        return {"perplexity": self.perplexity, "eval_loss": self.loss, "eval_tokens": self.tokens}


def encode_for_loss(tokenizer, records: Sequence[dict[str, Any]], *, max_length: int, train_on: str,
                    overflow: str = "truncate") -> tuple[list[dict[str, list[int]]], list[dict[str, Any]]]:
    """Encoded examples ({input_ids, labels}), and the records that cannot be scored: each with its index, source,
    location and reason."""
    from tunelab.data.prepare import encode_or_refuse, refused
    from tunelab.data.template import RecordRejected, encode_record

    examples, rejected = [], []
    for i, rec in enumerate(records):
        if "text" in rec and "messages" not in rec:  # raw text (stage pt): its pieces, exactly as training's eval
            from tunelab.data.text import encode_text

            pieces, _ = encode_text(tokenizer, rec["text"], max_length)
            examples += [{"input_ids": p, "labels": list(p)} for p in pieces]
            continue
        try:
            enc = encode_or_refuse(encode_record, tokenizer, rec["messages"], tools=rec.get("tools"),
                                   max_length=max_length, train_on=train_on, overflow=overflow)
        except RecordRejected as e:
            rejected.append({"index": i, **refused(rec, e)})
            continue
        examples.append({"input_ids": enc.input_ids, "labels": enc.labels})
    return examples, rejected


def perplexity(model, tokenizer, records: Sequence[dict[str, Any]], *, max_length: int = 512,
               train_on: str = "assistant", overflow: str = "truncate", batch_size: int = 8,
               chunk_size: int = 1024, autocast: Callable | None = None) -> PerplexityResult:
    """`autocast`: training's policy for the precision the model computes in (default: from its weights' dtype)."""
    from tunelab.model.loss import CausalLMLoss, autocast_for, eval_loss

    examples, rejected = encode_for_loss(tokenizer, records, max_length=max_length, train_on=train_on,
                                         overflow=overflow)
    device = next(model.parameters()).device
    if autocast is None:
        autocast = autocast_for(device.type, compute_dtype_name(model))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if records and not examples:  # a perplexity of nan written over an earlier result would say nothing
        from tunelab.errors import TunelabError

        first = f"; the first, {rejected[0]['source']} {rejected[0]['location']}: {rejected[0]['reason']}" \
            if rejected else ""
        raise TunelabError(f"perplexity: none of the {len(records)} records has a token to score at "
                           f"max_length={max_length} (train_on={train_on}, overflow={overflow}){first}")
    loss, count = eval_loss(CausalLMLoss(model, chunk_size=chunk_size), examples, batch_size, pad_id, autocast,
                            device)
    return PerplexityResult(loss=loss, perplexity=math.exp(loss) if count else float("nan"), tokens=count,
                            records=len(examples), rejected=rejected)


def compute_dtype_name(model) -> str:
    """bf16 / fp16 / fp32: the dtype of the model's (base) weights, which training computed in."""
    import torch

    dtype = model.get_input_embeddings().weight.dtype
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
