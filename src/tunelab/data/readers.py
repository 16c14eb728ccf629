"""Read raw dataset files into located raw records, whatever their container and encoding.

The container is sniffed from the bytes, never from the extension: Parquet by its ``PAR1`` magic; a JSON array
or single object when the text starts with ``[`` / a multi-line ``{``; JSON Lines when a line holds one complete
object; otherwise CSV/TSV with a header row (one name is enough; an empty first name is pandas' index, not
read). Text may be UTF-8 (with or without BOM), UTF-16/32 with BOM, and use LF or CRLF line endings. A gzip-compressed
file is read as it is (`open_bytes`, told by its first bytes: `datasets` users expect a .jsonl.gz to load); other
compressions and archives (bzip2, xz, zstd, zip, 7z) are refused with the command that unpacks them.

    for item in read_file(Path("data/raw/x.json"), info):
        item.location, item.value, item.error   # "record 3 (line 12)", the parsed object, or why it is unreadable

Problems of one record (invalid JSON on a JSONL line, invalid UTF-8 bytes, a key repeated in one object, a CSV
row with the wrong number of fields) come back as an item with ``error`` set, so the caller rejects just that record. Problems of the whole
file (empty, truncated JSON array, trailing comma, unknown container) raise ``FileError`` with line and column.
Every container is streamed: memory does not grow with the file. A JSON array is read element by element
through a moving window (`_Window`, ``json.JSONDecoder.raw_decode`` over chunks), so a multi-GB array needs a
few MB and every element keeps its exact line; a record nested too deeply for Python's parser is rejected
alone. (ijson would stream too, but it parses numbers as Decimal and reports neither the element's text nor
positions for the messages below; raw_decode gives both with the standard library.)
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.values import parse_int
from tunelab.errors import TunelabError

_WS = re.compile(r"[ \t\n\r]*")
_ONE_NAME = re.compile(r"[A-Za-z_][\w-]{0,63}")  # the header of a one-column CSV (a name, not a line of prose)
_SNIFF_BYTES = 1 << 16  # enough to see the first JSONL line or CSV header of any sane file
_SNIFF_LINES = 8  # non-blank lines looked at to tell JSON Lines (a few bad lines at its top) from a JSON document
_MARK = "tunelab-mark-bad-bytes"
_MARKED = re.compile("[\udc00-\udcff]")  # what _MARK decodes a bad byte to; valid decoding never yields these
GZIP_MAGIC = b"\x1f\x8b"
# Compressions and archives not read, told by their first bytes: refused with the command that unpacks them.
_NOT_READ = [
    (rb"BZh[1-9]1AY&SY", "bzip2-compressed", "decompress it first, e.g. bunzip2 -k FILE"),
    (rb"\xfd7zXZ\x00", "xz-compressed", "decompress it first, e.g. unxz -k FILE"),
    (rb"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it first, e.g. unzstd FILE"),
    (rb"7z\xbc\xaf\x27\x1c", "a 7z archive", "extract the data file first, e.g. 7z x FILE"),
    (rb"PK\x03\x04", "a zip archive (as .xlsx and .docx files are)",
     "extract the data file first (unzip FILE), or export a spreadsheet as CSV"),
]
_BOMS = [  # longest first: the UTF-32-LE BOM starts with the UTF-16-LE one
    (b"\xff\xfe\x00\x00", "utf-32-le", "UTF-32 (BOM)"),
    (b"\x00\x00\xfe\xff", "utf-32-be", "UTF-32 (BOM)"),
    (b"\xef\xbb\xbf", "utf-8", "UTF-8 with BOM"),
    (b"\xff\xfe", "utf-16-le", "UTF-16 (BOM)"),
    (b"\xfe\xff", "utf-16-be", "UTF-16 (BOM)"),
]


class RepeatedKey(ValueError):
    """An object names one key twice: json would keep the last value without a word (the record is rejected)."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's ``object_pairs_hook``: the object as a dict, or RepeatedKey naming the first key it repeats."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise RepeatedKey(f"invalid JSON: the key {key!r} appears twice in one object (JSON readers keep only the "
                          "last value): keep one")
    return obj


# json.loads raises ValueError past 4,300 digits: parse_int keeps such a number as a BigNumber to reject
_LOADS = json.JSONDecoder(parse_int=parse_int, object_pairs_hook=_object).decode


def _mark_bad_bytes(e: UnicodeDecodeError) -> tuple[str, int]:
    # Like "surrogateescape" but for every byte (UTF-16 errors involve bytes < 128 too): each undecodable byte
    # becomes U+DC00 + byte, which no valid decoding produces, so a reader can find and locate it later.
    return "".join(chr(0xDC00 + b) for b in e.object[e.start:e.end]), e.end


codecs.register_error(_MARK, _mark_bad_bytes)


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


def open_bytes(path: Path):
    """The file's bytes, decompressed when it is gzip (told by its first bytes, whatever its name): the `datasets`
    library reads a .jsonl.gz as it is, so users expect it; gzip streams, so memory stays flat."""
    with open(path, "rb") as f:
        gz = f.read(2) == GZIP_MAGIC
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _compression(path: Path) -> str | None:
    """'gzip' for a gzip-compressed file; FileError, with the fix, for a compression or archive we do not read."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    for magic, what, fix in _NOT_READ:
        if re.match(magic, head):
            raise FileError(path, f"this file is {what}: {fix} (tunelab reads gzip as it is)")
    return None


def data_suffix(path: Path) -> str:
    """The suffix that names the data's form, under a .gz one: '.jsonl' for train.jsonl.gz."""
    suffixes = [s.lower() for s in path.suffixes]
    return suffixes[-2] if len(suffixes) > 1 and suffixes[-1] == ".gz" else path.suffix.lower()


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
    with open_bytes(path) as f:
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
            stream = io.TextIOWrapper(f, encoding=codec, errors=_MARK, newline="")
            for n, s in enumerate(stream, 1):
                m = _MARKED.search(s)
                bad = f"invalid {info.encoding.split()[0]} data at column {m.start() + 1}" if m else None
                if m:
                    info.bad_lines += 1
                    s = _MARKED.sub("\ufffd", s)
                yield n, s, bad


def _read_head(path: Path) -> bytes:
    with open_bytes(path) as f:
        return f.read(_SNIFF_BYTES)


def _first_lines(path: Path, codec: str, bom_len: int, info: FileInfo, k: int = 2) -> list[str]:
    out = []
    for _, s, _bad in _text_lines(path, codec, bom_len, FileInfo(info.path)):
        if s.strip():
            out.append(s.strip())
            if len(out) == k:
                break
    return out


def _is_json(s: str, kind: type = object) -> bool:
    try:
        return isinstance(_LOADS(s), kind)
    except (RecursionError, RepeatedKey):  # JSON, but a record to reject later, not a file error
        return kind is object or s.startswith("{") == (kind is dict)
    except ValueError:
        return False


def _head_lines(text: str, whole: bool, k: int = 2) -> list[str]:
    """The first `k` non-blank lines that end inside the sniffed head (never reads on: a minified array is one
    multi-GB line)."""
    lines = text.split("\n")
    if not whole:
        lines = lines[:-1]  # the last piece may be cut by the head's end
    return [x.strip() for x in lines if x.strip()][:k]


def sniff(path: Path, info: FileInfo) -> tuple[str, str, int]:
    """(container, codec, bom length) from the file's content, gzip-compressed or not; FileError when it is none we
    read."""
    compression = _compression(path)
    kind = _sniff(path, info, compression)
    if compression:
        info.container = f"{compression} {info.container}"
    return kind


def _sniff(path: Path, info: FileInfo, compression: str | None) -> tuple[str, str, int]:
    head = _read_head(path)
    if head.startswith(b"PAR1") and compression:  # pyarrow reads a Parquet file by seeking to its footer
        raise FileError(path, f"a {compression}-compressed Parquet file (Parquet compresses its own columns): "
                              "decompress it first, e.g. gunzip -k FILE")
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
    first, whole = stripped[:1], len(head) < _SNIFF_BYTES
    if "\r" in stripped.rstrip() and "\n" not in stripped:
        _refuse_cr_only(path, stripped, first, whole)
    # A JSON Lines line can be longer than the head: read on from a '{', not from a '[' (a minified array is one
    # multi-GB line).
    lines = (_first_lines(path, codec, bom_len, info, _SNIFF_LINES) if first == "{"
             else _head_lines(stripped, whole, _SNIFF_LINES))
    if _looks_jsonl(lines, first):
        info.container = "JSONL"
        return "jsonl", codec, bom_len
    if first in "[{":
        info.container = "JSON array" if first == "[" else "JSON object"
        return "json", codec, bom_len
    header = stripped.splitlines()[0] if stripped else ""
    delim = _csv_delimiter(header)
    if delim and _csv_rows_agree(stripped, delim):
        info.container = "TSV" if delim == "\t" else "CSV"
        return "csv", codec, bom_len
    shown = header[:60].encode("unicode_escape").decode()
    raise FileError(path, f"cannot tell what this file is: it is not JSON (starts with '[' or '{{'), JSON Lines, "
                          f"CSV/TSV with a header row, or Parquet; it starts with: {shown!r}", 1, 1)


def _looks_jsonl(lines: list[str], first: str) -> bool:
    """Whether the first non-blank lines are JSON Lines. The first line is one JSON value: a record that is not an
    object ([...], null, 3) is still JSON Lines, rejected alone (but a '[' line needs a JSON line after it, else
    it opens a pretty-printed array). Or bad lines at the top are followed by objects, one per line: the second
    line, or two lines in a row (no JSON document has those: its elements are separated by commas); the bad
    lines are then rejected alone, as they would be further down."""
    if lines and _is_json(lines[0]) and (first != "[" or len(lines) > 1 and _is_json(lines[1])):
        return True
    if first == "[":  # an array that lacks a comma is the array's error, not JSON Lines
        return False
    objects = [_is_json(x, dict) for x in lines]
    return (first == "{" and objects[1:2] == [True]) or any(a and b for a, b in zip(objects, objects[1:]))


def _refuse_cr_only(path: Path, stripped: str, first: str, whole: bool) -> None:
    """Lines that end with a lone CR (classic Mac OS) are one long line to us: JSON Lines or CSV so written is
    refused with the fix (in a JSON document a CR is only whitespace: read as usual)."""
    if first not in "[{" or _looks_jsonl(_head_lines(stripped.replace("\r", "\n"), whole, _SNIFF_LINES), first):
        raise FileError(path, "the lines end with a carriage return alone (CR, as on classic Mac OS): tunelab "
                              "reads LF or CRLF line endings; convert the file, e.g. tr '\\r' '\\n' < in > out", 1)


def _csv_delimiter(header: str) -> str | None:
    """The delimiter of a CSV/TSV header line (',' for a one-column header), or None when it is no header."""
    counts = {d: header.count(d) for d in (",", "\t", ";")}
    delim = max(counts, key=counts.get)
    if not counts[delim]:  # one column (pandas' to_csv of a 'text' column for pt): one name, no prose
        return "," if _ONE_NAME.fullmatch(header.strip()) else None
    names = next(csv.reader([header], delimiter=delim))
    # A header is short names, the first one possibly empty (pandas' unnamed index); a line of prose with a comma
    # is not one.
    if len(names) >= 2 and len(names[0]) <= 64 and all(0 < len(n.strip()) <= 64 for n in names[1:]):
        return delim
    return None


def _csv_header(path: Path, row: list[str], line: int, info: FileInfo) -> list[str]:
    """The column names; an empty first name is pandas' unnamed index (row numbers): a column nobody reads."""
    header = [h.strip().lstrip("\ufeff") for h in row]
    named = header[1:] if len(header) > 1 and not header[0] else header
    if len(set(named)) < len(named) or not all(named):
        raise FileError(path, f"the CSV header has empty or repeated column names: {row}", line)
    if named is not header:
        info.container += " (unnamed first column, pandas' index: not read)"
    return header


def _csv_rows_agree(text: str, delim: str) -> bool:
    """At least half of the first data rows (up to 5) have as many fields as the header (prose with a comma does
    not): one malformed row near the top is that row's rejection, not the whole file's."""
    try:
        rows = [r for _, r in zip(range(6), csv.reader(io.StringIO(text), delimiter=delim)) if r]
    except csv.Error:
        return False
    data = rows[1:]
    return 2 * sum(len(r) == len(rows[0]) for r in data) >= len(data)


# ---------------------------------------------------------------- JSON Lines


def _read_jsonl(path: Path, codec: str, bom_len: int, info: FileInfo) -> Iterator[RawItem]:
    loads = _LOADS
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
    if isinstance(e, RepeatedKey):
        return str(e)
    if isinstance(e, json.JSONDecodeError):
        # A record that stops before its closing bracket looks cut off; a line of prose, or a trailing comma, does not.
        looks_cut = s[:1] in "{[" and (e.pos >= len(s) or s[-1] not in "}]")
        cut = " (the line is cut off: is the file truncated?)" if looks_cut else ""
        return f"invalid JSON at column {e.colno}: {e.msg}{cut}"
    return f"invalid JSON: {e}"


# ---------------------------------------------------------------- JSON document (array or one object), streamed

# Characters decoded per read. The window holds about two of these plus the record being read, so memory does
# not grow with the file (a multi-GB array reads in a few MB); a larger record widens the window as needed.
CHUNK_CHARS = 1 << 20
_DECODE = json.JSONDecoder(parse_int=parse_int, object_pairs_hook=_object).raw_decode
_DECODE_LAST_WINS = json.JSONDecoder(parse_int=parse_int).raw_decode  # where a record with a RepeatedKey ends
_BRACKETS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.S)  # strings (skipped whole) and brackets


class _Window:
    """A moving window over a decoded text file: read on in chunks, drop what was consumed, keep line numbers.

    ``buf[pos]`` is the next character to read; it is on line ``line``, which starts at buffer index
    ``line_start`` (negative once the start of the line has been dropped). Undecodable bytes are kept as marker
    characters (see `_MARK`) so a record holding one can be rejected with its line and column.
    """

    def __init__(self, f, codec: str, chunk: int):
        self._f, self._chunk = f, chunk
        self._dec = codecs.getincrementaldecoder(codec)(errors=_MARK)
        self.buf, self.pos, self.eof = "", 0, False
        self.line, self.line_start = 1, 0

    def more(self, at_least: int = 0) -> bool:
        """Read on by a chunk, or by `at_least` characters (to double the window); False at the end."""
        if self.eof:
            return False
        self.buf, self.line_start, self.pos = self.buf[self.pos:], self.line_start - self.pos, 0
        parts, got = [self.buf], 0
        while got < max(self._chunk, at_least):
            b = self._f.read(self._chunk)
            parts.append(self._dec.decode(b, final=not b))
            got += len(parts[-1])
            if not b:
                self.eof = True
                break
        self.buf = "".join(parts)
        return True

    def advance(self, to: int) -> None:
        n = self.buf.count("\n", self.pos, to)
        if n:
            self.line += n
            self.line_start = self.buf.rfind("\n", self.pos, to) + 1
        self.pos = to

    def where(self, i: int) -> tuple[int, int]:
        """(line, column) of buffer index ``i >= pos``, both from 1."""
        n = self.buf.count("\n", self.pos, i)
        if not n:
            return self.line, i - self.line_start + 1
        return self.line + n, i - self.buf.rfind("\n", self.pos, i)

    def next_char(self) -> str:
        """Skip whitespace; the next character, or '' at the end of the file."""
        while True:
            self.advance(_WS.match(self.buf, self.pos).end())
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""

    def value(self, decode=_DECODE) -> tuple[Any, int]:
        """Decode the JSON value at ``pos``: (value, end). Reads on while the window's end may cut it."""
        while True:
            try:
                value, end = decode(self.buf, self.pos)
                # A number may go on past the window ("1500." of "1500.25", "1e" of "1e+5"): at most two
                # characters stop the number grammar early, so keep more than two in view after any value.
                if end + 2 < len(self.buf) or self.eof:
                    return value, end
            except json.JSONDecodeError as e:
                cut = e.pos >= len(self.buf) - 16 or e.msg.startswith("Unterminated string")
                if self.eof or not cut:
                    raise
            self.more(at_least=len(self.buf) - self.pos)

    def skip_value(self) -> int | None:
        """The end of the (too deeply nested) value at ``pos`` by counting brackets; None if the file ends first."""
        while True:
            depth = 0
            for m in _BRACKETS.finditer(self.buf, self.pos):
                c = m.group()
                depth += 1 if c in "[{" else -1 if c in "]}" else 0
                if depth == 0:
                    return m.end()
            if not self.more(at_least=len(self.buf) - self.pos):
                return None


def _marked_reason(w: _Window, start: int, end: int, label: str) -> str | None:
    """Where the first undecodable byte between buffer indexes start and end is, or None."""
    m = _MARKED.search(w.buf, start, end)
    if m is None:
        return None
    line, col = w.where(m.start())
    if label.startswith("UTF-8"):
        text = w.buf[start:end]
        latin = not any(ord(c) > 127 and not _MARKED.match(c) for c in text)
        hint = "; the file looks like Latin-1/Windows-1252: convert it, e.g. iconv -f cp1252 -t utf-8" if latin else ""
        return f"line {line}: invalid UTF-8 byte 0x{ord(m.group()) - 0xDC00:02x} at column {col}{hint}"
    return f"line {line}: invalid {label.split()[0]} data at column {col}"


def _read_json(path: Path, codec: str, bom_len: int, info: FileInfo, chunk: int = CHUNK_CHARS) -> Iterator[RawItem]:
    """The elements of a JSON array (or the one object of a JSON object file), streamed through a `_Window`."""
    with open_bytes(path) as f:
        f.seek(bom_len)
        w = _Window(f, codec, chunk)
        c = w.next_char()
        if not c:
            raise FileError(path, "the file is empty (no records)")
        if c not in "[{":
            raise FileError(path, "expected a JSON array of records or one record object", *w.where(w.pos))
        if c == "{":
            yield _element(path, w, 1, info.encoding, "the JSON object")
            if w.next_char():
                raise FileError(path, "extra data after the JSON object (for one record per line, every line must "
                                      "be a complete JSON object: JSON Lines)", *w.where(w.pos))
            return
        w.advance(w.pos + 1)
        if w.next_char() == "]":
            raise FileError(path, "the JSON array is empty (no records)", *w.where(w.pos))
        yield from _array_elements(path, w, info.encoding)


def _array_elements(path: Path, w: _Window, label: str) -> Iterator[RawItem]:
    count, comma = 0, None

    def truncated() -> FileError:
        w.advance(len(w.buf))
        return FileError(path, f"the file ends before the JSON array is closed with ']' (truncated?); {count} "
                               "complete records before that", *w.where(w.pos))

    while True:
        c = w.next_char()
        if not c:
            raise truncated()
        if c == "]" and comma is not None:
            raise FileError(path, f"trailing comma after record {count}: JSON does not allow a comma before ']'; "
                                  "delete it", *comma)
        count += 1
        yield _element(path, w, count, label, f"record {count}")
        c = w.next_char()
        if c == ",":
            comma = w.where(w.pos)
            w.advance(w.pos + 1)
        elif c == "]":
            w.advance(w.pos + 1)
            if w.next_char():
                raise FileError(path, "extra data after the closing ']' of the JSON array", *w.where(w.pos))
            return
        elif not c:
            raise truncated()
        else:
            raise FileError(path, f"expected ',' or ']' after record {count}, found {c!r} (a missing comma?)",
                            *w.where(w.pos))


def _element(path: Path, w: _Window, n: int, label: str, what: str) -> RawItem:
    """One array element (or the whole object) as a located RawItem; the window moves past it."""
    line = w.line
    loc = f"record {n} (line {line})"
    try:  # reading on may move the window: the element starts at w.pos afterwards, not at the old index
        value, end, repeated = _decoded(w)
    except RecursionError:  # deeper than Python's parser goes: reject this record, read on after it
        end = w.skip_value()
        if end is None:
            raise FileError(path, f"{what} is nested too deeply to read, and the file ends inside it",
                            *w.where(w.pos)) from None
        raw = w.buf[w.pos:end]
        w.advance(end)
        return RawItem(loc, line, error="invalid JSON: nested too deeply (thousands of levels)", raw=raw)
    except json.JSONDecodeError as e:
        raise _element_error(path, w, e, n, what, label) from None
    raw = w.buf[w.pos:end]
    bad = _marked_reason(w, w.pos, end, label) or repeated
    w.advance(end)
    if bad:  # the raw text goes to rejected.jsonl: show each bad byte as U+FFFD, as JSONL lines do
        return RawItem(loc, line, error=bad, raw=_MARKED.sub("\ufffd", raw))
    return RawItem(loc, line, value, raw=raw)


def _decoded(w: _Window) -> tuple[Any, int, str | None]:
    """(value, end, None), or (None, end, why) for a value with a repeated key: rejected alone, read on after it."""
    try:
        return *w.value(), None
    except RepeatedKey as e:
        return None, w.value(_DECODE_LAST_WINS)[1], str(e)


def _element_error(path: Path, w: _Window, e: json.JSONDecodeError, n: int, what: str, label: str) -> FileError:
    # At the end of the file the window holds its tail: a file whose last character does not close the array (or
    # object) was cut short, one that does is broken inside
    closes = w.buf.rstrip().endswith("}" if what == "the JSON object" else "]")
    if w.eof and (e.pos >= len(w.buf.rstrip()) or not closes):
        before = f"; {n - 1} complete records before it" if what.startswith("record") else ""
        w.advance(len(w.buf))
        return FileError(path, f"the file ends in the middle of {what} (truncated?){before}", *w.where(w.pos))
    bad = _marked_reason(w, w.pos, min(len(w.buf), e.pos + 1), label)
    hint = f"; note {bad}" if bad else ""
    return FileError(path, f"invalid JSON in {what}: {e.msg}{hint}", *w.where(e.pos))


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
            header = _csv_header(path, row, start, info)
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
            value = dict(zip(header, row))
            value.pop("", None)  # pandas' unnamed index (_csv_header)
            yield RawItem(loc, start, value, raw=raw)
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
    batches = pf.iter_batches(batch_size=2048)
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # a damaged page: the rest of the file is lost
            raise FileError(path, f"the Parquet file cannot be read after row {row}: {str(e).splitlines()[0]}"
                                  " (damaged or truncated?)") from None
        if batch is None:
            return
        try:
            values = batch.to_pylist()
        except UnicodeDecodeError:  # a string column holding bytes that are not UTF-8: find the rows
            values = None
        for i in range(batch.num_rows):
            row += 1
            if values is not None:
                yield RawItem(f"row {row}", None, values[i])
            else:
                yield _parquet_row(batch, i, row)


def _parquet_row(batch, i: int, row: int) -> RawItem:
    """One row converted column by column, so invalid UTF-8 in one cell rejects just this row, with its column."""
    value = {}
    for name, column in zip(batch.schema.names, batch.columns):
        try:
            value[name] = column[i].as_py()
        except UnicodeDecodeError as e:
            return RawItem(f"row {row}", None, error=f"column '{name}': invalid UTF-8 byte "
                                                     f"0x{e.object[e.start]:02x} at byte {e.start + 1} of the text",
                           raw=f"{name}: {bytes(e.object).decode('utf-8', 'replace')}")
    return RawItem(f"row {row}", None, value)


def read_file(path: Path, info: FileInfo) -> Iterator[RawItem]:
    """Every record of one file, in order; FileError for a whole-file problem."""
    return guarded(path, _records(path, info))


def _records(path: Path, info: FileInfo) -> Iterator[RawItem]:
    kind, codec, bom_len = sniff(path, info)
    if kind == "parquet":
        yield from _read_parquet(path, info)
    elif kind == "jsonl":
        yield from _read_jsonl(path, codec, bom_len, info)
    elif kind == "csv":
        yield from _read_csv(path, codec, bom_len, info)
    else:
        yield from _read_json(path, codec, bom_len, info)


def guarded(path: Path, items: Iterator[RawItem]) -> Iterator[RawItem]:
    """`items`, with a file that cannot be read, or gzip data that is damaged or cut short, as the FileError that
    names the file (the records before it were read, but the file is not whole: nothing is prepared from it)."""
    try:
        yield from items
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # BadGzipFile is an OSError: caught first
        raise FileError(path, f"the gzip data is damaged or cut short ({e}): check it with gzip -t FILE, or fetch "
                              "it again") from None
    except OSError as e:
        raise FileError(path, f"cannot read the file: {e.strerror or e}") from None
