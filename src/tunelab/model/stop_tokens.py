"""The one rule for where generation stops: EOS plus the chat template's end-of-turn token.

Used by generation (infer, serve, evaluate), merge (generation_config) and export (GGUF / Ollama stop words).
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


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus the template's end-of-turn token ids, in a stable order: what generation must stop on."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    for tok in end_of_turn_tokens(tokenizer):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid is not None and tid not in ids:
            ids.append(int(tid))
    return ids
