"""The one rule for where generation stops: EOS, the chat template's end-of-turn token and the model's own
generation_config.eos_token_id (a base model's `<|endoftext|>` when the chat tokenizer's EOS is another token).

Used by generation (infer, serve), merge (writes these ids to the merged generation_config, so the merged model
stops where the adapter did) and export (GGUF eos/eot ids, Ollama stop words).
"""

from __future__ import annotations


def end_of_turn_tokens(tokenizer) -> list[str]:
    """The special token(s) the template writes right after an assistant answer (e.g. `<|im_end|>`)."""
    marker = "XQ7ZV"  # a string no template adds by itself
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(convo, tokenize=False)
    except Exception:  # noqa: BLE001 - a template without an assistant turn form: no end-of-turn token known
        return []
    after = text[text.rfind(marker) + len(marker):].lstrip()
    specials = set(tokenizer.all_special_tokens)
    specials |= {str(a) for a in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()
                 if getattr(a, "special", False)}
    for tok in sorted(specials, key=len, reverse=True):  # longest first: <|im_end|> before <|im
        if tok and after.startswith(tok):
            return [tok]
    return []


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """What generation must stop on, in a stable order: the tokenizer's EOS, the template's end-of-turn token,
    then `generation_config.eos_token_id` (an id or a list; the model's GenerationConfig, or None)."""
    ids: list[int] = []

    def add(tid) -> None:
        if tid is not None and int(tid) not in ids:
            ids.append(int(tid))

    add(tokenizer.eos_token_id)
    for tok in end_of_turn_tokens(tokenizer):
        add(tokenizer.convert_tokens_to_ids(tok))
    eos = getattr(generation_config, "eos_token_id", None)
    for tid in [eos] if isinstance(eos, int) else eos or []:
        add(tid)
    return ids
