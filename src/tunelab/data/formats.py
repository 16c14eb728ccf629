"""Turn one raw record (Alpaca, ShareGPT, OpenAI messages, LLaMA-Factory v1) into the canonical conversation.

    conv = normalize(record, fmt="auto", column_map=None, system_prompt=None, notes=Counter())
    conv.messages   # [{"role": "system|user|assistant|tool", "content": str}, ...]
    conv.tools      # list of tool schemas or None
    conv.warnings   # [(category, message)] kept with the record (e.g. tool result without a call)

A record that cannot be trained raises ``Invalid(category, reason)`` with a reason a person understands.
Every normalisation (role alias mapped, whitespace trimmed, tools parsed from a JSON string...) is counted in
``notes`` so the report can show it.

Decisions worth knowing:
- What reaches the conversation must be valid text (`tunelab.data.values`): a lone surrogate, a control
  character, NaN/Infinity or an integer beyond 64 bits used as text rejects the record, naming the field or
  turn.
  Fields that are not read are not checked.
- A record's ``system`` field is the conversation's first turn, whatever the format; a conversation that also
  has a system turn is rejected (``ambiguous_prompt``, as for preference records) rather than losing one.
- Tool calls stay text. A ShareGPT ``function_call`` turn, OpenAI ``tool_calls`` and v1 ``tool_call`` blocks
  become an assistant turn whose content is the call's JSON; ``observation``/``tool`` turns become ``tool``.
- v1 ``reasoning`` blocks become ``<think>...</think>`` before the answer.
- A turn's ``loss_weight`` (LLaMA-Factory) or ``weight`` (axolotl) of 0 masks an assistant turn: it keeps
  ``"train": false`` and `tunelab.data.template` trains it no more than a user turn. 1 (or none) leaves the rule by
  role; another value, or 1 on a user/system/tool turn (which tunelab never trains), rejects the record.
- Preference data is used for supervised fine-tuning only where that is safe: a DPO record (``chosen`` /
  ``rejected``, or v1 ``chosen_messages``) becomes its prompt plus the *chosen* answer (counted as a warning);
  a KTO record (``label``, else ``kto_tag``, as the kto stage reads them) labelled ``true`` is kept; one labelled
  ``false`` (an undesirable answer) is rejected, and so is one labelled ``0``/``1``/``"false"``..., which the kto
  stage refuses too (a ``label`` that is no such value, e.g. a class name, is not read).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tunelab.data.template import is_trained
from tunelab.data.values import BigNumber, number_problem, text_problem, value_problem

FORMATS = ("auto", "alpaca", "sharegpt", "openai")
# Keys a column map may rename: record level, then turn level (inside conversations/messages).
RECORD_KEYS = ("instruction", "input", "output", "system", "history", "conversations", "messages", "tools")
TURN_KEYS = ("role", "content")

USER, ASSISTANT, SYSTEM, TOOL, CALL = "user", "assistant", "system", "tool", "call"
ROLE_ALIASES = {
    "user": USER, "human": USER, "prompter": USER,
    "assistant": ASSISTANT, "gpt": ASSISTANT, "chatgpt": ASSISTANT, "bing": ASSISTANT, "bard": ASSISTANT,
    "model": ASSISTANT, "bot": ASSISTANT,
    "system": SYSTEM, "developer": SYSTEM,
    "function_call": CALL, "tool_call": CALL,
    "observation": TOOL, "tool": TOOL, "function": TOOL, "ipython": TOOL, "tool_response": TOOL,
}
_PLACEHOLDER = re.compile(r"\{\{\s*[A-Za-z_]\w*\s*\}\}")


class Invalid(ValueError):
    """This record cannot be used; ``category`` groups reasons in the report, ``reason`` is for a person."""

    def __init__(self, category: str, reason: str):
        super().__init__(reason)
        self.category, self.reason = category, reason
        self.format: str | None = None  # the record's format, when it was known before the problem was found


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    tools: list[Any] | None = None
    format: str = "?"
    warnings: list[tuple[str, str]] = field(default_factory=list)


def _type_name(v: Any) -> str:
    return {dict: "an object", list: "a list", bool: "true/false", int: "a number", float: "a number",
            type(None): "null"}.get(type(v), type(v).__name__)


def _clean(s: str, notes: Counter) -> str:
    if "\r" in s:
        s = s.replace("\r\n", "\n")
        notes["CRLF inside text → LF"] += 1
    t = s.strip()
    if t is not s and t != s:
        notes["whitespace trimmed"] += 1
    return t


def _number_text(v: int | float | BigNumber, what: str, notes: Counter, note: str | None = None) -> str:
    """A number where text belongs (an answer of 42): kept as its text and counted, unless it is no number."""
    problem = number_problem(v)
    if problem:
        raise Invalid("invalid_number", f"{what} {problem}")
    notes[note or f"number in {what} → text"] += 1
    return str(v)


def _valid_text(v: str, what: str) -> str:
    problem = text_problem(v)
    if problem:
        raise Invalid("invalid_text", f"{what}: {problem}")
    return v


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, BigNumber)) and not isinstance(v, bool)


def _text(record: dict, key: str, notes: Counter, required: bool, what: str | None = None) -> str:
    """A text field, trimmed; Invalid when required and missing/empty or when it is not text."""
    what = what or f"field '{key}'"
    v = record.get(key)
    if v is None:
        if required:
            raise Invalid("missing_field", f"missing {what}" if key not in record else f"{what} is null")
        return ""
    if _is_number(v):
        v = _number_text(v, what, notes)
    elif not isinstance(v, str):
        raise Invalid("wrong_type", f"{what} must be text, got {_type_name(v)}")
    v = _clean(_valid_text(v, what), notes)
    if required and not v:
        raise Invalid("empty_field", f"{what} is empty")
    return v


def _maybe_json(v: Any, what: str, notes: Counter) -> Any:
    """List-valued fields sometimes arrive as JSON strings (CSV cells, the glaive `tools`): parse them."""
    if isinstance(v, str) and v.strip()[:1] in ("[", "{"):
        try:
            v = json.loads(v)
        except ValueError as e:
            raise Invalid("invalid_json", f"{what} is a string that is not valid JSON ({e})") from None
        notes[f"{what} parsed from a JSON string"] += 1
    return v


def _tools(record: dict, notes: Counter) -> list[Any] | None:
    v = record.get("tools")
    if v is None or v == "" or v == []:
        return None
    v = _maybe_json(v, "tools", notes)
    if isinstance(v, dict):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(t, dict) for t in v):
        raise Invalid("wrong_type", f"'tools' must be a list of tool schemas (objects), got {_type_name(v)}")
    problem = value_problem(v, "tools")  # the schemas are rendered into the prompt
    if problem:
        raise Invalid(*problem)
    return v or None


# ---------------------------------------------------------------- formats


def _alpaca(rec: dict, notes: Counter) -> list[dict[str, str]]:
    if "instruction" not in rec and "input" not in rec:
        raise Invalid("missing_field", "missing field 'instruction'")
    instruction = _text(rec, "instruction", notes, required=False)
    inp = _text(rec, "input", notes, required=False)
    if not instruction and not inp:
        raise Invalid("empty_field", "field 'instruction' is empty (and there is no 'input')")
    output = _text(rec, "output", notes, required=True)
    msgs: list[dict[str, str]] = []
    system = _text(rec, "system", notes, required=False)
    if system:
        msgs.append({"role": SYSTEM, "content": system})
    history = _maybe_json(rec.get("history"), "history", notes) or []
    if not isinstance(history, list):
        raise Invalid("wrong_type", f"'history' must be a list of [prompt, answer] pairs, got {_type_name(history)}")
    for i, pair in enumerate(history, 1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise Invalid("wrong_type", f"history item {i} must be a [prompt, answer] pair of texts")
        q = _clean(_valid_text(pair[0], f"history item {i} prompt"), notes)
        a = _clean(_valid_text(pair[1], f"history item {i} answer"), notes)
        if not q or not a:
            raise Invalid("empty_field", f"history item {i} has an empty {'prompt' if not q else 'answer'}")
        msgs += [{"role": USER, "content": q}, {"role": ASSISTANT, "content": a}]
    prompt = f"{instruction}\n\n{inp}" if instruction and inp else instruction or inp
    msgs += [{"role": USER, "content": prompt}, {"role": ASSISTANT, "content": output}]
    return msgs


def _blocks(content: list, j: int, notes: Counter) -> tuple[str, bool]:
    """OpenAI / LLaMA-Factory v1 content blocks → (text, has a tool call)."""
    parts, call = [], False
    for b in content:
        if isinstance(b, str):
            parts.append(b)
            continue
        if not isinstance(b, dict):
            raise Invalid("wrong_type", f"turn {j}: a content block must be an object, got {_type_name(b)}")
        kind = b.get("type", "text")
        value = b.get("text", b.get("value"))
        if kind not in ("text", "reasoning", "tool_call") or not isinstance(value, str):
            raise Invalid("wrong_type", f"turn {j}: content block of type '{kind}' is not supported "
                                        "(tunelab prepares text conversations)")
        value = value.strip()
        if kind == "reasoning":
            value = f"<think>\n{value}\n</think>"
        elif kind == "tool_call":
            call = True
        parts.append(value)
    notes["content blocks joined into text"] += 1
    return "\n".join(p for p in parts if p), call


def _tool_calls_text(calls: Any, j: int) -> str:
    if not isinstance(calls, list):
        raise Invalid("wrong_type", f"turn {j}: 'tool_calls' must be a list")
    out = []
    for c in calls:
        fn = c.get("function", c) if isinstance(c, dict) else None
        if not isinstance(fn, dict) or "name" not in fn:
            raise Invalid("wrong_type", f"turn {j}: a tool call needs a function name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except (ValueError, RecursionError):
                pass
        problem = value_problem({"name": fn["name"], "arguments": args}, f"turn {j} tool call")
        if problem:  # the call becomes trained text: a NaN argument would be learnt as "NaN"
            raise Invalid(*problem)
        out.append(json.dumps({"name": fn["name"], "arguments": args}, ensure_ascii=False))
    return "\n".join(out)


def _turns(turns: Any, key: str, rec_map: dict[str, str], notes: Counter) -> tuple[list[dict[str, str]], list[str]]:
    """Conversation turns → canonical messages and the raw kind of each (user/assistant/system/tool/call)."""
    turns = _maybe_json(turns, f"'{key}'", notes)
    if not isinstance(turns, list):
        raise Invalid("wrong_type", f"'{key}' must be a list of turns, got {_type_name(turns)}")
    role_key, content_key = rec_map.get("role"), rec_map.get("content")
    msgs, kinds = [], []
    for j, t in enumerate(turns, 1):
        if not isinstance(t, dict):
            raise Invalid("wrong_type", f"turn {j} must be an object with a role and a text, got {_type_name(t)}")
        role = t.get(role_key) if role_key else t.get("from", t.get("role"))
        if not isinstance(role, str):
            raise Invalid("missing_field", f"turn {j} has no role ('from' or 'role')")
        _valid_text(role, f"turn {j} role")  # strip() would quietly drop a form feed: say the data is damaged
        kind = ROLE_ALIASES.get(role.strip().lower())
        if kind is None:
            raise Invalid("unknown_role", f"turn {j} has an unknown role {role[:40]!r} (known: "
                                          f"{', '.join(sorted(ROLE_ALIASES))})")
        canon = ASSISTANT if kind == CALL else kind
        if role != canon:
            notes[f"role '{role}' → {canon}"] += 1
        if content_key:
            content = t.get(content_key)
        else:
            content = next((t[k] for k in ("value", "content", "text") if k in t), None)
        call = kind == CALL
        if isinstance(content, list):
            content, call = _blocks(content, j, notes)
            call = call or kind == CALL
        elif _is_number(content):
            content = _number_text(content, f"turn {j} ({canon})", notes, "number in a turn's text → text")
        elif content is not None and not isinstance(content, str):
            raise Invalid("wrong_type", f"turn {j} ({canon}): the text must be a string, got {_type_name(content)}")
        if content:
            _valid_text(content, f"turn {j} ({canon})")
        content = _clean(content or "", notes)
        if t.get("tool_calls"):
            calls = _tool_calls_text(t["tool_calls"], j)
            content = f"{content}\n{calls}" if content else calls
            call = True
        if not content:
            raise Invalid("empty_field", f"turn {j} ({canon}) is empty")
        msgs.append({"role": canon, "content": content})
        if not _trained(t, j, canon) and canon == ASSISTANT:
            msgs[-1]["train"] = False  # template.is_trained: masked like a user turn
            notes["assistant turn with weight 0 → not trained"] += 1
        kinds.append(CALL if call else canon)
    return msgs, kinds


def _trained(turn: dict, j: int, canon: str) -> bool:
    """A turn's LLaMA-Factory `loss_weight` / axolotl `weight`: 0 masks an assistant turn (False), 1 or none keeps
    the rule by role; any other value, or 1 on a turn tunelab never trains, cannot be honoured: Invalid."""
    weights = [(k, turn[k]) for k in ("loss_weight", "weight") if turn.get(k) is not None]
    for k, w in weights:
        if not (_is_number(w) and w in (0, 1)):
            raise Invalid("wrong_type", f"turn {j} ({canon}): '{k}' must be 0 (not trained) or 1, got {w!r} "
                                        "(tunelab trains a token or not, it does not weight it)")
        if w == 1 and canon != ASSISTANT:
            raise Invalid("unsupported_weight", f"turn {j} ({canon}): '{k}' 1 asks to train a {canon} turn; "
                                                "tunelab trains assistant turns only (data.train_on=all trains "
                                                "every token)")
    return all(w == 1 for _, w in weights)


def _detect(rec: dict) -> str:
    if "messages" in rec or "chosen_messages" in rec:
        return "openai"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec or "output" in rec:
        return "alpaca"
    keys = ", ".join(sorted(map(str, rec))[:8]) or "none"
    if set(rec) <= {"text", "id", "meta", "url", "timestamp", "title"} and "text" in rec:
        raise Invalid("unknown_format", "plain pretraining text (a 'text' field), not a conversation: tunelab "
                                        "prepare builds chat fine-tuning data")
    raise Invalid("unknown_format", f"not a recognised record: expected 'instruction'/'output' (Alpaca), "
                                    f"'conversations' (ShareGPT) or 'messages' (OpenAI); found keys: {keys}. "
                                    "Use --map to name your columns, e.g. --map instruction=question,output=answer")


def _kto_label(rec: dict, warnings: list) -> None:
    """A KTO label, read as the kto stage reads it (`label`, else `kto_tag`): true keeps the record as an ordinary
    conversation; false, or a label that is not true/false, rejects it (an undesirable answer must not be learnt).
    A `label` that cannot be a KTO label (a class name, a score) is a field nobody reads."""
    key = "label" if "label" in rec else "kto_tag" if "kto_tag" in rec else None
    v = rec.get(key)
    if key is None or (key == "label" and not isinstance(v, bool) and not _looks_boolean(v)):
        return
    if v is True:
        warnings.append(("kto_label_true_kept", f"KTO record ('{key}' true): kept as an ordinary conversation"))
        return
    why = "labelled false (an undesirable answer)" if v is False else f"whose '{key}' is {v!r}, not true/false"
    raise Invalid("preference_rejected", f"a KTO record {why}: not used for supervised fine-tuning; to train on "
                                         "labelled answers use training.stage=kto (labels true/false)")


def _looks_boolean(v: Any) -> bool:
    if _is_number(v):
        return v in (0, 1)
    return isinstance(v, str) and v.strip().lower() in ("true", "false", "0", "1")


def _preference(rec: dict, warnings: list) -> str | None:
    """Which key holds the conversation of a preference record (v1 `chosen_messages`), or None."""
    if "chosen_messages" in rec:
        warnings.append(("preference_chosen_used", "preference record: trained on the chosen answer only"))
        return "chosen_messages"
    return None


def apply_map(rec: dict, column_map: dict[str, str] | None, record_keys: tuple[str, ...]) -> tuple[dict, dict]:
    """A column map (our name -> the record's column) applied: (the record with its `record_keys` columns renamed,
    the map of turn keys `role` / `content` for `_turns`)."""
    if not column_map:
        return rec, {}
    rename = {src: dst for dst, src in column_map.items() if dst in record_keys and src in rec}
    if rename:
        renamed = {k: v for k, v in rec.items() if k not in rename}
        renamed.update({dst: rec[src] for src, dst in rename.items()})
        rec = renamed
    return rec, {k: v for k, v in column_map.items() if k in TURN_KEYS}


def normalize(rec: Any, fmt: str = "auto", column_map: dict[str, str] | None = None,
              system_prompt: str | None = None, notes: Counter | None = None) -> Conversation:
    """One raw record → a canonical Conversation, or Invalid with the reason."""
    notes = Counter() if notes is None else notes
    if not isinstance(rec, dict):
        raise Invalid("wrong_type", f"a record must be a JSON object, got {_type_name(rec)}")
    stage = _preference_stage(rec) if fmt == "auto" else None
    if stage:
        return _preference_as_sft(rec, stage, column_map, system_prompt, notes)
    rec, turn_map = apply_map(rec, column_map, RECORD_KEYS)
    kind = _detect(rec) if fmt == "auto" else fmt
    try:
        return _normalize_as(kind, rec, turn_map, system_prompt, notes)
    except Invalid as e:
        e.format = kind  # counted per format in the report even when rejected (mixed-format files)
        raise


def _preference_stage(rec: dict) -> str | None:
    """"dpo" or "kto" for a preference record in a form the SFT formats do not read (TRL's prompt/chosen/rejected
    and prompt/completion/label, an instruction or messages with chosen/rejected), as the preference stages read
    it; None for the others (ShareGPT pairs, v1 chosen_messages and labelled conversations are read below)."""
    if "conversations" in rec or "output" in rec or _ends_with_answer(rec.get("messages")):
        return None  # an SFT record with its own answer: other columns beside it change nothing
    if "chosen" in rec and "rejected" in rec:
        return "dpo"
    label = rec["label"] if "label" in rec else rec.get("kto_tag")
    if isinstance(label, bool) and "completion" in rec and "messages" not in rec:
        return "kto"  # a label that is no true/false (a class column) is not a KTO label
    return None


def _ends_with_answer(messages: Any) -> bool:
    return isinstance(messages, list) and bool(messages) and isinstance(messages[-1], dict) \
        and messages[-1].get("role") == ASSISTANT


def _preference_as_sft(rec: dict, stage: str, column_map: dict[str, str] | None, system_prompt: str | None,
                       notes: Counter) -> Conversation:
    """A preference record as an SFT conversation: its prompt and chosen answer (a KTO answer only when labelled
    true), read by `tunelab.data.preference` exactly as `--stage dpo` / `kto` would read it."""
    from tunelab.data.preference import normalize_preference

    warnings: list[tuple[str, str]] = []
    if stage == "kto":
        _kto_label(rec, warnings)  # false: rejected, an undesirable answer is not learnt
    else:
        warnings.append(("preference_chosen_used", "preference record: trained on the chosen answer only"))
    try:
        pref = normalize_preference(rec, stage, notes, system_prompt, column_map)
    except Invalid as e:
        e.format = "preference"
        raise
    msgs = pref.messages
    if not any(m["role"] == ASSISTANT and is_trained(m) for m in msgs):
        raise Invalid("nothing_to_train", "every assistant turn has weight 0 (loss_weight / weight): nothing to train")
    return Conversation(msgs, pref.tools, pref.format, pref.warnings + warnings)


def _normalize_as(kind: str, rec: dict, turn_map: dict[str, str], system_prompt: str | None,
                  notes: Counter) -> Conversation:
    warnings: list[tuple[str, str]] = []
    tools = _tools(rec, notes)
    _kto_label(rec, warnings)
    if kind == "alpaca":
        msgs = _alpaca(rec, notes)
        kinds = [m["role"] for m in msgs]
    else:
        key = "messages" if kind == "openai" else "conversations"
        key = _preference(rec, warnings) or key
        if key not in rec:
            raise Invalid("missing_field", f"missing field '{key}' (format {kind})")
        msgs, kinds = _turns(rec[key], key, turn_map, notes)
        _system_field(rec, msgs, kinds, notes)
        chosen = rec.get("chosen")
        if isinstance(chosen, str) and chosen.strip():
            chosen = {"role": ASSISTANT, "content": chosen}
        if isinstance(chosen, dict) and kind == "sharegpt":
            more, more_kinds = _turns([chosen], "chosen", turn_map, notes)
            msgs += more
            kinds += more_kinds
            warnings.append(("preference_chosen_used", "preference record: trained on the chosen answer only"))
    if system_prompt and not (msgs and msgs[0]["role"] == SYSTEM):
        msgs.insert(0, {"role": SYSTEM, "content": system_prompt})
        kinds.insert(0, SYSTEM)
        notes["system prompt added"] += 1
    check_order(kinds, warnings)
    if not any(m["role"] == ASSISTANT and is_trained(m) for m in msgs):
        raise Invalid("nothing_to_train", "every assistant turn has weight 0 (loss_weight / weight): nothing to train")
    for j, m in enumerate(msgs, 1):  # every text checked above where its field is named; this catches the rest
        _valid_text(m["content"], f"turn {j} ({m['role']})")
    if any("{{" in m["content"] and _PLACEHOLDER.search(m["content"]) for m in msgs):
        warnings.append(("template_placeholders", "contains {{placeholder}} text (e.g. {{name}}): replace it "
                                                  "before training or the model learns it literally"))
    return Conversation(msgs, tools, kind, warnings)


def _system_field(rec: dict, msgs: list[dict[str, str]], kinds: list[str], notes: Counter) -> None:
    """The record's `system` field (ShareGPT, OpenAI messages) becomes the first turn; Invalid when the conversation
    has a system turn too, as for preference records: which one is meant is not ours to guess."""
    system = _text(rec, "system", notes, required=False)
    if not system:
        return
    if msgs and msgs[0]["role"] == SYSTEM:
        raise Invalid("ambiguous_prompt", "both a 'system' field and a system turn in the conversation: keep one "
                                          "of them")
    msgs.insert(0, {"role": SYSTEM, "content": system})
    kinds.insert(0, SYSTEM)


def check_order(kinds: list[str], warnings: list[tuple[str, str]]) -> None:
    """Conversation order rules; Invalid for what cannot be trained, a warning for what merely looks odd."""
    if not kinds:
        raise Invalid("order", "the conversation has no turns")
    for j, k in enumerate(kinds, 1):
        prev = kinds[j - 2] if j > 1 else None
        if k == SYSTEM and j > 1:
            raise Invalid("order", f"system turn in the middle of the conversation (turn {j}); a system prompt "
                                   "must be the first turn")
        if prev in (None, SYSTEM) and k != USER and k != SYSTEM:
            raise Invalid("order", f"the conversation starts with the {'assistant' if k != TOOL else 'tool'} "
                                   f"(turn {j}); it must start with the user")
        if k == USER and prev == USER:
            raise Invalid("order", f"two user turns in a row (turns {j - 1} and {j})")
        if k == ASSISTANT and prev in (ASSISTANT, CALL):
            raise Invalid("order", f"two assistant turns in a row (turns {j - 1} and {j})")
        if k == TOOL:
            if prev == USER:
                raise Invalid("order", f"a tool result (turn {j}) follows the user; it must follow a tool call")
            if prev == ASSISTANT:
                warnings.append(("tool_result_without_call", f"turn {j} is a tool result after an assistant turn "
                                                             "that is not a tool call (the call is in plain text?)"))
    if kinds[-1] not in (ASSISTANT, CALL):
        last = {USER: "the user", TOOL: "a tool result", SYSTEM: "the system prompt"}[kinds[-1]]
        raise Invalid("order", f"the conversation ends without an assistant answer (the last turn is {last})")
