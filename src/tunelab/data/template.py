"""Chat-template rendering and loss masking for the canonical conversation form.

A canonical record is ``{"messages": [{"role": "system|user|assistant|tool", "content": str}, ...]}`` with an
optional ``"tools"`` entry. The tokenizer's own chat template renders it (any template, nothing hard-coded); the
trained spans are found by rendering the conversation up to each assistant turn, so each span covers the
assistant's content *and* the template's end-of-turn token(s) — the model learns to stop. An assistant turn
marked ``"train": false`` (its data gave it weight 0, see `tunelab.data.formats`) is context, like a user turn.

    enc = encode_record(tokenizer, record["messages"], max_length=512)
    enc.input_ids, enc.labels   # labels are -100 outside the trained spans (unshifted, HF convention)

The rendered text is tokenised as a whole, so a message whose content holds one of the tokenizer's special tokens
as text (``<|im_end|>``, ``<|im_start|>``...) would get that control token, not the characters: a record saying
``<|im_end|>`` would teach the model to end its turn there, and a chat message could open a system turn of its
own. `find_control_tokens` finds them; training (`encode_record`), serve and infer refuse such a conversation.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tunelab.errors import TunelabError

IGNORE_INDEX = -100


class TemplateError(TunelabError, ValueError):
    """The chat template cannot render this conversation in a way we can mask safely."""


class RecordRejected(ValueError):
    """A record that must not be trained; `kind`: the reason's code in prepare's report (nothing_to_train,
    too_long, control_token)."""

    def __init__(self, reason: str, kind: str = "nothing_to_train"):
        super().__init__(reason)
        self.kind = kind


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    eos_appended: bool = False
    spans: list[tuple[int, int]] = field(default_factory=list)  # trained token spans [start, end)

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def render(tokenizer, messages: list[dict[str, Any]], tools: Any = None, add_generation_prompt: bool = False) -> str:
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)


def is_trained(message: dict[str, Any]) -> bool:
    """Whether an assistant turn carries loss: not when its data gave it weight 0 (``"train": false``)."""
    return message.get("train", True) is not False


def trained_turns(messages: list[dict[str, Any]], train_on: str = "assistant") -> list[int]:
    """The indexes of the turns the loss covers: the assistant turns that carry loss (`is_trained`), only the last
    assistant turn for last_assistant (none when that one has weight 0), every turn for all."""
    if train_on == "all":
        return list(range(len(messages)))
    idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last_assistant":
        idx = idx[-1:]
    return [i for i in idx if is_trained(messages[i])]


def assistant_char_spans(tokenizer, messages: list[dict[str, Any]], tools: Any = None,
                         train_on: str = "assistant") -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of the assistant turns that carry loss."""
    text = render(tokenizer, messages, tools)
    if train_on == "all":
        return text, [(0, len(text))]
    spans = []
    for i in trained_turns(messages, train_on):
        before = render(tokenizer, messages[:i], tools, add_generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1], tools)
        if not (text.startswith(before) and text.startswith(upto)) or len(upto) <= len(before):
            raise TemplateError(
                f"the chat template renders turn {i + 1} differently inside the whole conversation than on its own "
                "(some templates rewrite earlier turns, e.g. dropping reasoning); use data.train_on=last_assistant")
        spans.append((len(before), len(upto)))
    return text, spans


def _eos_ids(tokenizer) -> set[int]:
    """EOS plus the common end-of-turn tokens the vocabulary has (cached: get_vocab() rebuilds a dict per call)."""
    cached = getattr(tokenizer, "_tunelab_eos_ids", None)
    if cached is not None:
        return cached
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid is not None and tid != tokenizer.unk_token_id:
            ids.add(tid)
    try:
        tokenizer._tunelab_eos_ids = ids
    except AttributeError:  # a tokenizer that refuses new attributes: recompute next time
        pass
    return ids


def _control_tokens(tokenizer) -> tuple[dict[str, int], re.Pattern | None]:
    """The special tokens by their text and a pattern that finds them (cached per tokenizer, as `_eos_ids`)."""
    cached = getattr(tokenizer, "_tunelab_control_tokens", None)
    if cached is not None:
        return cached
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    specials = {str(t): int(i) for i, t in added.items() if getattr(t, "special", False) and str(t)}
    for tok in getattr(tokenizer, "all_special_tokens", None) or ():
        if tok:
            specials.setdefault(tok, int(tokenizer.convert_tokens_to_ids(tok)))
    # longest first, so that of two tokens where one starts the other the longer is reported
    pattern = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))) if specials \
        else None
    try:
        tokenizer._tunelab_control_tokens = (specials, pattern)
    except AttributeError:  # a tokenizer that refuses new attributes: recompute next time
        pass
    return specials, pattern


def special_tokens(tokenizer) -> dict[str, int]:
    """The tokenizer's special tokens by their text (``all_special_tokens`` and the added tokens marked special):
    the ones that tokenising a text matches as control tokens, and that decoding leaves out."""
    return _control_tokens(tokenizer)[0]


# Why a control token in a message is refused, in the words every refusal uses.
CONTROL_TOKEN_WHY = "it would be read as the control token (e.g. ending the turn), not as text"


def find_control_tokens(tokenizer, messages: list[dict[str, Any]],
                        tools: Any = None) -> list[tuple[int | None, str]]:
    """(message index, token) for each special token of `tokenizer` that a message holds as text (in its content or
    its tool calls' names and arguments), in message order, each token once per message; (None, token) for the
    `tools` schemas the template renders into the prompt. Empty when the conversation is safe to render."""
    pattern = _control_tokens(tokenizer)[1]
    if pattern is None:
        return []
    found: list[tuple[int | None, str]] = []
    for i, m in enumerate(messages):
        texts = _texts([m.get("content"), m.get("tool_calls")]) if isinstance(m, dict) else ()
        found += [(i, tok) for tok in dict.fromkeys(t for text in texts for t in pattern.findall(text))]
    in_tools = dict.fromkeys(t for text in _texts(tools) for t in pattern.findall(text))
    if in_tools and _renders_tools(tokenizer, messages, tools):  # a template that leaves tools out never reads them
        found += [(None, tok) for tok in in_tools]
    return found


def _renders_tools(tokenizer, messages: list[dict[str, Any]], tools: Any) -> bool:
    try:
        return render(tokenizer, messages, tools) != render(tokenizer, messages)
    except Exception:  # noqa: BLE001 - whatever the template raises is reported where the record is encoded
        return True


def _texts(value: Any) -> Iterator[str]:
    """Every string in a JSON-like value (keys too: a template renders a schema's property names)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _texts(k)
            yield from _texts(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _texts(v)


def control_token_reason(found: list[tuple[int | None, str]], messages: list[dict[str, Any]]) -> str:
    """`find_control_tokens`'s findings as one line: which turn (1-based, with its role) holds which token."""
    by_turn: dict[int | None, list[str]] = {}
    for i, tok in found:
        by_turn.setdefault(i, []).append(repr(tok))
    where = "; ".join((f"turn {i + 1} ({messages[i].get('role')}) holds " if i is not None else "the tools hold ")
                      + ", ".join(toks) for i, toks in by_turn.items())
    kind = "a control token" if len(found) == 1 else "control tokens"
    return f"{where} ({kind} of the tokenizer, as text): {CONTROL_TOKEN_WHY}"


def encode_record(tokenizer, messages: list[dict[str, Any]], *, tools: Any = None, max_length: int | None = None,
                  train_on: str = "assistant", overflow: str = "truncate") -> Encoded:
    """Tokenise one conversation and build its labels. Raises RecordRejected when nothing would be trained, or
    when a message holds a control token as text (`find_control_tokens`)."""
    found = find_control_tokens(tokenizer, messages, tools)
    if found:
        raise RecordRejected(control_token_reason(found, messages), "control_token")
    text, spans = assistant_char_spans(tokenizer, messages, tools, train_on)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    tok_spans = []
    for start_c, end_c in spans:
        first = last = None
        for t, (s, e) in enumerate(offsets):
            if start_c <= s < end_c:
                labels[t] = ids[t]
                first = t if first is None else first
                last = t
        if first is not None:
            tok_spans.append((first, last + 1))
    eos_appended = False
    if train_on != "all" and tok_spans and tokenizer.eos_token_id is not None:
        s, e = tok_spans[-1]
        if not set(ids[s:e]) & _eos_ids(tokenizer):
            # The template closes assistant turns with no stop token (some base-model templates): add EOS so
            # the model learns to stop, and train on it.
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
            tok_spans[-1] = (s, len(ids))
            eos_appended = True
    if not tok_spans:
        raise RecordRejected("no assistant answer to train on (every label would be masked)")
    truncated = False
    if max_length is not None and len(ids) > max_length:
        if overflow == "drop":
            raise RecordRejected(f"{len(ids)} tokens is longer than data.max_length={max_length} (overflow=drop)",
                                 "too_long")
        if overflow == "truncate":
            ids, labels, truncated = ids[:max_length], labels[:max_length], True
            tok_spans = [(s, min(e, max_length)) for s, e in tok_spans if s < max_length]
            if not tok_spans or all(x == IGNORE_INDEX for x in labels):
                raise RecordRejected(f"nothing left to train after truncation to data.max_length={max_length} "
                                     "(the prompt alone fills it); raise max_length or shorten the prompt")
    return Encoded(ids, labels, truncated, eos_appended, tok_spans)


def prompt_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    """Split a conversation into (the prompt up to its last assistant turn, that turn's text as reference)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant":
            return messages[:i], messages[i]["content"]
    return messages, None


def show_trained_span(tokenizer, enc: Encoded, open_mark: str = "[[", close_mark: str = "]]") -> str:
    """Decode a record with the trained spans wrapped in markers, so a person sees what the loss covers."""
    out, pos = [], 0
    for s, e in enc.spans:
        out.append(tokenizer.decode(enc.input_ids[pos:s]))
        out.append(open_mark + tokenizer.decode(enc.input_ids[s:e]) + close_mark)
        pos = e
    out.append(tokenizer.decode(enc.input_ids[pos:]))
    return "".join(out)
