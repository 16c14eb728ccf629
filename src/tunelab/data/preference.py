"""Preference records (pairs for dpo / orpo / simpo, labelled answers for kto): normalise, validate, encode.

    rec = normalize_preference(raw, stage="dpo", notes=Counter())   # PreferenceRecord, or Invalid(reason)
    enc = encode_preference(tokenizer, rec.row(), max_length=512, overflow="truncate")
    enc["prompt_ids"], enc["chosen_ids"], enc["rejected_ids"], enc["truncated"]   # kto: completion_ids, label

Forms read (detected per record, like the SFT formats; the turn and text checks are `tunelab.data.formats`'s):

| form | keys |
|---|---|
| LLaMA-Factory pairwise ShareGPT | `conversations` (prompt turns) + `chosen` / `rejected` (one turn each) |
| pairwise Alpaca | `instruction`, `input`, `chosen`, `rejected` (texts) |
| TRL explicit prompt | `prompt` (text or messages) + `chosen` / `rejected` (text or messages) |
| TRL implicit prompt, OpenAI messages | `chosen` / `rejected` as whole conversations (the shared prefix is the prompt); `messages` + `chosen` / `rejected`; LLaMA-Factory v1 `chosen_messages` / `rejected_messages` |
| KTO | `messages` or `conversations` + `label` / `kto_tag` (true/false); TRL `prompt` + `completion` + `label` |

Rejected with a reason: chosen identical to rejected, an empty side (or one without an assistant turn: a
prompt-only record), prompts that differ between the two sides, a prompt in two fields (e.g. both `prompt` and
`messages`), a prompt that does not end with the user, a KTO label that is not true/false (or `label` and `kto_tag`
that disagree), a paired record in a kto run (or the reverse). Turns of weight 0 (`loss_weight` / `weight`) are
context, as in SFT (`_scored`): before an answer's first trained turn they join the prompt; an answer that is all
weight 0, or that has weight 0 after a trained turn, is rejected. A pair longer than `max_length` has its answers
cut (overflow=truncate: counted, and the record says how many tokens were cut), or is rejected (drop); a prompt
that leaves no room for an answer is rejected.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tunelab.data.formats import (ASSISTANT, SYSTEM, USER, Invalid, _text, _tools, _turns, _type_name,
                                  apply_map, check_order)
from tunelab.data.template import is_trained

PAIR_STAGES = ("dpo", "orpo", "simpo")
STAGES = PAIR_STAGES + ("kto",)
# Record keys a column map may rename (`--map chosen=good,rejected=bad`); `role` / `content` rename turn keys.
RECORD_KEYS = ("prompt", "chosen", "rejected", "completion", "label", "instruction", "input", "system",
               "conversations", "messages", "tools")


@dataclass
class PreferenceRecord:
    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]] | None = None  # the answer turns (kto: the completion)
    rejected: list[dict[str, str]] | None = None
    label: bool | None = None  # kto only
    tools: list[Any] | None = None
    format: str = "?"
    warnings: list[tuple[str, str]] = field(default_factory=list)

    @property
    def messages(self) -> list[dict[str, str]]:
        """Prompt + chosen (kto: + completion): what generation metrics and SFT-style views read."""
        return self.prompt + (self.chosen or [])

    def row(self) -> dict[str, Any]:
        if self.label is not None:
            return {"prompt": self.prompt, "completion": self.chosen, "label": self.label,
                    "messages": self.messages, "tools": self.tools}
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected, "messages": self.messages,
                "tools": self.tools}


def _side(rec: dict, key: str, notes: Counter, tmap: dict[str, str]) -> list[dict[str, str]]:
    """One side (chosen / rejected / completion): a text, one turn, or a list of turns."""
    v = rec.get(key)
    if v is None:
        raise Invalid("missing_field", f"missing field '{key}'")
    if isinstance(v, str) or (isinstance(v, (int, float)) and not isinstance(v, bool)):
        return [{"role": ASSISTANT, "content": _text(rec, key, notes, required=True)}]
    if isinstance(v, dict):
        v = [v]
    if not isinstance(v, list):
        raise Invalid("wrong_type", f"'{key}' must be a text, a turn or a list of turns, got {_type_name(v)}")
    if not v:
        raise Invalid("empty_field", f"'{key}' is empty")
    return _turns(v, key, tmap, notes)[0]


def _prompt_turns(rec: dict, key: str, notes: Counter, tmap: dict[str, str]) -> list[dict[str, str]]:
    v = rec.get(key)
    if isinstance(v, str) or v is None:
        return [{"role": USER, "content": _text(rec, key, notes, required=True)}]
    return _turns(v, key, tmap, notes)[0]


def _split_implicit(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Two whole conversations → (shared prompt, chosen answer turns, rejected answer turns)."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    while k and chosen[k - 1]["role"] == ASSISTANT:  # the answers start after the last shared user turn
        k -= 1
    prompt_c, prompt_r = chosen[:k], rejected[:k]
    if not prompt_c or prompt_c != prompt_r:
        raise Invalid("prompt_mismatch", "chosen and rejected do not share a prompt (the conversations differ "
                                         "before their last answer)")
    return prompt_c, chosen[k:], rejected[k:]


def _prompt_key(rec: dict, keys: tuple[str, ...]) -> str | None:
    """The one key of `keys` the record holds its prompt in; Invalid when it has two (one would be ignored)."""
    found = [k for k in keys if k in rec]
    if len(found) > 1:
        raise Invalid("ambiguous_prompt", f"both '{found[0]}' and '{found[1]}' hold a prompt: keep one of them "
                                          "(tunelab does not guess which one is meant)")
    return found[0] if found else None


def _pair(rec: dict, notes: Counter, tmap: dict[str, str]) -> tuple[str, list, list, list]:
    key = _prompt_key(rec, ("chosen_messages", "conversations", "messages", "prompt", "instruction"))
    if key == "chosen_messages" or (key is None and "chosen" in rec):
        kc, kr = ("chosen_messages", "rejected_messages") if key else ("chosen", "rejected")
        c, r = _side(rec, kc, notes, tmap), _side(rec, kr, notes, tmap)
        return ("v1" if key else "trl_implicit"), *_split_implicit(c, r)
    if key in ("conversations", "messages"):
        fmt, prompt = ("sharegpt" if key == "conversations" else "openai"), _turns(rec[key], key, tmap, notes)[0]
    elif key == "prompt":
        fmt, prompt = "trl", _prompt_turns(rec, "prompt", notes, tmap)
    elif key == "instruction":
        instruction = _text(rec, "instruction", notes, required=True)
        inp = _text(rec, "input", notes, required=False)
        fmt, prompt = "alpaca", [{"role": USER, "content": f"{instruction}\n\n{inp}" if inp else instruction}]
    else:
        raise Invalid("unknown_format", "not a preference record: expected chosen/rejected with conversations, "
                                        f"instruction, prompt or messages; found keys {', '.join(sorted(rec))[:120]}")
    chosen, rejected = _side(rec, "chosen", notes, tmap), _side(rec, "rejected", notes, tmap)
    if fmt in ("trl", "openai") and len(chosen) > 1 and chosen[0]["role"] != ASSISTANT:
        raise Invalid("prompt_mismatch", "with an explicit prompt, chosen and rejected must hold only the answer")
    return fmt, prompt, chosen, rejected


def _kto(rec: dict, notes: Counter, tmap: dict[str, str]) -> tuple[str, list, list, bool]:
    labels = {k: rec[k] for k in ("label", "kto_tag") if k in rec}
    for key, label in labels.items():
        if not isinstance(label, bool):
            raise Invalid("wrong_type", f"'{key}' must be true or false, got {_type_name(label)}")
    if len(set(labels.values())) > 1:
        raise Invalid("ambiguous_label", "'label' and 'kto_tag' disagree (true and false): keep one of them")
    label = next(iter(labels.values()))
    pair = [k for k in ("chosen", "rejected") if k in rec]
    if pair:  # else one of the two answers would be trained and the other ignored
        raise Invalid("wrong_stage", f"a labelled record that also holds '{pair[0]}': kto trains one labelled answer "
                                     "(completion, or the conversation's last turn); drop the pair, or use stage dpo")
    conv_key = _prompt_key(rec, ("prompt", "messages", "conversations"))
    if "completion" in rec or conv_key == "prompt":
        return "trl_kto", _prompt_turns(rec, "prompt", notes, tmap), _side(rec, "completion", notes, tmap), label
    if conv_key is None:
        raise Invalid("missing_field", "a KTO record needs messages / conversations, or prompt + completion")
    turns = _turns(rec[conv_key], conv_key, tmap, notes)[0]
    if not turns or turns[-1]["role"] != ASSISTANT:
        raise Invalid("order", "a KTO conversation must end with the assistant answer that is labelled")
    return f"{'openai' if conv_key == 'messages' else 'sharegpt'}_kto", turns[:-1], turns[-1:], label


def _scored(prompt: list[dict], **sides: list[dict]) -> tuple[list[dict], list[list[dict]]]:
    """The prompt and the answers to score, by SFT's rule (`template.is_trained`): turns of weight 0 are context. Those
    before an answer's first trained turn join the prompt, which both answers must then share; an answer with no
    trained turn has nothing to score; weight 0 after a trained turn cannot be honoured (an answer is scored whole,
    from its first trained turn to its end), so it rejects the record rather than score a turn meant as context."""
    context, answers = None, []
    for name, side in sides.items():
        first = next((i for i, m in enumerate(side) if m["role"] == ASSISTANT and is_trained(m)), None)
        if not any(m["role"] == ASSISTANT for m in side):
            turns = f" (its turns: {', '.join(m['role'] for m in side)})" if side else " (the record is a prompt only)"
            raise Invalid("empty_field", f"{name} holds no assistant answer{turns}: nothing to score")
        if first is None:
            raise Invalid("nothing_to_train", f"{name}: every assistant turn of the answer has weight 0 "
                                              "(loss_weight / weight): nothing to score")
        late = next((i for i in range(first, len(side)) if not is_trained(side[i])), None)
        if late is not None:
            raise Invalid("unsupported_weight", f"turn {len(prompt) + late + 1} ({name}) has weight 0 after a trained "
                                                "turn of the same answer: tunelab scores an answer whole, weight 0 "
                                                "can only mark the context before it")
        if context is not None and side[:first] != context:
            raise Invalid("prompt_mismatch", "chosen and rejected differ in turns of weight 0 before their answers: "
                                             "those are context (part of the prompt), which a pair must share")
        context = side[:first]
        answers.append(side[first:])
    return prompt + context, answers


def _with_system(prompt: list[dict], system: str, system_prompt: str | None, notes: Counter) -> list[dict]:
    """The prompt with the record's `system` field (any form), else `system_prompt`, when it has no system turn."""
    has_turn = bool(prompt) and prompt[0]["role"] == SYSTEM
    if system and has_turn:
        raise Invalid("ambiguous_prompt", "both a 'system' field and a system turn in the prompt: keep one of them")
    if system:
        return [{"role": SYSTEM, "content": system}] + prompt
    if system_prompt and not has_turn:
        notes["system prompt added"] += 1
        return [{"role": SYSTEM, "content": system_prompt}] + prompt
    return prompt


def normalize_preference(rec: Any, stage: str, notes: Counter | None = None, system_prompt: str | None = None,
                         column_map: dict[str, str] | None = None) -> PreferenceRecord:
    """One raw record → a PreferenceRecord for `stage` (dpo/orpo/simpo: a pair; kto: a labelled answer).
    `column_map` renames the record's columns to the names above (RECORD_KEYS) and its turns' keys (role, content)."""
    notes = Counter() if notes is None else notes
    if not isinstance(rec, dict):
        raise Invalid("wrong_type", f"a record must be a JSON object, got {_type_name(rec)}")
    rec, tmap = apply_map(rec, column_map, RECORD_KEYS)
    unpaired = "label" in rec or "kto_tag" in rec
    if stage == "kto" and not unpaired:
        raise Invalid("wrong_stage", "training.stage=kto needs answers labelled true/false ('label'); this record "
                                     "is not labelled (a chosen/rejected pair? use stage dpo)")
    if stage != "kto" and unpaired:
        raise Invalid("wrong_stage", f"a KTO record (labelled answer, no rejected answer) cannot train stage "
                                     f"{stage}: use training.stage=kto")
    warnings: list[tuple[str, str]] = []
    if stage == "kto":
        fmt, prompt, chosen, label = _kto(rec, notes, tmap)
        prompt, (chosen,) = _scored(prompt, completion=chosen)
        rejected = None
    else:
        fmt, prompt, chosen, rejected = _pair(rec, notes, tmap)
        prompt, (chosen, rejected) = _scored(prompt, chosen=chosen, rejected=rejected)
        label = None
        if chosen == rejected:
            raise Invalid("identical_pair", "chosen is identical to rejected: the pair teaches nothing")
    prompt = _with_system(prompt, _text(rec, "system", notes, required=False), system_prompt, notes)
    for side in (chosen, rejected):
        if side is not None:
            check_order([m["role"] for m in prompt + side], warnings)
    return PreferenceRecord(prompt, chosen, rejected, label, _tools(rec, notes), fmt, warnings)


# ---------------------------------------------------------------- encoding


def _answer_ids(tokenizer, prompt_ids: list[int], prompt: list, answer: list, tools) -> list[int]:
    from tunelab.data.template import TemplateError, render

    full = tokenizer(render(tokenizer, prompt + answer, tools), add_special_tokens=False)["input_ids"]
    if full[:len(prompt_ids)] != prompt_ids:
        raise TemplateError("the chat template renders the prompt differently when an answer follows it")
    return list(full[len(prompt_ids):])


def encode_preference(tokenizer, row: dict, max_length: int, overflow: str = "truncate") -> dict[str, Any]:
    """Token ids of prompt and answers (the answers keep the template's end-of-turn); cut to max_length.

    Raises RecordRejected when the prompt leaves no room for an answer, for overflow=drop, when cutting made
    the two answers identical, or when an answer has nothing to score (turns of weight 0, `_scored`)."""
    from tunelab.data.template import RecordRejected, control_token_reason, find_control_tokens, render

    tools = row.get("tools")
    keys = ("completion",) if "label" in row else ("chosen", "rejected")
    try:  # rows prepared before weight-0 turns were context, or made in code, are scored by the same rule
        prompt, sides = _scored(row["prompt"], **{k: row[k] for k in keys})
    except Invalid as e:
        raise RecordRejected(e.reason) from None
    for part, turns in (("prompt", prompt), *zip(keys, sides)):
        found = find_control_tokens(tokenizer, turns, tools if part == "prompt" else None)
        if found:
            raise RecordRejected(f"{part}: {control_token_reason(found, turns)}", "control_token")
    prompt_ids = list(tokenizer(render(tokenizer, prompt, tools, add_generation_prompt=True),
                                add_special_tokens=False)["input_ids"])
    answers = {k: _answer_ids(tokenizer, prompt_ids, prompt, side, tools) for k, side in zip(keys, sides)}
    longest = len(prompt_ids) + max(len(a) for a in answers.values())
    out: dict[str, Any] = {"prompt_ids": prompt_ids, "truncated": 0, "full_length": longest}
    if longest > max_length and overflow != "keep":
        room = max_length - len(prompt_ids)
        if overflow == "drop":
            raise RecordRejected(f"{longest} tokens (prompt + longer answer) is longer than data.max_length="
                                 f"{max_length} (overflow=drop)", "too_long")
        if room < 1:
            raise RecordRejected(f"the prompt alone is {len(prompt_ids)} tokens, data.max_length={max_length} "
                                 "leaves no room for an answer; raise max_length or shorten the prompt")
        out["truncated"] = longest - max_length
        answers = {k: a[:room] for k, a in answers.items()}
        if len(answers) == 2 and answers["chosen"] == answers["rejected"]:
            raise RecordRejected(f"cut to data.max_length={max_length}, chosen and rejected become identical")
    for k, a in answers.items():
        out[f"{k}_ids"] = a
    if "label" in row:
        out["label"] = bool(row["label"])
    return out


class PreferenceStats:
    """Token statistics of prompt / chosen / rejected (kto: completion) and the share of records cut."""

    def __init__(self, max_length: int):
        from array import array

        self.max_length = max_length
        self.lengths: dict[str, Any] = {}
        self.records = self.truncated = self.tokens_cut = 0
        self._array = array

    def add(self, enc: dict[str, Any]) -> None:
        self.records += 1
        self.truncated += bool(enc["truncated"])
        self.tokens_cut += enc["truncated"]
        for part in ("prompt", "chosen", "rejected", "completion"):
            if f"{part}_ids" in enc:
                self.lengths.setdefault(part, self._array("i")).append(len(enc[f"{part}_ids"]))

    def report(self) -> dict[str, Any]:
        from tunelab.data.report import percentile

        parts = {}
        for part, values in self.lengths.items():
            s = sorted(values)
            parts[part] = {"p50": percentile(s, 50), "p95": percentile(s, 95), "max": s[-1] if s else 0,
                           "mean": round(sum(s) / len(s), 1) if s else 0, "tokens": int(sum(s))}
        return {"records": self.records, "max_length": self.max_length, "truncated": self.truncated,
                "truncated_share": round(self.truncated / self.records, 4) if self.records else 0.0,
                "answer_tokens_cut": self.tokens_cut, "parts": parts}

    @staticmethod
    def line(r: dict[str, Any]) -> str:
        if not r["records"]:
            return "tokens after the chat template: none (no record was accepted)"
        parts = "; ".join(f"{k} p50 {v['p50']} / p95 {v['p95']} / max {v['max']}" for k, v in r["parts"].items())
        return (f"tokens after the chat template (answers after the train-time cut): {parts}; "
                f"{r['truncated']} of {r['records']} ({r['truncated_share']:.1%}) had their answers cut to fit "
                f"data.max_length={r['max_length']} ({r['answer_tokens_cut']} tokens cut)")
