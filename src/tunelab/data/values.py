"""What a value must be to become training text: valid text, a finite number of sane size, not absurdly deep.

    text_problem("hi\x00")          # "NUL U+0000 at character 3: ..." (None when the text is fine)
    number_problem(float("nan"))    # "is NaN (not a number), ..." (None for a finite number of sane size)
    value_problem(tools, "tools")   # ("invalid_text" | "invalid_number" | "too_deep", reason with the path)

`tunelab.data.formats` applies these to what a record contributes to the conversation (its texts, numbers
turned into text, tool schemas and tool-call arguments), not to fields it ignores: a NaN in an unused
``score`` column must not cost the record. The rules:

- Text: no unpaired UTF-16 surrogates (``"\ud800"`` is legal JSON but not Unicode: it cannot be written as
  UTF-8 and the Rust tokenizer raises a TypeError on it) and no control characters except tab, newline and
  carriage return (NUL, escape codes, C1 controls from mis-decoded Windows-1252, a ``\f`` from ``\frac``...).
- Numbers: finite (Python's json reads ``NaN``/``Infinity``, and ``1e999`` becomes infinity; pandas writes NaN
  for missing values) and integers within 64 bits (a longer one is an id or a hash that should be quoted).
- Nesting: at most ``MAX_DEPTH`` levels; a tool schema needs about ten.
"""

from __future__ import annotations

import math
import re
from typing import Any

MAX_DEPTH = 64
MAX_INT = 2**63  # beyond a 64-bit integer: an id or hash that should be text
_BAD_CHAR = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_CONTROL_NAMES = {0: "NUL", 0x1b: "ESC", 0x7f: "DEL", 0x0b: "vertical tab", 0x0c: "form feed"}


class BigNumber:
    """An integer literal too long to convert safely (``parse_int`` of the readers' JSON decoder returns it)."""

    __slots__ = ("digits",)

    def __init__(self, literal: str):
        self.digits = len(literal.lstrip("-"))

    def __repr__(self) -> str:
        return f"<{self.digits}-digit number>"


def parse_int(literal: str) -> int | BigNumber:
    """json's ``parse_int`` hook: Python refuses to convert over 4,300 digits (a ValueError mid-parse)."""
    return int(literal) if len(literal) <= 40 else BigNumber(literal)


def _path(parent: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    key = str(key)
    shown = key if key.isidentifier() else repr(key[:40])
    return f"{parent}.{shown}" if parent else shown


def text_problem(s: str) -> str | None:
    """Why this string is not valid text, or None."""
    m = _BAD_CHAR.search(s)
    if m is None:
        return None
    c = ord(m.group())
    if 0xD800 <= c <= 0xDFFF:
        half = "high" if c < 0xDC00 else "low"
        return (f"unpaired UTF-16 surrogate \\u{c:04x} ({half} half) at character {m.start() + 1}: the text is not "
                "valid Unicode (a string cut in the middle of an emoji?)")
    name = _CONTROL_NAMES.get(c, "control character")
    if 0x80 <= c <= 0x9F:
        why = "mojibake? UTF-8 text decoded as Latin-1 upstream turns '—' into 'â\\x80\\x94'"
    elif c in (0x08, 0x0C):
        cmd, esc = ("frac", "f") if c == 0x0C else ("beta", "b")
        why = f"a LaTeX \\{cmd} written with one backslash, which JSON reads as the escape \\{esc}?"
    else:
        why = "a binary or mis-decoded value?"
    return (f"{name} U+{c:04X} at character {m.start() + 1}: control characters other than tab, newline and "
            f"carriage return are not text; {why}")


def number_problem(v: Any) -> str | None:
    """Why this number cannot become text, or None (also None for what is not a number)."""
    if isinstance(v, float) and not math.isfinite(v):
        if math.isnan(v):
            return "is NaN (not a number), which JSON does not have: a missing value exported by pandas?"
        return (f"is {'' if v > 0 else '-'}Infinity, which JSON does not have: a number too large such as "
                "1e999, or a division by zero upstream?")
    if isinstance(v, BigNumber) or (isinstance(v, int) and not isinstance(v, bool) and abs(v) >= MAX_INT):
        digits = v.digits if isinstance(v, BigNumber) else len(str(abs(v)))
        return f"is a {digits}-digit number, too large to be a number: quote it if it is text (an id or a hash?)"
    return None


def value_problem(value: Any, path: str) -> tuple[str, str] | None:
    """(category, reason) for the first invalid text, number or nesting inside `value` (depth first), or None."""
    stack: list[tuple[Any, str, int]] = [(value, path, 0)]
    while stack:
        v, where, depth = stack.pop()
        if isinstance(v, str):
            problem = text_problem(v)
            if problem:
                return "invalid_text", f"{where}: {problem}"
        elif isinstance(v, (dict, list, tuple)):
            if depth >= MAX_DEPTH:
                return "too_deep", f"{where}: nested more than {MAX_DEPTH} levels deep"
            items = list(v.items()) if isinstance(v, dict) else list(enumerate(v))
            for key, child in reversed(items):
                problem = text_problem(key) if isinstance(key, str) else None
                if problem:
                    return "invalid_text", f"a field name in {where}: {problem}"
                stack.append((child, _path(where, key), depth + 1))
        else:
            problem = number_problem(v)
            if problem:
                return "invalid_number", f"{where} {problem}"
    return None
