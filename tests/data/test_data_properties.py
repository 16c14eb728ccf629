"""Property tests (hypothesis): whatever the records, every one read ends accepted or rejected with a location.

Generated files hold 1-6 records in one container (JSONL, JSON array, CSV, Parquet); each record is valid
(Alpaca, ShareGPT or OpenAI messages, mixed freely in JSON files) or broken in one way: a bad character in any
text (lone surrogate, NUL, control), a bad number in any text (NaN, Infinity, 1e999, 50 or 5,000 digits), an
undecodable byte, any node replaced by anything (deep nesting, wrong types at every level), the record not an
object, or bad values in a field nobody reads (which must not cost the record). Examples are counted in SETTINGS
so the whole file stays within seconds on two cores.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter

import pytest

pytest.importorskip("hypothesis", reason="the property tests need hypothesis: pip install -e '.[test]'")

from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tunelab.data.formats import Invalid, normalize  # noqa: E402
from tunelab.data.prepare import DataError, prepare_dataset  # noqa: E402
from tunelab.data.readers import FileError, FileInfo, _read_json, read_file  # noqa: E402
from tunelab.data.template import RecordRejected, TemplateError, encode_record  # noqa: E402

from data_helpers import quiet  # noqa: E402

FAST = dict(deadline=None, database=None,  # no .hypothesis folder in the repository
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BAD_BYTE = "\ue000"  # written as the byte 0xff (invalid UTF-8) once the file is encoded


class Raw(str):
    """A JSON fragment written as it is (what json.dumps cannot produce: 5,000 digits, 3,000 brackets)."""


def deep(n: int) -> Raw:
    return Raw("[" * n + "]" * n)


BAD_CHARS = ["\ud800", "\udfff", "\x00", "\x1b", "\x0c", "\x85", "\x7f", "\x01"]
BAD_NUMBERS = [float("nan"), float("inf"), float("-inf"), 10**30, Raw("1" * 50), Raw("9" * 5000), Raw("1e999")]
ANYTHING = [None, True, False, 0, 5, -2.5, "", "text", [], {}, [1, "x"], {"a": 1}, {"role": "user"}, deep(70),
            deep(3000), "[not json", '[{"from": "human"}]', *BAD_NUMBERS]
UNREAD = [float("nan"), float("inf"), Raw("1" * 50), "\ud800", "\x00", deep(100)]  # in a field nobody reads

word = st.text(st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs")), max_size=10)
good = st.builds(lambda a, b: a + b, st.sampled_from(list("abqxyzé你☕")), word)


def dump(v) -> str:
    """One-line JSON; NaN/Infinity as Python writes them, lone surrogates as \\ud800 escapes."""
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {dump(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(dump(x) for x in v) + "]"
    if isinstance(v, str):
        try:
            v.encode("utf-8")
            return json.dumps(v, ensure_ascii=False)
        except UnicodeEncodeError:
            return json.dumps(v)
    return json.dumps(v)


@st.composite
def alpaca(draw, flat: bool = False):
    rec = {"instruction": draw(good), "input": draw(st.sampled_from(["", "ctx"]) | good), "output": draw(good)}
    if not flat and draw(st.booleans()):
        rec["system"] = draw(good)
    if not flat and draw(st.booleans()):
        rec["history"] = [[draw(good), draw(good)]]
    return rec


@st.composite
def sharegpt(draw):
    turns = []
    for _ in range(draw(st.integers(1, 3))):
        turns += [{"from": draw(st.sampled_from(["human", "user"])), "value": draw(good)},
                  {"from": draw(st.sampled_from(["gpt", "assistant"])), "value": draw(good)}]
    return {"conversations": turns}


@st.composite
def openai(draw):
    msgs = [{"role": "system", "content": draw(good)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        msgs += [{"role": "user", "content": draw(good)}, {"role": "assistant", "content": draw(good)}]
    return {"messages": msgs}


def nodes(v, path=()):
    """Every (path, value) in a record, the record itself first."""
    yield path, v
    items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
    for k, x in items:
        yield from nodes(x, path + (k,))


def replaced(rec, path, new):
    if not path:
        return new
    rec = json.loads(json.dumps(rec))  # a copy (records here hold plain JSON values)
    parent = rec
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = new
    return rec


@st.composite
def json_record(draw):
    """(record, expected outcome, format of a valid record): 'valid' must be accepted, 'invalid' rejected."""
    fmt = draw(st.sampled_from(["alpaca", "sharegpt", "openai"]))
    rec = draw({"alpaca": alpaca(), "sharegpt": sharegpt(), "openai": openai()}[fmt])
    how = draw(st.sampled_from(["valid", "bad_char", "bad_number", "bad_byte", "replace", "unread", "not_object"]))
    texts = [p for p, v in nodes(rec) if isinstance(v, str)]
    if how == "valid":
        return rec, "valid", fmt
    if how == "unread":
        return {**rec, draw(st.sampled_from(["meta", "score", "k\x00"])): draw(st.sampled_from(UNREAD))}, "valid", fmt
    if how == "not_object":
        return draw(st.sampled_from([None, 3, "text", [rec], [], float("nan")])), "invalid", None
    if how == "replace":
        path = draw(st.sampled_from([p for p, _ in nodes(rec)]))
        return replaced(rec, path, draw(st.sampled_from(ANYTHING))), "any", None
    path = draw(st.sampled_from(texts))
    if how == "bad_number":
        return replaced(rec, path, draw(st.sampled_from(BAD_NUMBERS))), "invalid", None
    old = dict(nodes(rec))[path]
    at = draw(st.integers(0, len(old)))
    bad = BAD_BYTE if how == "bad_byte" else draw(st.sampled_from(BAD_CHARS))
    return replaced(rec, path, old[:at] + bad + old[at:]), "invalid", None


@st.composite
def flat_record(draw, container: str):
    """An Alpaca row for CSV / Parquet: text cells only (plus a 'score' number column for Parquet)."""
    rec = {**draw(alpaca(flat=True)), "score": 1.0 if container == "parquet" else "x"}
    how = draw(st.sampled_from(["valid", "bad_char", "unread", "empty"] + (["bad_byte"] if container == "csv" else [])))
    if how == "valid":
        return rec, "valid", "alpaca"
    if how == "unread":
        return {**rec, "score": draw(st.sampled_from([float("nan"), float("inf")])) if container == "parquet"
                else "note\x00"}, "valid", "alpaca"
    key = draw(st.sampled_from(["instruction", "input", "output"]))
    if how == "empty":
        return {**rec, key: draw(st.sampled_from(["", " "] + ([None] if container == "parquet" else [])))}, "any", None
    at = draw(st.integers(0, len(rec[key])))
    bad = BAD_BYTE if how == "bad_byte" else draw(st.sampled_from([c for c in BAD_CHARS if not "\ud800" <= c <= "\udfff"]))
    return {**rec, key: rec[key][:at] + bad + rec[key][at:]}, "invalid", None


def encode_file(text: str) -> bytes:
    return text.encode("utf-8").replace(BAD_BYTE.encode("utf-8"), b"\xff")


def write_case(folder, container: str, recs: list) -> tuple:
    """Write the records; returns (path, expected location of record i) for i from 0."""
    path = folder / f"case.{container}"
    values = [r for r, _, _ in recs]
    if container == "jsonl":
        path.write_bytes(encode_file("".join(dump(v) + "\n" for v in values)))
        return path, lambda i: f"line {i + 1}"
    if container == "json":
        path.write_bytes(encode_file("[\n" + ",\n".join(dump(v) for v in values) + "\n]\n"))
        return path, lambda i: f"record {i + 1} (line {i + 2})"
    if container == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, ["instruction", "input", "output", "score"], lineterminator="\n")
        w.writeheader()
        w.writerows(values)
        path.write_bytes(encode_file(buf.getvalue()))
        return path, lambda i: f"row {i + 1} (line "
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("instruction", pa.string()), ("input", pa.string()), ("output", pa.string()),
                        ("score", pa.float64())])
    pq.write_table(pa.Table.from_pylist(values, schema=schema), path)
    return path, lambda i: f"row {i + 1}"


@st.composite
def case(draw):
    container = draw(st.sampled_from(["jsonl", "json", "csv", "parquet"]))
    rec = json_record() if container in ("jsonl", "json") else flat_record(container)
    return container, draw(st.lists(rec, min_size=1, max_size=6))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("properties")


def stages(path, tokenizer) -> list[tuple[str, str, str]]:
    """Reader → normaliser → chat template + tokenizer, by hand: (location, fate, stage or reason) per record."""
    out = []
    for item in read_file(path, FileInfo(str(path))):
        try:
            if item.error:
                raise Invalid("read", item.error)
            conv = normalize(item.value, notes=Counter())
        except Invalid as e:
            out.append((item.location, "rejected", "normalise: " + e.reason))
            continue
        try:
            encode_record(tokenizer, conv.messages, tools=conv.tools)
        except (RecordRejected, TemplateError) as e:
            out.append((item.location, "rejected", f"template: {e}"))
            continue
        out.append((item.location, "accepted", conv.format))
    return out


@settings(max_examples=1200, **FAST)
@given(case())
def test_every_record_ends_accepted_or_rejected_at_every_stage(folder, tiny_tokenizer, example):
    container, recs = example
    # One line holding a list is a JSON array, not JSON Lines: the file is read as that array's elements.
    assume(not (container == "jsonl" and len(recs) == 1 and dump(recs[0][0]).startswith("[")))
    path, where = write_case(folder, container, recs)
    fates = stages(path, tiny_tokenizer)
    assert len(fates) == len(recs)  # read = records written, nothing lost or invented by the reader
    for i, ((loc, fate, why), (_, expect, fmt)) in enumerate(zip(fates, recs)):
        assert loc.startswith(where(i)), (loc, where(i))
        if expect == "valid":
            assert (fate, why) == ("accepted", fmt)
        elif expect == "invalid":
            assert fate == "rejected" and why.startswith("normalise: "), (recs[i][0], why)
        if fate == "rejected":
            assert len(why) > len("normalise: ") + 10  # a reason a person can act on


def console_lines():
    lines: list[str] = []
    return lines, lines.append


@settings(max_examples=400, **FAST)
@given(case())
def test_prepare_conserves_counts_and_is_deterministic(folder, tiny_tokenizer, example):
    container, recs = example
    assume(not (container == "jsonl" and len(recs) == 1 and dump(recs[0][0]).startswith("[")))
    path, _ = write_case(folder, container, recs)
    printed, console = console_lines()
    r = prepare_dataset(str(path), check=True, tokenizer=tiny_tokenizer, console=console)
    again = prepare_dataset(str(path), check=True, tokenizer=tiny_tokenizer, console=quiet)
    assert json.dumps(r.report, sort_keys=True) == json.dumps(again.report, sort_keys=True)
    rep, f = r.report, r.report["files"][0]
    assert rep["records_read"] == len(recs) == f["records_read"]
    assert rep["records_read"] == rep["records_accepted"] + rep["records_rejected"] + rep["duplicates_removed"]
    assert (f["accepted"], f["rejected"], f["duplicates"]) == (
        rep["records_accepted"], rep["records_rejected"], rep["duplicates_removed"])
    expects = Counter(e for _, e, _ in recs)
    assert expects["invalid"] <= rep["records_rejected"] <= len(recs) - expects["valid"]
    assert sum(rep["rejected_by_reason"].values()) == rep["records_rejected"] == len(rep["rejected_examples"])
    for x in rep["rejected_examples"]:
        assert x["source"] == str(path) and x["location"] and x["reason"]
        assert not x["reason"].startswith("cannot be processed")  # the last-resort catch was never needed
    valid_formats = Counter(fmt for _, e, fmt in recs if e == "valid")
    assert all(f["formats"].get(fmt, 0) >= n for fmt, n in valid_formats.items())
    assert set(f["format_first"]) == set(f["formats"])
    mixed = len(f["formats"]) > 1
    assert ("mixed_formats" in rep["warnings"]) == mixed
    assert any("mixes record formats" in line for line in printed) == mixed


@settings(max_examples=300, **FAST)
@given(st.lists(json_record(), min_size=1, max_size=5), st.integers(1, 48), st.booleans())
def test_json_array_reads_the_same_whatever_the_window(folder, recs, chunk, utf16):
    """Records cut anywhere by the reading window (strings, numbers, escapes, UTF-8 sequences) read the same."""
    path = folder / "window.json"
    text = "[\n" + ",\n".join(dump(v) for v, _, _ in recs) + "\n]"
    codec, data = ("utf-16-le", text.replace(BAD_BYTE, "x").encode("utf-16-le", "surrogatepass")) if utf16 \
        else ("utf-8", encode_file(text))
    path.write_bytes(data)

    def read(size):
        try:
            return [(i.location, repr(i.value), i.error, i.raw) for i in
                    _read_json(path, codec, 0, FileInfo(str(path)), chunk=size)]
        except FileError as e:
            return str(e)

    whole = read(1 << 20)
    assert read(chunk) == whole
    assert isinstance(whole, list) and len(whole) == len(recs)  # a valid array of any elements never fails


@settings(max_examples=400, **FAST)
@given(st.sampled_from(["jsonl", "json", "csv"]), st.data())
def test_damaged_bytes_end_in_a_report_or_one_clear_error(folder, container, data):
    """Bytes cut, inserted or overwritten anywhere: a conserved report, or one DataError naming the file."""
    recs = [(r, "valid", "alpaca") for r in ({"instruction": "q1", "input": "", "output": "a1"},
                                             {"instruction": "q 2", "input": "c", "output": "ä ☕"})]
    path, _ = write_case(folder, container, recs)
    b = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(b)))
        op = data.draw(st.sampled_from(["cut", "insert", "overwrite"]))
        junk = data.draw(st.binary(min_size=1, max_size=4) | st.sampled_from(
            [b",", b"]", b"[", b"}", b"{", b'"', b"\n", b"\\", b"\x00", b"\xff\xfe", b"\r\n", b"NaN", b"1e999"]))
        if op == "cut":
            del b[at: at + len(junk)]
        elif op == "insert":
            b[at:at] = junk
        else:
            b[at: at + len(junk)] = junk
    path.write_bytes(bytes(b))
    try:
        r = prepare_dataset(str(path), check=True, console=quiet)
    except DataError as e:
        assert str(path) in str(e) or "empty" in str(e)
        return
    rep = r.report
    assert rep["records_read"] == rep["records_accepted"] + rep["records_rejected"] + rep["duplicates_removed"]
    assert all(x["location"] for x in rep["rejected_examples"])
