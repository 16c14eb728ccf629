"""Read raw dataset files into located raw records, whatever their container and encoding.

The container is sniffed from the bytes, never from the extension: Parquet by its ``PAR1`` magic; a JSON array
or single object when the text starts with ``[`` / a multi-line ``{``; JSON Lines when a line holds one complete
object; otherwise CSV/TSV with a header row. Text may be UTF-8 (with or without BOM), UTF-16/32 with BOM, and
use LF or CRLF line endings.

    for item in read_file(Path("data/raw/x.json"), info):
        item.location, item.value, item.error   # "record 3 (line 12)", the parsed object, or why it is unreadable

Problems of one record (invalid JSON on a JSONL line, invalid UTF-8 bytes, a CSV row with the wrong number of
fields) come back as an item with ``error`` set, so the caller rejects just that record. Problems of the whole
file (empty, truncated JSON array, trailing comma, unknown container) raise ``FileError`` with line and column.
JSONL, CSV and Parquet are streamed (memory does not grow with the file); a JSON array is parsed whole.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

_WS = re.compile(r"[ \t\n\r]*")
_SNIFF_BYTES = 1 << 16  # enough to see the first JSONL line or CSV header of any sane file
_BOMS = [  # longest first: the UTF-32-LE BOM starts with the UTF-16-LE one
    (b"\xff\xfe\x00\x00", "utf-32-le", "UTF-32 (BOM)"),
    (b"\x00\x00\xfe\xff", "utf-32-be", "UTF-32 (BOM)"),
    (b"\xef\xbb\xbf", "utf-8", "UTF-8 with BOM"),
    (b"\xff\xfe", "utf-16-le", "UTF-16 (BOM)"),
    (b"\xfe\xff", "utf-16-be", "UTF-16 (BOM)"),
]


class DataError(TunelabError):
    """A dataset problem phrased for a person; the CLI prints it without a traceback (exit 2)."""


class FileError(DataError):
    """The whole file cannot be read as records (empty, truncated, not JSON/JSONL/CSV/Parquet...)."""

    def __init__(self, path: Path | str, message: str, line: int | None = None, column: int | None = None):
        where = f"line {line}, column {column}" if line and column else f"line {line}" if line else ""
        super().__init__(f"{path}: {where + ': ' if where else ''}{message}")
        self.path, self.line, self.column, self.reason = str(path), line, column, message


@dataclass
class FileInfo:
    """What was found out about one input file while reading it (goes into the report)."""

    path: str
    container: str = "?"
    encoding: str = "UTF-8"
    crlf: bool = False
    blank_lines: int = 0
    bad_lines: int = 0  # lines with bytes that are not valid in the file's encoding

    def describe(self) -> str:
        return f"{self.container}, {self.encoding}" + (", CRLF line endings" if self.crlf else "")


class RawItem:
    """One record as read: where it is, its parsed value, or why it could not be parsed; raw text on demand."""

    __slots__ = ("location", "line", "value", "error", "_raw", "_span")

    def __init__(self, location: str, line: int | None, value: Any = None, error: str | None = None,
                 raw: str | None = None, span: tuple[str, int, int] | None = None):
        self.location, self.line, self.value, self.error = location, line, value, error
        self._raw, self._span = raw, span

    @property
    def raw(self) -> str:
        if self._raw is None:
            if self._span is not None:
                text, start, end = self._span
                self._raw = text[start:end]
            else:
                self._raw = json.dumps(self.value, ensure_ascii=False, default=str)
        return self._raw


def _sniff_encoding(head: bytes) -> tuple[str, int, str]:
    for bom, codec, label in _BOMS:
        if head.startswith(bom):
            return codec, len(bom), label
    sample = head[:4096]
    if sample and sample.count(0) > len(sample) // 4:
        return "binary", 0, "binary"
    return "utf-8", 0, "UTF-8"


def _bad_byte_reason(line: bytes, err: UnicodeDecodeError) -> str:
    col = len(line[: err.start].decode("utf-8", "replace")) + 1
    hint = ""
    if re.search(rb"[\x80-\xff]", line) and not re.search(rb"[\xc2-\xf4][\x80-\xbf]", line):
        hint = "; the file looks like Latin-1/Windows-1252: convert it, e.g. iconv -f cp1252 -t utf-8"
    return f"invalid UTF-8 byte 0x{line[err.start]:02x} at column {col}{hint}"


def _text_lines(path: Path, codec: str, bom_len: int, info: FileInfo) -> Iterator[tuple[int, str, str | None]]:
    """(line number from 1, decoded line with its ending, encoding problem or None), streamed."""
    with open(path, "rb") as f:
        f.seek(bom_len)
        if codec == "utf-8":
            for n, b in enumerate(f, 1):
                try:
                    s = b.decode("utf-8")
                    bad = None
                except UnicodeDecodeError as e:
                    s, bad = b.decode("utf-8", "replace"), _bad_byte_reason(b, e)
                    info.bad_lines += 1
                yield n, s, bad
        else:
            stream = io.TextIOWrapper(f, encoding=codec, errors="replace", newline="")
            for n, s in enumerate(stream, 1):
                bad = f"invalid {info.encoding.split()[0]} data on this line" if "\ufffd" in s else None
                info.bad_lines += bad is not None
                yield n, s, bad


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(_SNIFF_BYTES)


def _first_lines(path: Path, codec: str, bom_len: int, info: FileInfo, k: int = 2) -> list[str]:
    out = []
    for _, s, _bad in _text_lines(path, codec, bom_len, FileInfo(info.path)):
        if s.strip():
            out.append(s.strip())
            if len(out) == k:
                break
    return out


def _is_json_object(s: str) -> bool:
    try:
        return isinstance(json.loads(s), dict)
    except (ValueError, RecursionError):
        return False


def sniff(path: Path, info: FileInfo) -> tuple[str, str, int]:
    """(container, codec, bom length) from the file's content; FileError when it is none we read."""
    head = _read_head(path)
    if head.startswith(b"PAR1"):
        info.container, info.encoding = "Parquet", "binary"
        return "parquet", "binary", 0
    codec, bom_len, label = _sniff_encoding(head)
    info.encoding = label
    if codec == "binary":
        raise FileError(path, "this is a binary file (or UTF-16 without a BOM): save it as UTF-8 JSON, JSONL, CSV "
                              "or Parquet")
    text = head[bom_len:].decode(codec, "replace")
    info.crlf = "\r\n" in text
    stripped = text.lstrip(" \t\r\n\ufeff")
    if not stripped:
        raise FileError(path, "the file is empty (no records)")
    first = stripped[:1]
    if first == "[":
        info.container = "JSON array"
        return "json", codec, bom_len
    if first == "{":
        lines = _first_lines(path, codec, bom_len, info)
        if lines and (_is_json_object(lines[0]) or (len(lines) > 1 and _is_json_object(lines[1]))):
            info.container = "JSONL"
            return "jsonl", codec, bom_len
        info.container = "JSON object"
        return "json", codec, bom_len
    header = stripped.splitlines()[0] if stripped else ""
    delim = _csv_delimiter(header)
    if delim and _csv_rows_agree(stripped, delim):
        info.container = "TSV" if delim == "\t" else "CSV"
        return "csv", codec, bom_len
    shown = header[:60].encode("unicode_escape").decode()
    raise FileError(path, f"cannot tell what this file is: it is not JSON (starts with '[' or '{{'), JSON Lines, "
                          f"CSV/TSV with a header row, or Parquet; it starts with: {shown!r}", 1, 1)


def _csv_delimiter(header: str) -> str | None:
    counts = {d: header.count(d) for d in (",", "\t", ";")}
    delim = max(counts, key=counts.get)
    if not counts[delim]:
        return None
    names = next(csv.reader([header], delimiter=delim))
    # A header is short names; a line of prose with a comma is not one.
    if len(names) >= 2 and all(0 < len(n.strip()) <= 64 for n in names):
        return delim
    return None


def _csv_rows_agree(text: str, delim: str) -> bool:
    """The first data row has as many fields as the header (prose with a comma does not)."""
    try:
        rows = [r for _, r in zip(range(3), csv.reader(io.StringIO(text), delimiter=delim)) if r]
    except csv.Error:
        return False
    return len(rows) < 2 or len(rows[1]) == len(rows[0])


# ---------------------------------------------------------------- JSON Lines


def _read_jsonl(path: Path, codec: str, bom_len: int, info: FileInfo) -> Iterator[RawItem]:
    loads = json.loads
    for n, s, bad in _text_lines(path, codec, bom_len, info):
        if s.endswith("\r\n"):
            info.crlf = True
        s = s.strip()
        if not s:
            info.blank_lines += 1
            continue
        loc = f"line {n}"
        if bad:
            yield RawItem(loc, n, error=bad, raw=s)
            continue
        try:
            yield RawItem(loc, n, loads(s), raw=s)
        except ValueError as e:
            yield RawItem(loc, n, error=_json_line_reason(e, s), raw=s)
        except RecursionError:
            yield RawItem(loc, n, error="invalid JSON: nested too deeply", raw=s)


def _json_line_reason(e: ValueError, s: str) -> str:
    if isinstance(e, json.JSONDecodeError):
        cut = " (the line is cut off: is the file truncated?)" if e.pos >= len(s) - 1 or s[-1] != "}" else ""
        return f"invalid JSON at column {e.colno}: {e.msg}{cut}"
    return f"invalid JSON: {e}"


# ---------------------------------------------------------------- JSON document (array or one object)


def _decode_whole(path: Path, codec: str, bom_len: int, info: FileInfo) -> tuple[str, dict[int, str]]:
    """The file's text and {line: encoding problem} for lines with invalid bytes (replaced by U+FFFD)."""
    data = path.read_bytes()[bom_len:]
    try:
        return data.decode(codec), {}
    except UnicodeDecodeError:
        pass
    parts, bad = [], {}
    for n, s, problem in _text_lines(path, codec, bom_len, info):
        parts.append(s)
        if problem:
            bad[n] = problem
    return "".join(parts), bad


class _Lines:
    """Map a character offset to (line, column), both from 1."""

    def __init__(self, text: str):
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def at(self, pos: int) -> tuple[int, int]:
        i = bisect.bisect_right(self.starts, pos) - 1
        return i + 1, pos - self.starts[i] + 1


def _read_json(path: Path, codec: str, bom_len: int, info: FileInfo) -> Iterator[RawItem]:
    text, bad = _decode_whole(path, codec, bom_len, info)
    lines = _Lines(text)
    pos = _WS.match(text, 0).end()
    if pos >= len(text):
        raise FileError(path, "the file is empty (no records)")
    if text[pos] == "[":
        spans = _scan_array(path, text, pos, lines, bad)
    elif text[pos] == "{":
        spans = [_scan_object(path, text, pos, lines, bad)]
    else:
        line, col = lines.at(pos)
        raise FileError(path, "expected a JSON array of records or one record object", line, col)
    for i, (start, end, value) in enumerate(spans, 1):
        line, _ = lines.at(start)
        last, _ = lines.at(end - 1)
        loc = f"record {i} (line {line})"
        problem = next((f"line {n}: {bad[n]}" for n in range(line, last + 1) if n in bad), None) if bad else None
        if problem:
            yield RawItem(loc, line, error=problem, span=(text, start, end))
        else:
            yield RawItem(loc, line, value, span=(text, start, end))


def _json_error(path: Path, e: json.JSONDecodeError, lines: _Lines, bad: dict[int, str], what: str) -> FileError:
    line, col = lines.at(e.pos)
    hint = f"; note line {min(bad)} has {bad[min(bad)]}" if bad else ""
    return FileError(path, f"invalid JSON in {what}: {e.msg}{hint}", line, col)


def _scan_object(path, text, pos, lines, bad):
    try:
        value, end = json.JSONDecoder().raw_decode(text, pos)
    except RecursionError:
        raise FileError(path, "the JSON object is nested too deeply to read", *lines.at(pos)) from None
    except json.JSONDecodeError as e:
        if e.pos >= len(text.rstrip()) or not text.rstrip().endswith("}"):
            line, col = lines.at(len(text))
            raise FileError(path, "the file ends in the middle of the JSON object (truncated?)", line, col) from None
        raise _json_error(path, e, lines, bad, "the JSON object") from None
    rest = _WS.match(text, end).end()
    if rest < len(text):
        line, col = lines.at(rest)
        raise FileError(path, "extra data after the JSON object (for one record per line, every line must be a "
                              "complete JSON object: JSON Lines)", line, col)
    return pos, end, value


def _scan_array(path: Path, text: str, pos: int, lines: _Lines, bad: dict[int, str]) -> list[tuple[int, int, Any]]:
    """Split a JSON array into (start, end, value) per element, with exact positions for every problem."""
    decode = json.JSONDecoder().raw_decode
    ws = _WS.match
    n = len(text)
    out: list[tuple[int, int, Any]] = []
    pos = ws(text, pos + 1).end()
    if pos < n and text[pos] == "]":
        raise FileError(path, "the JSON array is empty (no records)", *lines.at(pos))
    comma = None
    while True:
        if pos >= n:
            raise FileError(path, f"the file ends before the JSON array is closed with ']' (truncated?); "
                                  f"{len(out)} complete records before that", *lines.at(n))
        if text[pos] == "]" and comma is not None:
            raise FileError(path, f"trailing comma after record {len(out)}: JSON does not allow a comma before "
                                  "']'; delete it", *lines.at(comma))
        try:
            value, end = decode(text, pos)
        except RecursionError:
            raise FileError(path, f"record {len(out) + 1} is nested too deeply to read", *lines.at(pos)) from None
        except json.JSONDecodeError as e:
            if e.pos >= len(text.rstrip()) or not text.rstrip().endswith("]"):
                raise FileError(path, f"the file ends in the middle of record {len(out) + 1} (truncated?); "
                                      f"{len(out)} complete records before it", *lines.at(n)) from None
            raise _json_error(path, e, lines, bad, f"record {len(out) + 1}") from None
        out.append((pos, end, value))
        pos = ws(text, end).end()
        if pos >= n:
            raise FileError(path, f"the file ends before the JSON array is closed with ']' (truncated?); "
                                  f"{len(out)} complete records before that", *lines.at(n))
        c = text[pos]
        if c == ",":
            comma, pos = pos, ws(text, pos + 1).end()
        elif c == "]":
            rest = ws(text, pos + 1).end()
            if rest < n:
                raise FileError(path, "extra data after the closing ']' of the JSON array", *lines.at(rest))
            return out
        else:
            raise FileError(path, f"expected ',' or ']' after record {len(out)}, found {c!r} (a missing comma?)",
                            *lines.at(pos))


# ---------------------------------------------------------------- CSV / TSV


def _read_csv(path: Path, codec: str, bom_len: int, info: FileInfo) -> Iterator[RawItem]:
    physical: list[tuple[int, str, str | None]] = []  # lines of the row being read

    def feed():
        for item in _text_lines(path, codec, bom_len, info):
            if item[1].endswith("\r\n"):
                info.crlf = True
            physical.append(item)
            yield item[1]

    csv.field_size_limit(2**31 - 1)  # long answers are normal; the default 128 KiB limit is not
    first = _first_lines(path, codec, bom_len, info, 1)
    delim = _csv_delimiter(first[0]) if first else ","
    reader = csv.reader(feed(), delimiter=delim or ",", strict=True)
    header: list[str] | None = None
    row_no = 0
    while True:
        physical.clear()
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            line = physical[0][0] if physical else reader.line_num
            raise FileError(path, f"the CSV cannot be parsed: {e} (an unclosed quote?)", line) from None
        if not physical:
            continue
        start = physical[0][0]
        raw = "".join(s for _, s, _ in physical).rstrip("\r\n")
        if header is None:
            header = [h.strip().lstrip("\ufeff") for h in row]
            dup = {h for h in header if header.count(h) > 1}
            if dup or not all(header):
                raise FileError(path, f"the CSV header has empty or repeated column names: {row}", start)
            continue
        if not any(x.strip() for x in row):
            info.blank_lines += 1
            continue
        row_no += 1
        loc = f"row {row_no} (line {start})"
        bad = next((f"line {n}: {p}" for n, _, p in physical if p), None)
        if bad:
            yield RawItem(loc, start, error=bad, raw=raw)
        elif len(row) != len(header):
            yield RawItem(loc, start, error=f"the row has {len(row)} fields but the header has {len(header)} "
                                            f"({', '.join(header)}); an unquoted '{delim}' in a value?", raw=raw)
        else:
            yield RawItem(loc, start, dict(zip(header, row)), raw=raw)
    if header is None:
        raise FileError(path, "the file is empty (no records)")


# ---------------------------------------------------------------- Parquet


def _read_parquet(path: Path, info: FileInfo) -> Iterator[RawItem]:
    try:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
    except ImportError:
        raise DataError("reading Parquet needs pyarrow: pip install pyarrow") from None
    except Exception as e:  # pyarrow raises its own ArrowInvalid/OSError family for a broken file
        raise FileError(path, f"not a readable Parquet file: {str(e).splitlines()[0]}") from None
    row = 0
    for batch in pf.iter_batches(batch_size=2048):
        for value in batch.to_pylist():
            row += 1
            yield RawItem(f"row {row}", None, value)


def read_file(path: Path, info: FileInfo) -> Iterator[RawItem]:
    """Every record of one file, in order; FileError (raised before any record) for a whole-file problem."""
    try:
        kind, codec, bom_len = sniff(path, info)
        if kind == "parquet":
            yield from _read_parquet(path, info)
        elif kind == "jsonl":
            yield from _read_jsonl(path, codec, bom_len, info)
        elif kind == "csv":
            yield from _read_csv(path, codec, bom_len, info)
        else:
            yield from _read_json(path, codec, bom_len, info)
    except OSError as e:
        raise FileError(path, f"cannot read the file: {e.strerror or e}") from None
