"""Batched greedy generation for the generation metrics.

Uses `tunelab.infer.generate` when it is available (one generation path for infer, serve and eval); otherwise a
minimal equivalent: the chat template with the generation prompt, left padding, greedy decoding, stopping at the
template's end-of-turn tokens.
"""

from __future__ import annotations

from typing import Any, Sequence


def generate_answers(model, tokenizer, conversations: Sequence[list[dict[str, Any]]], *, max_new_tokens: int = 64,
                     batch_size: int = 8) -> list[str]:
    try:
        from tunelab.infer import generate
    except ImportError:
        generate = None
    if generate is not None:
        return list(generate(model, tokenizer, list(conversations), max_new_tokens=max_new_tokens,
                             batch_size=batch_size))
    return greedy_generate(model, tokenizer, conversations, max_new_tokens=max_new_tokens, batch_size=batch_size)


def greedy_generate(model, tokenizer, conversations: Sequence[list[dict[str, Any]]], *, max_new_tokens: int = 64,
                    batch_size: int = 8) -> list[str]:
    import torch

    from tunelab.data.template import render
    from tunelab.model.stop_tokens import stop_token_ids

    texts = [render(tokenizer, list(msgs), add_generation_prompt=True) for msgs in conversations]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together: less padding
    out: list[str] = [""] * len(texts)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))  # serve's and merge's rule
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # decoder-only: pad on the left
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(device)
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     eos_token_id=stop_ids, pad_token_id=pad_id)
                new = gen[:, enc["input_ids"].shape[1]:]
                for i, row in zip(idx, new):
                    out[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out
