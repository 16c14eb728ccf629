"""Raw text for continued pretraining (training.stage: pt): read documents, check them, cut them into blocks.

    for item in read_text_file(Path("corpus.txt"), info, "auto"):   # RawItem per document, located by line
        doc = normalize_text(item.value)                            # TextRecord, or Invalid(category, reason)
    pieces = encode_text(tokenizer, doc.text, max_length=512)       # token ids + EOS, in pieces <= max_length
    blocks = pack_blocks([len(p) for p in pieces], max_length=512)  # which pieces share a packed row

Where documents come from:

- `.txt` / `.text` / `.md` files (by extension, since any bytes are text): with `data.text_documents: auto`,
  blank lines separate documents, and a file with no blank line between two texts (blank lines before the first or
  after the last line do not count) holds one document per line (LLaMA-Factory's text format, e.g.
  `wiki_demo.txt`: one article per line). `paragraph`, `line` and `file` (the whole file is one
  document) insist on one rule. The report says which rule each file was read with.
- JSON / JSONL / Parquet / CSV: one document per record, in its `text` field (`c4_demo.jsonl`); other fields are
  ignored and unchecked. A conversation or a preference pair in a pt run is rejected (`wrong_stage`).

Every document is checked like SFT text (`tunelab.data.values`: no lone surrogates, no control characters other
than tab/newline/CR, no NaN): a bad one is rejected with its file, line and reason; an empty one is `empty_field`.

What a block is: every document is tokenised, starts with the tokenizer's BOS when the tokenizer puts one before
every text (Llama, Gemma, Mistral; SmolLM2 and Qwen do not) and ends with its EOS (so the model learns where
documents end). A document longer than `data.max_length` tokens is split into pieces of
`max_length` (never cut: every token is trained; a last piece of one token, which would predict nothing, is
dropped and counted). Pieces are packed in order, whole, into rows of at most `max_length` tokens: a block. Inside a
block every piece is its own record: positions restart at 0 and attention never crosses a piece (the packed collate
and `tunelab.model.attention`), so a block trains exactly what its pieces would alone, without padding. Every
token is a target except the first of each piece (nothing before it to predict it from).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tunelab.data.formats import Invalid, _type_name, apply_map
from tunelab.data.readers import (FileError, FileInfo, RawItem, _compression, _sniff_encoding, _text_lines,
                                  data_suffix, guarded, open_bytes, read_file)
from tunelab.data.template import find_control_tokens
from tunelab.data.values import text_problem

TEXT_SUFFIXES = {".txt", ".text", ".md"}
TEXT_DOCUMENTS = ("auto", "paragraph", "line", "file")
RECORD_KEYS = ("text",)  # what a column map may rename (`--map text=content`)
_CONVERSATION_KEYS = {"messages", "conversations", "instruction", "chosen", "rejected", "prompt", "completion"}


def is_text_file(path: Path) -> bool:
    return data_suffix(path) in TEXT_SUFFIXES


# ---------------------------------------------------------------- reading


def records_of(path: Path, info: FileInfo, stage: str, mode: str = "auto") -> Iterator[RawItem]:
    """Raw records of one input file; for stage pt, a .txt file's documents."""
    if stage == "pt" and is_text_file(path):
        return guarded(path, read_text_file(path, info, mode))
    return read_file(path, info)


def _has_blank_line(path: Path, codec: str, bom_len: int) -> bool:
    """Whether a blank line separates two texts (blank lines before the first or after the last text do not)."""
    lines = _text_lines(path, codec, bom_len, FileInfo(str(path)))
    seen_text = gap = False
    for _, s, _ in lines:
        if not s.strip():
            gap = seen_text
        elif gap:
            return True
        else:
            seen_text = True
    return False


def read_text_file(path: Path, info: FileInfo, mode: str = "auto") -> Iterator[RawItem]:
    """Documents of a plain-text file, each a RawItem ``{"text": ...}`` located at its first line."""
    compression = _compression(path)
    with open_bytes(path) as f:
        head = f.read(1 << 16)
    codec, bom_len, label = _sniff_encoding(head)
    if codec == "binary":
        raise FileError(path, "binary data, not text (a .txt file for training.stage=pt must be UTF-8/16/32 text)")
    if len(head) < 1 << 16 and not head[bom_len:].decode(codec, "replace").strip(" \t\r\n\ufeff"):
        raise FileError(path, "the file is empty (no documents)")  # as an empty JSON file is
    if mode == "auto":
        mode = "paragraph" if _has_blank_line(path, codec, bom_len) else "line"
    info.encoding = label
    info.container = {"paragraph": "text, blank-line separated documents", "line": "text, one document per line",
                      "file": "text, one document per file"}[mode]
    if compression:
        info.container = f"{compression} {info.container}"
    start, buf, bad = None, [], None
    for n, s, problem in _text_lines(path, codec, bom_len, info):
        info.crlf = info.crlf or s.endswith("\r\n")
        blank = not s.strip()
        if mode == "line" or (mode == "paragraph" and blank):
            if buf:
                yield _item(start, n - 1, buf, bad)
                start, buf, bad = None, [], None
            if blank:
                info.blank_lines += mode == "line"
                continue
        if start is None:
            start = n
        buf.append(s)
        bad = bad or (f"line {n}: {problem}" if problem else None)
        if mode == "line":
            yield _item(start, n, buf, bad)
            start, buf, bad = None, [], None
    if buf:
        yield _item(start, start + len(buf) - 1, buf, bad)


def _item(first: int, last: int, lines: list[str], bad: str | None) -> RawItem:
    text = "".join(lines).replace("\r\n", "\n")
    where = f"line {first}" if first == last else f"lines {first}-{last}"
    if bad:
        return RawItem(where, first, error=bad, raw=text[:2000])
    return RawItem(where, first, {"text": text}, raw=text[:2000])


# ---------------------------------------------------------------- one document


@dataclass
class TextRecord:
    text: str
    format: str = "text"
    tools: None = None
    warnings: list[tuple[str, str]] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {"text": self.text}


def normalize_text(rec: Any, column_map: dict[str, str] | None = None) -> TextRecord:
    """A raw record (``{"text": ...}``) → a TextRecord; Invalid with a reason a person understands."""
    if not isinstance(rec, dict):
        raise Invalid("wrong_type", f"a record must be a JSON object with a 'text' field, got {_type_name(rec)}")
    rec, _ = apply_map(rec, column_map, RECORD_KEYS)
    if "text" not in rec:
        found = sorted(_CONVERSATION_KEYS & set(rec))
        if found:
            raise Invalid("wrong_stage", f"a conversation or preference record ({', '.join(found)}), not raw text: "
                                         "training.stage=pt reads a 'text' field (use stage sft or dpo for this)")
        keys = ", ".join(sorted(map(str, rec))[:8]) or "none"
        raise Invalid("missing_field", f"missing field 'text' (raw text for training.stage=pt); found keys: {keys}")
    text = rec["text"]
    if not isinstance(text, str):
        raise Invalid("wrong_type", f"field 'text' must be a string, got {_type_name(text)}")
    problem = text_problem(text)
    if problem:
        raise Invalid("invalid_text", f"field 'text': {problem}")
    text = text.replace("\r\n", "\n")
    if not text.strip():
        raise Invalid("empty_field", "field 'text' is empty (nothing to train)")
    return TextRecord(text)


# ---------------------------------------------------------------- tokens, pieces and blocks


def _bos(tokenizer) -> list[int]:
    """[BOS] for a tokenizer that starts every text with it (Llama, Gemma, Mistral: their models were pretrained so,
    and Gemma's output is garbage without it), else []: what a document starts with."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


def encode_text(tokenizer, text: str, max_length: int) -> tuple[list[list[int]], int]:
    """(pieces of at most max_length token ids, [BOS +] the document + EOS split in order; tokens dropped).

    The document is text throughout: "<|endoftext|>" or "<|im_end|>" written in it are tokenised as those
    characters, not as the control tokens (which would teach the model to end a document or a turn there); only
    the BOS and EOS added here are control tokens."""
    ids = _bos(tokenizer) + list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    pieces = [ids[k:k + max_length] for k in range(0, len(ids), max_length)]
    dropped = 0
    if pieces and len(pieces[-1]) < 2:  # one token at position 0 predicts nothing
        dropped = len(pieces.pop())
    return pieces, dropped


def encode_document(tokenizer, rec: TextRecord, role: str, stats: "TextStats") -> list[list[int]]:
    """prepare's encoding of one accepted document: its pieces, counted in `stats`; Invalid if nothing trains."""
    pieces, dropped = encode_text(tokenizer, rec.text, stats.max_length)
    if not pieces:
        raise Invalid("nothing_to_train", "the document is a single token: nothing to predict")
    found = find_control_tokens(tokenizer, [{"content": rec.text}])
    if found:
        rec.warnings.append(("control_token_as_text", f"holds {found[0][1]!r} as text: trained as those characters, "
                             "not as the control token; documents go in records of their own, not joined by it"))
    stats.add(role, pieces, dropped)
    return pieces


def pack_blocks(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Indices of the pieces in each block: pieces in order, a new block when the next one would not fit."""
    blocks: list[list[int]] = []
    used = max_length + 1
    for i, n in enumerate(lengths):
        if used + n > max_length:
            blocks.append([])
            used = 0
        blocks[-1].append(i)
        used += n
    return blocks


def block_examples(pieces: list[list[int]], wheres: list[str], max_length: int) -> list[dict]:
    """Training examples, one per block: the concatenated ids (all trained) and the length of each piece."""
    out = []
    for idx in pack_blocks([len(p) for p in pieces], max_length):
        ids = [t for i in idx for t in pieces[i]]
        seg = [len(pieces[i]) for i in idx]
        out.append({"input_ids": ids, "labels": list(ids), "segments": seg, "n_targets": len(ids) - len(seg),
                    "where": ", ".join(dict.fromkeys(wheres[i] for i in idx))})
    return out


def piece_examples(pieces: list[list[int]], wheres: list[str]) -> list[dict]:
    """Evaluation examples, one per piece (each its own padded row: the same loss as inside a block)."""
    return [{"input_ids": p, "labels": list(p), "n_targets": len(p) - 1, "where": w} for p, w in zip(pieces, wheres)]


def collate_blocks(examples: Sequence[dict]):
    """A packed micro-batch of blocks: every piece of every block is its own record (positions restart)."""
    from tunelab.data.batching import collate_packed

    records = []
    for ex in examples:
        start = 0
        for n in ex["segments"]:
            records.append({"input_ids": ex["input_ids"][start:start + n], "labels": ex["labels"][start:start + n]})
            start += n
    return collate_packed(records)


# ---------------------------------------------------------------- statistics for the report


class TextStats:
    """Tokens per document, pieces and blocks (train and validation), and what was dropped."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.doc_tokens: dict[str, array] = {}
        self.pieces: dict[str, list[array]] = {}  # role -> per document, the lengths of its pieces
        self.split_documents = self.tokens_dropped = 0

    def add(self, role: str, pieces: list[list[int]], dropped: int) -> None:
        self.doc_tokens.setdefault(role, array("i")).append(sum(map(len, pieces)) + dropped)
        self.pieces.setdefault(role, []).append(array("i", map(len, pieces)))
        self.split_documents += len(pieces) > 1
        self.tokens_dropped += dropped

    def report(self, val_idx: set[int]) -> dict[str, Any]:
        from tunelab.data.report import percentile

        split: dict[str, list] = {"train": [], "val": []}
        for i, p in enumerate(self.pieces.get("train", [])):
            split["val" if i in val_idx else "train"].append(p)
        split["val"] += self.pieces.get("eval", [])
        s = sorted(n for a in self.doc_tokens.values() for n in a)
        out: dict[str, Any] = {"documents": len(s), "tokens": int(sum(s)), "p50": percentile(s, 50),
                               "p95": percentile(s, 95), "max": s[-1] if s else 0,
                               "mean": round(sum(s) / len(s), 1) if s else 0, "max_length": self.max_length,
                               "split_documents": self.split_documents, "tokens_dropped": self.tokens_dropped}
        for name, docs in split.items():
            lengths = [n for d in docs for n in d]
            blocks = len(pack_blocks(lengths, self.max_length))
            out[name] = {"documents": len(docs), "pieces": len(lengths), "tokens": int(sum(lengths)),
                         "blocks": blocks, "block_fill": round(sum(lengths) / (blocks * self.max_length), 4)
                         if blocks else 0.0}
        return out

    @staticmethod
    def line(r: dict[str, Any]) -> str:
        t, v = r["train"], r["val"]
        return (f"text: {r['documents']} documents, {r['tokens']:,} tokens with EOS (p50 {r['p50']} / p95 {r['p95']} "
                f"/ max {r['max']} per document); {r['split_documents']} longer than max_length={r['max_length']} "
                f"split into pieces; train {t['blocks']} blocks of <= {r['max_length']} tokens from {t['pieces']} "
                f"pieces ({t['block_fill']:.0%} full), val {v['pieces']} pieces, {v['tokens']:,} tokens"
                + (f"; {r['tokens_dropped']} single trailing tokens dropped" if r["tokens_dropped"] else ""))


def markdown_lines(r: dict[str, Any]) -> list[str]:
    rows = [("documents", r["documents"]), ("tokens (with EOS)", r["tokens"]), ("p50 / p95 / max per document",
            f"{r['p50']} / {r['p95']} / {r['max']}"), ("max_length (block size)", r["max_length"]),
            ("documents split into pieces", r["split_documents"]), ("single trailing tokens dropped",
                                                                    r["tokens_dropped"])]
    for name in ("train", "val"):
        s = r[name]
        rows.append((f"{name}: documents / pieces / tokens", f"{s['documents']} / {s['pieces']} / {s['tokens']}"))
        rows.append((f"{name}: blocks (fill)", f"{s['blocks']} ({s['block_fill']:.1%})"))
    return rows
