"""One chat template everywhere: the Ollama TEMPLATE, and a check that every path renders alike (stop tokens:
`tunelab.model.stop_tokens`).

The template the adapter was trained with is the one saved next to it. Merge and export copy it, and this module
checks the copies: sample conversations are rendered through each tokenizer (the training one, the merged one,
the template stored in the GGUF) and through the Ollama Modelfile TEMPLATE, and any difference is an error.

    check_templates({"training": train_tok, "merged": merged_tok}, ollama_template=tpl)   # raises on a mismatch
    ollama_template(tokenizer) -> OllamaTemplate(template, stop)  # ChatML only; other templates raise

The Ollama side is checked with a small interpreter for the subset of Go's text/template that the templates we
write use (range, if/else, eq/ne/and/or/not/index, variables and `{{-`/`-}}` trimming): the very string that goes
into the Modelfile is the one rendered.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

from tunelab.errors import TunelabError


class TemplateMismatch(TunelabError):
    """Two paths render the same conversation differently: the model would see another format than it learnt."""


class UnsupportedTemplate(TunelabError):
    """The chat template has no Ollama translation here."""


# Conversations that exercise the parts of a template that differ between families: the default system prompt,
# multi-turn history, newlines and non-ASCII text. All end with a user turn: what inference renders.
SAMPLE_CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one,\nplease — in français?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "  and 3+3?  "}],
]


def render_hf(tokenizer, messages: list[dict[str, Any]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------- Ollama TEMPLATE


@dataclass
class OllamaTemplate:
    family: str
    template: str  # Go text/template, Ollama's `.Messages` form
    stop: list[str]
    default_system: str | None


def _chatml(messages: list[dict[str, str]], default_system: str | None) -> str:
    out = []
    if default_system is not None and (not messages or messages[0]["role"] != "system"):
        out.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
    out += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    return "".join(out) + "<|im_start|>assistant\n"


def ollama_template(tokenizer) -> OllamaTemplate:
    """Translate the tokenizer's chat template into an Ollama TEMPLATE, or raise UnsupportedTemplate.

    The family is recognised by what the template renders, not by its source text: ChatML (SmolLM2, Qwen2/2.5)
    with or without a default system prompt inserted when the conversation has none.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UnsupportedTemplate("the tokenizer has no chat template, so there is nothing to put in the Modelfile")
    probe = render_hf(tokenizer, [{"role": "user", "content": "U1"}])
    default_system = None
    m = re.fullmatch(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n<\|im_start\|>user\nU1<\|im_end\|>\n"
                     r"<\|im_start\|>assistant\n", probe, flags=re.S)
    if m:
        default_system = m.group(1)
    if all(render_hf(tokenizer, c) == _chatml(c, default_system) for c in SAMPLE_CONVERSATIONS):
        sys_block = ""
        if default_system is not None:
            sys_block = ('{{- if and (eq $i 0) (ne .Role "system") }}<|im_start|>system\n'
                         + _go_escape(default_system) + "<|im_end|>\n{{ end }}")
        template = ("{{- range $i, $_ := .Messages }}" + sys_block
                    + "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n")
        return OllamaTemplate("chatml", template, ["<|im_end|>", "<|im_start|>"], default_system)
    raise UnsupportedTemplate(
        "this chat template is not ChatML (<|im_start|>role ... <|im_end|>), the only family tunelab translates "
        "into an Ollama TEMPLATE; the GGUF file still carries the template for llama.cpp. Write the Modelfile's "
        "TEMPLATE by hand, or export without it (--no-modelfile). The template renders a user turn as:\n" + probe)


def _go_escape(text: str) -> str:
    # `{{` inside literal text would open an action; Go templates write it as {{"{{"}}.
    return text.replace("{{", '{{"{{"}}')


def modelfile_text(gguf_name: str, tpl: OllamaTemplate) -> str:
    if '"""' in tpl.template:
        raise UnsupportedTemplate('the template contains """, which a Modelfile cannot quote')
    lines = [f"# Written by tunelab export; TEMPLATE and stop tokens match the chat template the model was trained"
             f" with ({tpl.family}).", f"FROM ./{gguf_name}", f'TEMPLATE """{tpl.template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in tpl.stop]
    return "\n".join(lines) + "\n"


def template_from_modelfile(text: str) -> str:
    m = re.search(r'^TEMPLATE """(.*?)"""', text, flags=re.S | re.M)
    if not m:
        raise TemplateMismatch("the Modelfile has no TEMPLATE \"\"\"...\"\"\" block")
    return m.group(1)


# ---------------------------------------------------------------- a small Go text/template interpreter

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)


def _lex(template: str) -> list[tuple[str, str]]:
    """[(kind, value)] with kind 'text' or 'action'; `{{- ` / ` -}}` trimming applied to neighbouring text."""
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        if text:
            out.append(("text", text))
        out.append(("action", m.group(2).strip()))
        trim_next, pos = bool(m.group(3)), m.end()
    text = template[pos:]
    if trim_next:
        text = text.lstrip()
    if text:
        out.append(("text", text))
    return out


def _parse(tokens: list[tuple[str, str]], i: int = 0, stop: tuple[str, ...] = ()) -> tuple[list, int, str]:
    """Nodes until one of `stop` actions; returns (nodes, next index, the stop action met)."""
    nodes: list = []
    while i < len(tokens):
        kind, val = tokens[i]
        if kind == "text":
            nodes.append(("text", val))
            i += 1
            continue
        word = val.split(None, 1)[0] if val else ""
        if word in stop or (val.startswith("else") and "else" in stop):
            return nodes, i, val
        if word in ("range", "if"):
            body, i, met = _parse(tokens, i + 1, ("end", "else"))
            branches = [(val[len(word):].strip(), body)]
            while met.startswith("else"):
                cond = met[4:].strip()
                cond = cond[2:].strip() if cond.startswith("if") else "true"
                body, i, met = _parse(tokens, i + 1, ("end", "else"))
                branches.append((cond, body))
            nodes.append((word, branches))
            i += 1
            continue
        nodes.append(("expr", val))
        i += 1
    if stop:
        raise UnsupportedTemplate(f"Go template: missing {{{{ end }}}} (stopped looking for {stop})")
    return nodes, i, ""


def _split_args(expr: str) -> list[str]:
    parts, depth, cur, quote = [], 0, "", False
    for ch in expr:
        if ch == '"' and not cur.endswith("\\"):
            quote = not quote
        if not quote and ch == "(":
            depth += 1
        if not quote and ch == ")":
            depth -= 1
        if ch.isspace() and depth == 0 and not quote:
            if cur:
                parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    return parts


def _field(obj: Any, name: str) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, obj.get(name.lower()))
    return getattr(obj, name, None)


def _eval(expr: str, dot: Any, root: Any, env: dict[str, Any]) -> Any:
    args = _split_args(expr.strip())
    if len(args) > 1:
        fn, rest = args[0], [_eval(a, dot, root, env) for a in args[1:]]
        funcs = {"eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b,
                 "and": lambda *a: next((x for x in a if not x), a[-1]),
                 "or": lambda *a: next((x for x in a if x), a[-1]),
                 "not": lambda a: not a, "len": len, "index": lambda a, *k: _index(a, k)}
        if fn not in funcs:
            raise UnsupportedTemplate(f"Go template function {fn!r} is not supported by tunelab's checker")
        return funcs[fn](*rest)
    a = args[0] if args else ""
    if a.startswith("(") and a.endswith(")"):
        return _eval(a[1:-1], dot, root, env)
    if a.startswith('"'):
        return a[1:-1].encode().decode("unicode_escape")
    if re.fullmatch(r"-?\d+", a):
        return int(a)
    if a in ("true", "false"):
        return a == "true"
    if a == ".":
        return dot
    base, path = (root, a[2:]) if a.startswith("$.") else (None, None)
    if base is None and a.startswith("$"):
        name, _, path = a.partition(".")
        base = env[name]
    elif base is None and a.startswith("."):
        base, path = dot, a[1:]
    elif base is None:
        raise UnsupportedTemplate(f"Go template expression {a!r} is not supported by tunelab's checker")
    for part in filter(None, (path or "").split(".")):
        base = _field(base, part)
    return base


def _index(a, keys):
    for k in keys:
        a = a[k]
    return a


def _exec(nodes: list, dot: Any, root: Any, env: dict[str, Any], out: list[str]) -> None:
    for kind, val in nodes:
        if kind == "text":
            out.append(val)
        elif kind == "expr":
            v = _eval(val, dot, root, env)
            out.append("" if v is None else str(v))
        elif kind == "if":
            for cond, body in val:
                if cond == "true" or _eval(cond, dot, root, env):
                    _exec(body, dot, root, env, out)
                    break
        elif kind == "range":
            (head, body), *rest = val
            names: list[str] = []
            if ":=" in head:
                lhs, head = head.split(":=", 1)
                names = [n.strip() for n in lhs.split(",")]
            seq = _eval(head, dot, root, env) or []
            if not seq and rest:
                _exec(rest[0][1], dot, root, env, out)
            for idx, item in enumerate(seq):
                scope = dict(env)
                if len(names) == 2:
                    scope[names[0]], scope[names[1]] = idx, item
                elif len(names) == 1:
                    scope[names[0]] = item
                _exec(body, item, root, scope, out)


def render_go(template: str, messages: list[dict[str, str]]) -> str:
    """Render an Ollama chat TEMPLATE the way Ollama does for these messages (subset of Go templates)."""
    data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages], "System": "",
            "Prompt": "", "Response": "", "Tools": None}
    nodes, _, _ = _parse(_lex(template))
    out: list[str] = []
    _exec(nodes, data, data, {"$": data}, out)
    return "".join(out)


# ---------------------------------------------------------------- the check


def check_templates(tokenizers: dict[str, Any], ollama_template: str | None = None,
                    conversations: list[list[dict[str, str]]] | None = None) -> int:
    """Render sample conversations through every tokenizer (and the Ollama TEMPLATE) and demand equal text.

    `tokenizers` maps a label (training, merged, gguf, ...) to a tokenizer; the first is the reference.
    Returns the number of conversations checked; raises TemplateMismatch with a diff on the first difference.
    """
    convos = conversations or SAMPLE_CONVERSATIONS
    (ref_name, ref_tok), *others = tokenizers.items()
    for convo in convos:
        want = render_hf(ref_tok, convo)
        got = [(name, render_hf(tok, convo)) for name, tok in others]
        if ollama_template is not None:
            got.append(("ollama Modelfile", render_go(ollama_template, convo)))
        for name, text in got:
            if text != want:
                diff = "\n".join(difflib.unified_diff(want.splitlines(), text.splitlines(), ref_name, name,
                                                      lineterm=""))
                raise TemplateMismatch(f"the chat template of '{name}' renders a conversation differently from "
                                       f"'{ref_name}' (the model would not see the format it was trained on):\n{diff}")
    return len(convos)
