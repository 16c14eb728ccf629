"""Prepare a raw dataset for training: read, normalise, validate, count, split, write — losing nothing silently.

    from tunelab.data.prepare import prepare_dataset, load_prepared
    result = prepare_dataset("data/raw/my_data.json", tokenizer=tok, max_length=512)
    result.usable, result.report["records_accepted"], result.output      # data/processed/my_data/
    data = load_prepared(result.output)                                    # .train / .val canonical records

Every record read ends up in exactly one place: ``train.jsonl``/``val.jsonl`` (accepted), or ``rejected.jsonl``
with its source, location, reason and raw text (rejected, or a duplicate with ``duplicate_of``), so
``records_read = records_accepted + records_rejected + duplicates_removed`` always holds; it is printed and
stored in ``report.json``. The prepared folder also holds ``report.md`` and ``length_histogram.png``.
Each file's line in the report counts its records by format; a file that mixes formats is a warning (each
record is still read by its own format). The rules a record must meet are in docs/data.md.

With a tokenizer, every accepted record is encoded with the real chat template and loss mask
(`tunelab.data.template.encode_record`): token statistics, ``overflow`` handling (truncate / drop / keep) and the
rejection of records that would have nothing left to train all come from there. The fingerprint (which
training records in its manifest) hashes the input bytes, the options, the tokenizer's vocabulary and its chat
template. Memory stays flat on large JSONL: records stream through to a temporary file; only a 64-bit hash
and a token count per record are kept.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import shutil
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data import report as rpt
from tunelab.data.fast_tokenizer import FastTokenizer, tokenizer_identity
from tunelab.data.formats import FORMATS, RECORD_KEYS, TURN_KEYS, Conversation, Invalid, normalize
from tunelab.data.readers import DataError, FileError, FileInfo, RawItem, data_suffix
from tunelab.data.text import TEXT_DOCUMENTS, TEXT_SUFFIXES, TextStats, encode_document, records_of
from tunelab.data.prepared import PREPARED_FILES, PreparedData, is_empty_dir, is_prepared, load_prepared
from tunelab.files import retry_advice, sha256_file, staging_dir, write_failure

__all__ = ["prepare_dataset", "load_prepared", "is_prepared", "PreparedData", "PrepareResult", "DataError",
           "resolve_inputs"]

PREPARE_VERSION = 1  # bump when the canonical output of the same input changes (part of the fingerprint)
DATA_SUFFIXES = {".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".parquet", ".pq"}
# A folder's .jsonl.xz: said, not silently passed over (a .jsonl.gz is read as it is: readers.open_bytes)
COMPRESSED = {".bz2", ".xz", ".zst", ".zip", ".7z"}
OVERFLOW = ("truncate", "drop", "keep")
TRAIN_ON = ("assistant", "all", "last_assistant")
SHOW_REJECTIONS = 10  # printed to the terminal; all of them go to rejected.jsonl
ENCODE_CHUNK = 256  # records tokenised in one batch: parallel in Rust, still a flat memory profile


@dataclass
class PrepareResult:
    output: Path | None  # the prepared folder; None for check=True
    report: dict[str, Any]
    usable: bool
    problems: list[str] = field(default_factory=list)

    def raise_if_unusable(self) -> None:
        if not self.usable:
            raise DataError("the dataset is not usable: " + "; ".join(self.problems))


def to_json(obj: Any, **kw) -> str:
    """JSON for our own files: readable UTF-8, except that text which is not valid Unicode (the raw line of a
    rejected record, with a lone surrogate or an undecodable byte) is escaped instead of crashing the write."""
    text = json.dumps(obj, ensure_ascii=False, **kw)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, ensure_ascii=True, **kw)
    return text


def template_refusal(e: Exception) -> str:
    """Why the chat template cannot render a record: our TemplateError says it; anything else a Jinja template
    raised (its raise_exception, a TypeError on content that is not text) in one line."""
    from tunelab.data.template import TemplateError

    if isinstance(e, TemplateError):
        return str(e)
    msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    return f"the chat template cannot render this record: {msg}"


def encode_or_refuse(encode: Callable, *args, **kwargs):
    """`encode(*args, **kwargs)` of one record, with whatever its chat template raises as RecordRejected (the reason
    from `template_refusal`): training and eval then set that record aside with its location, as prepare does."""
    from tunelab.data.template import RecordRejected

    try:
        return encode(*args, **kwargs)
    except RecordRejected:
        raise
    except Exception as e:  # a Jinja template may raise anything
        raise RecordRejected(template_refusal(e)) from None


def refused(rec: dict[str, Any], e: Exception) -> dict[str, Any]:
    """A prepared record that cannot be trained or scored: where it came from, and why."""
    return {"source": rec.get("source"), "location": rec.get("location"), "reason": str(e)}


# ---------------------------------------------------------------- inputs


def resolve_inputs(inputs: str | os.PathLike | Iterable[str | os.PathLike],
                   text: bool = False) -> tuple[list[Path], list[Path]]:
    """Files, folders (their data files, recursively, sorted) and globs → (the files to read, in the order given;
    the other files of those folders, which are not read: said by `prepare_dataset`). `text` (stage pt): a
    folder's .txt / .text / .md files count as data too. Each may be gzip-compressed (train.jsonl.gz)."""
    suffixes = DATA_SUFFIXES | TEXT_SUFFIXES if text else DATA_SUFFIXES
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    out: list[Path] = []
    skipped: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            found = [f for f in files if data_suffix(f) in suffixes]
            if not found:
                raise DataError(f"{p} is a folder with no data files ({', '.join(sorted(suffixes))}, or these .gz)"
                                + (f"; it holds {skipped_text(files)}" if files else ""))
            out += found
            skipped += [f for f in files if data_suffix(f) not in suffixes]
        elif any(c in str(item) for c in "*?["):
            found = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
            if not found:
                raise DataError(f"no files match {item}")
            out += found
        elif p.exists():  # /dev/null, a pipe (<(zcat ...)): read more than once here (sniffed, read, hashed)
            raise DataError(f"{item} is not a regular file or folder (a device, pipe or socket): save the data to "
                            "a file and give that")
        else:
            raise DataError(f"input not found: {item}")
    seen: set[Path] = set()
    return [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))], skipped


def skipped_text(files: list[Path], most: int = 10) -> str:
    """The files of a folder input that are not read, by name (`most` of them), and how to have compressed ones
    read."""
    names = ", ".join(str(f) for f in files[:most]) + (f" and {len(files) - most} more" if len(files) > most else "")
    if any(f.suffix.lower() in COMPRESSED for f in files):
        names += " (only gzip-compressed files are read: decompress the others first, e.g. unxz -k FILE.jsonl.xz)"
    return names


def _stem(path: Path) -> str:
    """The name a prepared folder takes from its input: 'train' for train.jsonl and for train.jsonl.gz."""
    return Path(path.stem).stem if path.suffix.lower() == ".gz" else path.stem


STAGES = ("sft", "pt", "dpo", "orpo", "simpo", "kto")


def _map_names(stage: str) -> tuple[str, ...]:
    """The names a column map may use for `stage` (each stage reads its own fields)."""
    from tunelab.data import preference, text

    return {"sft": RECORD_KEYS + TURN_KEYS, "pt": text.RECORD_KEYS}.get(stage, preference.RECORD_KEYS + TURN_KEYS)


def _check_options(stage: str, format: str, column_map: dict[str, str] | None, overflow: str, train_on: str,
                   val_ratio: float, max_length: int, max_reject_ratio: float) -> None:
    import difflib

    problems = []
    if stage not in STAGES:
        problems.append(f"stage {stage!r}: prepare reads sft conversations, pt raw text and dpo/orpo/simpo/kto "
                        "preference data")
    if format not in FORMATS:
        problems.append(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    elif format != "auto" and stage != "sft":
        problems.append(f"format {format!r} applies to sft conversations; stage {stage} detects the form of each "
                        "record itself (leave format at auto)")
    if overflow not in OVERFLOW:
        problems.append(f"overflow must be one of {', '.join(OVERFLOW)}, not {overflow!r}")
    if train_on not in TRAIN_ON:
        problems.append(f"train_on must be one of {', '.join(TRAIN_ON)}, not {train_on!r}")
    if not 0 <= val_ratio < 1:
        problems.append(f"val_ratio must be in [0, 1), not {val_ratio}")
    if max_length < 8:
        problems.append(f"max_length must be at least 8, not {max_length}")
    if not 0 <= max_reject_ratio <= 1:
        problems.append(f"max_reject_ratio must be in [0, 1], not {max_reject_ratio}")
    names = _map_names(stage)
    for key in column_map or {}:
        if key not in names:
            close = difflib.get_close_matches(key, names, 1)
            problems.append(f"cannot map {key!r} for stage {stage}: the names are {', '.join(names)}"
                            + (f" (did you mean {close[0]!r}?)" if close else ""))
    if problems:
        raise DataError("; ".join(problems))


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        yield from iter(lambda: f.read(1 << 20), b"")


def fingerprint(files: list[tuple[str, Path]], options: dict[str, Any],
                tok_id: dict[str, str] | None) -> tuple[str, list[dict[str, Any]]]:
    """sha256 of the input bytes (with their role), the options and the tokenizer identity; and each file as it was
    read (resolved path, bytes, mtime, its own sha256), so that training can tell a source changed since."""
    h = hashlib.sha256(f"tunelab-prepare-v{PREPARE_VERSION}\n".encode())
    states = []
    for role, path in files:
        h.update(f"file:{role}\n".encode())
        own, stat = hashlib.sha256(), path.stat()
        for chunk in _chunks(path):
            h.update(chunk)
            own.update(chunk)
        states.append({"resolved": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                       "sha256": own.hexdigest()})
    h.update(json.dumps(options, sort_keys=True, ensure_ascii=False).encode())
    tok_part = {k: v for k, v in (tok_id or {}).items() if k != "name"}  # a path differs between machines
    h.update(json.dumps(tok_part, sort_keys=True).encode())
    return "sha256:" + h.hexdigest(), states


def changed_sources(report: dict[str, Any]) -> list[str]:
    """The raw files a prepared folder was made from that have changed since, in words. A file that is gone is
    not one: the folder stands on its own (moved to another machine, say)."""
    changed = []
    for f in report.get("files") or []:
        path = Path(f.get("resolved") or "")
        if "sha256" not in f or not path.is_file():
            continue
        stat = path.stat()
        if (stat.st_size, stat.st_mtime_ns) == (f.get("bytes"), f.get("mtime_ns")):
            continue
        now = sha256_file(path)
        if now != f["sha256"]:
            changed.append(f"{f['path']} (sha256 {f['sha256'][:12]}… when prepared, {now[:12]}… now)")
    return changed


# ---------------------------------------------------------------- one pass over the inputs


class _Pass:
    """The counters and sinks of one prepare run; `add` decides the fate of every record read."""

    def __init__(self, tokenizer, opts: dict[str, Any], console: Callable[[str], None], workdir: Path | None,
                 show_samples: int):
        self.tok = FastTokenizer(tokenizer) if tokenizer is not None else None
        self.opts, self.console = opts, console
        self.read = self.accepted = self.rejected = self.duplicates = 0
        self.notes: Counter = Counter()
        self.warnings: Counter = Counter()
        self.warning_examples: dict[str, list[str]] = {}
        self.rejected_by: Counter = Counter()
        self.rejected_examples: list[dict[str, str]] = []
        self.seen: dict[int, int] = {}  # content hash -> where it was first seen, packed (see _where)
        self.file_names: list[str] = []
        self.lengths, self.trained = array("i"), array("i")
        self.tok_counts = Counter({k: 0 for k in ("over_max_length", "truncated", "dropped", "kept_over_max_length",
                                                  "nothing_to_train", "eos_appended")})
        self.samples: list[tuple[Conversation, Any]] = []
        self.show_samples = show_samples
        self.workdir = workdir
        self.rejected_file = open(workdir / "rejected.jsonl", "w", encoding="utf-8") if workdir else None
        self.sinks: dict[str, Any] = {}
        self.counts_by_role: Counter = Counter()
        # --map's record columns (not a turn's role/content keys), and those some record holds
        self.map_sources = {src for dst, src in (opts.get("column_map") or {}).items()
                            if dst not in ("role", "content") and src != dst}
        self.map_seen: set[str] = set()
        self.pending: list[tuple] = []  # records waiting to be encoded together (ENCODE_CHUNK at a time)
        self.format_first: dict[str, str] = {}  # of the file being read: format -> location of its first record
        self.stage = opts.get("stage", "sft")  # preference stages read pairs / labelled answers (data/preference.py)
        self.pref_stats = self.text_stats = None
        self.val_idx: set[int] = set()
        if self.stage == "pt":  # raw text: documents, pieces and blocks (data/text.py)
            self.text_stats = TextStats(opts["max_length"])
        elif self.stage != "sft":
            from tunelab.data.preference import PreferenceStats

            self.pref_stats = PreferenceStats(opts["max_length"])

    def sink(self, role: str):
        if role not in self.sinks:
            path = self.workdir / f".{role}.tmp.jsonl" if self.workdir else None
            self.sinks[role] = open(path, "w", encoding="utf-8") if path else None
        return self.sinks[role]

    def close(self) -> None:
        for f in [self.rejected_file, *self.sinks.values()]:
            if f is not None:
                f.close()

    def reject(self, source: str, item: RawItem, category: str, reason: str, fstats: Counter,
               duplicate_of: str | None = None) -> None:
        if duplicate_of:
            self.duplicates += 1
            fstats["duplicates"] += 1
        else:
            self.rejected += 1
            fstats["rejected"] += 1
            self.rejected_by[category] += 1
            if len(self.rejected_examples) < 50:
                self.rejected_examples.append({"source": source, "location": item.location, "reason": reason})
            if self.rejected < SHOW_REJECTIONS:
                self.console(f"  rejected {source} {item.location}: {reason}")
            elif self.rejected == SHOW_REJECTIONS:
                self.console("  ... (further rejections are listed in rejected.jsonl and report.md)")
        if self.rejected_file is not None:
            entry = {"source": source, "location": item.location, "reason": reason, "category": category}
            if duplicate_of:
                entry["duplicate_of"] = duplicate_of
            entry["raw"] = item.raw
            self.rejected_file.write(to_json(entry) + "\n")

    def warn(self, category: str, where: str) -> None:
        self.warnings[category] += 1
        ex = self.warning_examples.setdefault(category, [])
        if len(ex) < 5:
            ex.append(where)

    def encode(self, conv: Conversation):
        """Encode with the real template and mask; Invalid when the record cannot be trained."""
        from tunelab.data.template import RecordRejected, encode_record

        o, tok = self.opts, self.tok
        try:
            enc = encode_record(tok, conv.messages, tools=conv.tools, max_length=None, train_on=o["train_on"])
            n = len(enc.input_ids)
            self.lengths.append(n)  # every record that reached the tokenizer, dropped ones included
            if n > o["max_length"]:
                self.tok_counts["over_max_length"] += 1
                if o["overflow"] == "keep":
                    self.tok_counts["kept_over_max_length"] += 1
                else:
                    enc = encode_record(tok, conv.messages, tools=conv.tools, max_length=o["max_length"],
                                        train_on=o["train_on"], overflow=o["overflow"])
                    self.tok_counts["truncated"] += enc.truncated
                    if enc.truncated:  # which records were cut, as the preference stages say it
                        conv.warnings.append(("truncated_to_max_length", f"cut to max_length={o['max_length']}"))
        except RecordRejected as e:
            if e.kind != "control_token":  # token_stats count what the token limits did; too_long: overflow=drop
                self.tok_counts["dropped" if e.kind == "too_long" else "nothing_to_train"] += 1
            raise Invalid(e.kind, str(e)) from None
        except Exception as e:  # a Jinja template may raise anything (e.g. "roles must alternate")
            raise Invalid("chat_template", template_refusal(e)) from None
        self.tok_counts["eos_appended"] += enc.eos_appended
        self.trained.append(enc.num_trained)
        return enc

    def add(self, source: str, file_idx: int, item_no: int, item: RawItem, role: str, fstats: Counter) -> None:
        self.read += 1
        fstats["records_read"] += 1
        if item.error:
            category = "encoding" if "UTF" in item.error else "invalid_json" if "JSON" in item.error else "malformed"
            return self.reject(source, item, category, item.error, fstats)
        if self.map_sources and isinstance(item.value, dict):
            self.map_seen.update(self.map_sources.intersection(item.value))
        try:
            if self.stage == "pt":
                from tunelab.data.text import normalize_text

                conv = normalize_text(item.value, self.opts["column_map"])
                key = hash(conv.text)
            elif self.stage != "sft":
                from tunelab.data.preference import normalize_preference

                conv = normalize_preference(item.value, self.stage, self.notes, self.opts["system_prompt"],
                                            self.opts["column_map"])
                key = hash(json.dumps(conv.row(), ensure_ascii=False))
            else:
                conv = normalize(item.value, self.opts["format"], self.opts["column_map"],
                                 self.opts["system_prompt"], self.notes)
                key = hash(json.dumps([conv.messages, conv.tools], ensure_ascii=False))
        except Invalid as e:
            if e.format:
                self._saw_format(e.format, item, fstats)
            return self.reject(source, item, e.category, e.reason, fstats)
        except (RecursionError, ValueError, TypeError) as e:  # e.g. tools nested thousands deep: reject, never crash
            return self.reject(source, item, "malformed", f"cannot be processed ({type(e).__name__}: {e})", fstats)
        self._saw_format(conv.format, item, fstats)
        first = self.seen.get(key)
        if first is not None:
            if role == "eval":  # held out no more: it scores a record the model trains on (or one already held out)
                self.warn("eval_record_is_a_duplicate", f"{source} {item.location}")
            return self.reject(source, item, "duplicate", "duplicate of an earlier record", fstats,
                               duplicate_of=self._where(first))
        # One int per record keeps memory flat: the file, and its line (or, for Parquet, the row number).
        self.seen[key] = (file_idx << 40) | (item.line or (1 << 39) | item_no)
        if self.tok is None:
            return self._accept(source, item, role, fstats, conv, None)
        self.pending.append((source, item, role, fstats, conv))
        if len(self.pending) >= ENCODE_CHUNK:
            self.flush()

    def flush(self) -> None:
        """Encode the pending records (tokenised together, in parallel, by the Rust tokenizer) and file them."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        self.tok.begin()
        if self.stage == "sft":
            self.tok.pretokenize([conv for *_, conv in pending], self.opts["train_on"])
        for source, item, role, fstats, conv in pending:
            try:
                enc = (self.encode(conv) if self.stage == "sft" else encode_document(self.tok, conv, role, self.text_stats)
                       if self.stage == "pt" else self._encode_preference(conv))
            except Invalid as e:
                self.reject(source, item, e.category, e.reason, fstats)
                continue
            if conv.tools and self._template_ignores_tools():
                conv.warnings.append(("tools_not_rendered", "the record has tools but the chat template does not "
                                                            "render them: the model will not see the schemas"))
            self._accept(source, item, role, fstats, conv, enc)
        self.tok.begin()

    def _template_ignores_tools(self) -> bool:
        if not hasattr(self, "_ignores_tools"):
            probe = [{"role": "user", "content": "hi"}]
            tool = [{"type": "function", "function": {"name": "tunelab_probe", "description": "probe",
                                                      "parameters": {"type": "object", "properties": {}}}}]
            try:
                self._ignores_tools = (self.tok._tok.apply_chat_template(probe, tokenize=False, tools=tool)
                                       == self.tok._tok.apply_chat_template(probe, tokenize=False))
            except Exception:  # a template that refuses tools is reported per record by encode
                self._ignores_tools = False
        return self._ignores_tools

    def _encode_preference(self, rec):
        from tunelab.data.preference import encode_preference
        from tunelab.data.template import RecordRejected

        try:
            enc = encode_preference(self.tok, rec.row(), self.opts["max_length"], self.opts["overflow"])
        except RecordRejected as e:
            raise Invalid(e.kind, str(e)) from None
        except Exception as e:  # a Jinja template may raise anything
            raise Invalid("chat_template", template_refusal(e)) from None
        self.pref_stats.add(enc)
        if enc["truncated"]:
            rec.warnings.append(("answers_truncated", f"answers cut by {enc['truncated']} tokens to fit max_length"))
        return enc

    def _accept(self, source: str, item: RawItem, role: str, fstats: Counter, conv: Conversation, enc) -> None:
        for category, _msg in conv.warnings:
            self.warn(category, f"{source} {item.location}")
        self.accepted += 1
        fstats["accepted"] += 1
        self.counts_by_role[role] += 1
        if len(self.samples) < self.show_samples and self.stage == "sft":
            self.samples.append((conv, enc))
        out = self.sink(role)
        if out is not None:
            row = {"messages": conv.messages, "tools": conv.tools} if self.stage == "sft" else conv.row()
            out.write(to_json({**row, "source": source, "location": item.location}) + "\n")

    def _saw_format(self, fmt: str, item: RawItem, fstats: Counter) -> None:
        fstats[f"format {fmt}"] += 1
        self.format_first.setdefault(fmt, item.location)

    def _where(self, packed: int) -> str:
        file_idx, n = packed >> 40, packed & ((1 << 40) - 1)
        return f"{self.file_names[file_idx]} " + (f"row {n & ~(1 << 39)}" if n >> 39 else f"line {n}")


# ---------------------------------------------------------------- the public function


def prepare_dataset(inputs: list[str] | str, output: str | Path | None = None, *, format: str = "auto",
                    column_map: dict[str, str] | None = None, tokenizer=None, max_length: int = 512,
                    overflow: str = "truncate", train_on: str = "assistant", val_ratio: float = 0.1,
                    eval_inputs: list[str] | str | None = None, seed: int = 42, system_prompt: str | None = None,
                    check: bool = False, max_reject_ratio: float = 1.0, show_samples: int = 0,
                    name: str | None = None, console: Callable[[str], None] = print,
                    stage: str = "sft", text_documents: str = "auto") -> PrepareResult:
    """Validate and prepare raw data (see the module docstring). `check=True` writes nothing.

    Raises DataError for whole-file problems (every file is checked first, all problems reported at once) and
    bad options; returns a PrepareResult whose ``usable`` is False when nothing was accepted or rejections
    exceed ``max_reject_ratio`` (the folder is still written so the rejections can be read).
    """
    _check_options(stage, format, column_map, overflow, train_on, val_ratio, max_length, max_reject_ratio)
    if text_documents not in TEXT_DOCUMENTS:
        raise DataError(f"text_documents must be one of {', '.join(TEXT_DOCUMENTS)}, not {text_documents!r}")
    found, skipped = resolve_inputs(inputs, text=stage == "pt")
    files = [("train", p) for p in found]
    if eval_inputs:
        found, more = resolve_inputs(eval_inputs, text=stage == "pt")
        files += [("eval", p) for p in found]
        skipped += more
    if skipped:
        console(f"warning: {len(skipped)} file(s) in the input folders are not data files and are not read: "
                + skipped_text(skipped))
    first = inputs if isinstance(inputs, (str, os.PathLike)) else list(inputs)[0]
    name = name or (_stem(Path(first)).replace("*", "") or "dataset")
    out_dir = None if check else Path(output) if output else Path("data") / "processed" / name
    if out_dir is not None and out_dir.exists() and not (is_prepared(out_dir) or is_empty_dir(out_dir)):
        raise DataError(f"{out_dir} exists and is not a prepared dataset: refusing to replace it; "
                        "choose another --output (an existing prepared folder is replaced)")
    options = {"format": format, "column_map": column_map or {}, "max_length": max_length, "overflow": overflow,
               "train_on": train_on, "val_ratio": 0.0 if eval_inputs else val_ratio, "seed": seed,
               "system_prompt": system_prompt, "tokenizer": bool(tokenizer is not None)}
    if stage != "sft":  # only then: the fingerprints of SFT data stay what they were
        options["stage"] = stage
    if stage == "pt":
        options["text_documents"] = text_documents
    tok_id = tokenizer_identity(tokenizer) if tokenizer is not None else None

    workdir = None
    if out_dir is not None:
        try:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            workdir = staging_dir(out_dir)
        except OSError as e:  # e.g. a file where a folder of the path should be
            raise DataError(f"cannot write the prepared dataset to {out_dir}: {e.strerror or e}") from None
        _warn_if_short(files, out_dir.parent, console)
    try:
        p = _Pass(tokenizer, options | {"column_map": column_map}, console, workdir, show_samples)
        p.file_names = [str(path) for _, path in files]
        file_reports = _read_all(p, files, console)
        report = _build_report(p, files, file_reports, options, tok_id, name, max_reject_ratio, out_dir)
        split_counts = _split(p, workdir, val_ratio if not eval_inputs else None, seed, report)
        report["split"] = split_counts
        report["skipped_files"] = [str(f) for f in skipped]
        if p.text_stats is not None and p.tok is not None:
            report["text_stats"] = p.text_stats.report(p.val_idx)
        _print_summary(p, report, console)
        if workdir is not None:
            _write_folder(workdir, report, out_dir)
            workdir = None
    except OSError as e:  # the readers turn an input's OSErrors into FileErrors: this one is a write (a full disk)
        if workdir is None or (e.filename is not None and workdir not in Path(e.filename).parents):
            raise
        why = write_failure(e, out_dir.parent)
        raise DataError(f"could not write the prepared dataset {out_dir}: {why}. Nothing was written to {out_dir} "
                        f"and no partial file was left; {retry_advice(why, 'prepare again')}") from None
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    if out_dir is None:
        console("check only: nothing was written")
    else:
        console(f"wrote {out_dir}/ (train.jsonl, val.jsonl, report.json, report.md, rejected.jsonl"
                + (", length_histogram.png)" if report["token_stats"] else ")"))
    return PrepareResult(out_dir, report, report["usable"], report["problems"])


def _warn_if_short(files: list[tuple[str, Path]], folder: Path, console) -> None:
    """Said before the pass, not after it: the prepared records (about 1-1.3x their JSONL input, with the messages'
    keys, source and location) are written as they are read, then held twice while split into train and val."""
    size = sum(path.stat().st_size for _, path in files)
    free = shutil.disk_usage(folder).free
    if free < 2.5 * size:
        console(f"warning: {free / 2**20:,.0f} MiB are free in {folder}, and the prepared dataset may take about "
                f"{2.5 * size / 2**20:,.0f} MiB while it is written ({size / 2**20:,.0f} MiB of input; more for "
                "gzip or Parquet input); if the disk fills, nothing is kept: free some space or choose another "
                "--output")


def _read_all(p: _Pass, files: list[tuple[str, Path]], console) -> list[dict[str, Any]]:
    errors: list[str] = []
    file_reports = []
    try:
        for idx, (role, path) in enumerate(files):
            info = FileInfo(str(path))
            fstats: Counter = Counter({"records_read": 0, "accepted": 0, "rejected": 0, "duplicates": 0})
            source = str(path)
            try:
                items = records_of(path, info, p.stage, p.opts.get("text_documents", "auto"))
                first = next(items, None)
                console(f"reading {path} ({info.describe()})")
                if first is not None:
                    p.add(source, idx, 1, first, role, fstats)
                    for n, item in enumerate(items, 2):
                        p.add(source, idx, n, item, role, fstats)
                p.flush()
            except FileError as e:
                errors.append(str(e))
            file_reports.append(_file_report(p, source, role, info, fstats))
            p.format_first = {}
    finally:
        p.close()
    if errors:
        raise DataError(("these files cannot be read as datasets:\n  " if len(errors) > 1 else "")
                        + "\n  ".join(errors))
    return file_reports


def _file_report(p: _Pass, source: str, role: str, info: FileInfo, fstats: Counter) -> dict[str, Any]:
    """One file's line of the report; a file that mixes record formats is a warning (see docs/data.md)."""
    if info.encoding.endswith("BOM"):
        p.notes["byte-order mark stripped"] += 1
    if info.crlf:
        p.notes["CRLF line endings read"] += 1
    if info.blank_lines:
        p.notes["blank lines skipped"] += info.blank_lines
    # Records of each format (accepted or rejected, in order of first appearance) and where each first occurs.
    formats = {k[7:]: v for k, v in fstats.items() if k.startswith("format ")}
    if len(formats) > 1:
        # Each record is still read by its own format, so nothing is lost; but a file that mixes them is
        # usually two exports concatenated, or a format detected wrongly: say so, with where each one starts.
        p.warnings["mixed_formats"] += sum(formats.values()) - max(formats.values())
        p.warning_examples.setdefault("mixed_formats", []).append(
            f"{source}: " + rpt.formats_text(formats, p.format_first))
    return {"path": source, "role": role, "container": info.container, "encoding": info.encoding,
            "crlf": info.crlf, "formats": formats, "format_first": dict(p.format_first),
            **{k: v for k, v in fstats.items() if not k.startswith("format ")}}


def _build_report(p: _Pass, files, file_reports, options, tok_id, name, max_reject_ratio, out_dir) -> dict:
    assert p.read == p.accepted + p.rejected + p.duplicates, "conservation broken: a record was lost"
    fp, states = fingerprint(files, options, tok_id)
    for file_report, state in zip(file_reports, states):
        file_report.update(state)
    for dst, src in (options["column_map"] or {}).items():  # a map that read nothing: each record's own field was
        if src in p.map_sources - p.map_seen and p.read:
            p.warn("map_column_not_found", f"--map {dst}={src}: no record has a column '{src}' (each record's own "
                                           f"'{dst}' was read)")
    notes = dict(p.notes)
    if p.duplicates:
        notes["duplicates removed"] = p.duplicates
    token_stats = None
    if p.tok is not None and p.stage == "sft":
        token_stats = rpt.token_stats(p.lengths, p.trained, options["max_length"], dict(p.tok_counts), tok_id["name"])
        token_stats["overflow"] = options["overflow"]
    problems = []
    if p.counts_by_role["train"] == 0:
        problems.append("no record was accepted for training" + (
            f" (all {p.read} rejected or duplicates; see the reasons above and rejected.jsonl)" if p.read else ""))
    ratio = p.rejected / p.read if p.read else 0.0
    if ratio > max_reject_ratio:
        problems.append(f"{p.rejected} of {p.read} records ({ratio:.1%}) were rejected, more than "
                        f"max_reject_ratio={max_reject_ratio:g}")
    return {
        "name": name, "tunelab_prepare_version": PREPARE_VERSION,
        "records_read": p.read, "records_accepted": p.accepted, "records_rejected": p.rejected,
        "duplicates_removed": p.duplicates, "reject_ratio": round(ratio, 6),
        "usable": not problems, "problems": problems,
        "warnings": dict(p.warnings), "warning_examples": p.warning_examples, "normalisations": notes,
        "rejected_by_reason": dict(p.rejected_by), "rejected_examples": p.rejected_examples,
        "token_stats": token_stats, "fingerprint": fp,
        **({"preference_stats": p.pref_stats.report()} if p.pref_stats is not None and p.tok is not None else {}),
        "tokenizer": tok_id, "options": options | {"max_reject_ratio": max_reject_ratio}, "files": file_reports,
        "output": str(out_dir) if out_dir else None,
    }


def _split(p: _Pass, workdir: Path | None, val_ratio: float | None, seed: int, report: dict) -> dict[str, Any]:
    """Deterministic split by seed: exactly round(n * val_ratio) records (at least 1 when n >= 2) go to val."""
    n = p.counts_by_role["train"]
    if val_ratio is None:  # an explicit eval file
        counts = {"train": n, "val": p.counts_by_role["eval"], "how": "explicit eval file"}
        val_idx: set[int] = set()
        if not counts["val"]:
            report["warnings"]["no_validation_split"] = 1
            report["warning_examples"]["no_validation_split"] = [
                "no record of the eval file is left (each one rejected, or a duplicate of a training record): "
                "nothing held out"]
    else:
        k = round(n * val_ratio)
        if val_ratio > 0 and k == 0 and n >= 2:
            k = 1
        if val_ratio > 0 and n == 1:
            report["warnings"]["no_validation_split"] = 1
            report["warning_examples"]["no_validation_split"] = ["only 1 accepted record: nothing held out"]
        val_idx = set(random.Random(seed).sample(range(n), k)) if k else set()
        counts = {"train": n - k, "val": k, "how": f"val_ratio={val_ratio:g}, seed={seed}"}
    p.val_idx = val_idx  # stage pt counts the blocks of each split
    if workdir is not None:
        with open(workdir / "train.jsonl", "w", encoding="utf-8") as tr, \
                open(workdir / "val.jsonl", "w", encoding="utf-8") as va:
            src = workdir / ".train.tmp.jsonl"
            if src.exists():
                with open(src, encoding="utf-8") as f:
                    for i, line in enumerate(f):
                        (va if i in val_idx else tr).write(line)
                src.unlink()
            ev = workdir / ".eval.tmp.jsonl"
            if ev.exists():
                with open(ev, encoding="utf-8") as f:
                    shutil.copyfileobj(f, va)
                ev.unlink()
    return counts


def _print_summary(p: _Pass, report: dict, console) -> None:
    if report["normalisations"]:
        console("normalised: " + ", ".join(f"{k} ×{v}" for k, v in sorted(report["normalisations"].items(),
                                                                           key=lambda kv: -kv[1])))
    for cat, count in report["warnings"].items():
        ex = report["warning_examples"].get(cat, [])
        if cat != "mixed_formats":
            console(f"warning: {cat}: {count} record(s), e.g. {'; '.join(ex[:3])}")
    for f in report["files"]:
        if len(f["formats"]) > 1:
            console(f"warning: {f['path']} mixes record formats: {rpt.formats_text(f['formats'], f['format_first'])}; "
                    "each record was read by its own format (use --format to insist on one)")
    if report["rejected_by_reason"]:
        console("rejected by reason: " + ", ".join(f"{k} {v}" for k, v in report["rejected_by_reason"].items()))
    ts = report["token_stats"]
    if ts:
        console(f"tokens ({ts['tokenizer']}, chat template applied): p50 {ts['p50']}, p95 {ts['p95']}, "
                f"max {ts['max']}; {ts['over_max_length']} over max_length={ts['max_length']} "
                f"(overflow={ts['overflow']}: {ts['truncated']} truncated, {ts['dropped']} dropped, "
                f"{ts['kept_over_max_length']} kept); {ts['nothing_to_train']} with nothing to train (rejected)")
        for line in rpt.histogram_lines(ts["histogram"], ts["max_length"]):
            console(line)
    if report.get("preference_stats"):
        from tunelab.data.preference import PreferenceStats

        console(PreferenceStats.line(report["preference_stats"]))
    if report.get("text_stats"):
        console(TextStats.line(report["text_stats"]))
    _print_samples(p, console)
    console(f"records: {rpt.conservation_line(report)}")
    s = report["split"]
    console(f"split: {s['train']} train / {s['val']} val ({s['how']}); fingerprint {report['fingerprint'][:19]}…")
    for problem in report["problems"]:
        console(f"NOT USABLE: {problem}")


def _print_samples(p: _Pass, console) -> None:
    if not p.samples:
        return
    from tunelab.data.template import show_trained_span, trained_turns

    console(f"{len(p.samples)} sample(s); the text between [[ and ]] is what the loss trains on:")
    for i, (conv, enc) in enumerate(p.samples, 1):
        console(f"--- sample {i}")
        if enc is not None:
            console(show_trained_span(p.tok, enc))
            continue
        # no tokenizer, no chat template to render: the turns, those the mask trains marked by the mask's own rule
        trained = trained_turns(conv.messages, p.opts["train_on"])
        for j, m in enumerate(conv.messages):
            console(f"{m['role']}: " + (f"[[{m['content']}]]" if j in trained else m["content"]))


def _write_folder(workdir: Path, report: dict, out_dir: Path) -> None:
    ts = report["token_stats"]
    if ts:
        rpt.write_histogram_png(ts["histogram"], ts["max_length"], workdir / "length_histogram.png",
                                f"{report['name']}: tokens per record ({report['records_accepted']} records)")
    report["output_sha256"] = {name: sha256_file(workdir / name) for name in PREPARED_FILES}  # see load_prepared
    (workdir / "report.json").write_text(to_json(report, indent=2) + "\n", encoding="utf-8")
    # a file name that is not valid UTF-8 (os.fsdecode's surrogates) is written escaped, as to_json does
    (workdir / "report.md").write_text(rpt.markdown(report), encoding="utf-8", errors="backslashreplace")
    if out_dir.exists():
        shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
    os.replace(workdir, out_dir)
