"""Containers, encodings and whole-file errors: tunelab.data.readers."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from tunelab.data.readers import DataError, FileError, FileInfo, read_file
from tunelab.errors import TunelabError

from data_helpers import alpaca, jsonl


def read(path):
    info = FileInfo(str(path))
    return list(read_file(path, info)), info


def test_data_error_is_a_tunelab_error():
    assert issubclass(DataError, TunelabError) and issubclass(FileError, DataError)


def test_json_array_records_are_located_by_record_and_line(write):
    path = write("a.json", [alpaca(1), alpaca(2), alpaca(3)])
    items, info = read(path)
    assert info.container == "JSON array"
    assert [i.location for i in items] == ["record 1 (line 2)", "record 2 (line 7)", "record 3 (line 12)"]
    assert items[1].value == alpaca(2)
    assert json.loads(items[2].raw) == alpaca(3)


def test_jsonl_named_json_is_detected_from_content(write):
    path = write("really_lines.json", jsonl([alpaca(1), alpaca(2)]))
    items, info = read(path)
    assert info.container == "JSONL"
    assert [i.location for i in items] == ["line 1", "line 2"]


def test_single_object_json_is_one_record(write):
    path = write("one.json", {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
    items, info = read(path)
    assert info.container == "JSON object" and len(items) == 1 and items[0].location == "record 1 (line 1)"


@pytest.mark.parametrize("encoding,bom,label", [
    ("utf-8", b"\xef\xbb\xbf", "UTF-8 with BOM"),
    ("utf-16-le", b"\xff\xfe", "UTF-16 (BOM)"),
    ("utf-16-be", b"\xfe\xff", "UTF-16 (BOM)"),
])
@pytest.mark.parametrize("container", ["json", "jsonl"])
def test_bom_encodings_and_crlf(write, encoding, bom, label, container):
    recs = [alpaca(1), {"instruction": "café ☕ 你好", "output": "ok"}]
    text = json.dumps(recs, ensure_ascii=False, indent=1) if container == "json" else jsonl(recs)
    path = write(f"x.{container}", bom + text.replace("\n", "\r\n").encode(encoding))
    items, info = read(path)
    assert info.encoding == label and info.crlf
    assert [i.value for i in items] == recs
    assert not any(i.error for i in items)


def test_invalid_utf8_is_reported_per_line_jsonl(write):
    good = json.dumps(alpaca(1)).encode()
    bad = b'{"instruction": "caf\xe9", "output": "x"}'
    path = write("bad.jsonl", good + b"\n" + bad + b"\n" + good.replace(b"1", b"3") + b"\n")
    items, info = read(path)
    assert [bool(i.error) for i in items] == [False, True, False]
    assert items[1].location == "line 2"
    assert "invalid UTF-8 byte 0xe9 at column 21" in items[1].error and "cp1252" in items[1].error
    assert info.bad_lines == 1


def test_invalid_utf8_inside_json_array_rejects_only_that_record(write):
    text = json.dumps([alpaca(1), {"instruction": "XX", "output": "y"}, alpaca(3)], indent=2).encode()
    path = write("bad.json", text.replace(b"XX", b"\xff\xfe\xfd"))
    items, _ = read(path)
    assert [bool(i.error) for i in items] == [False, True, False]
    assert items[1].error.startswith("line 8: invalid UTF-8 byte 0xff")


def test_invalid_json_line_is_a_record_problem_and_truncation_is_named(write):
    path = write("x.jsonl", jsonl([alpaca(1)]) + '{"instruction": "a" "output": "b"}\n' + '{"instruction": "cut')
    items, _ = read(path)
    assert items[0].error is None
    assert items[1].error == "invalid JSON at column 21: Expecting ',' delimiter"
    assert "truncated" in items[2].error and items[2].location == "line 3"


REPEATED = '{"instruction": "q", "output": "first answer", "output": "second answer"}'
NESTED = '{"messages": [{"role": "user", "content": "hi", "role": "assistant"}]}'


@pytest.mark.parametrize("name,records,key", [
    ("first.jsonl", [REPEATED, json.dumps(alpaca(1))], "output"),  # the first line decides the container
    ("nested.jsonl", [json.dumps(alpaca(1)), NESTED], "role"),
    ("array.json", [json.dumps(alpaca(1)), REPEATED], "output"),
    ("nested.json", [NESTED, json.dumps(alpaca(1))], "role"),
])
def test_a_repeated_key_rejects_its_record_alone_naming_the_key(write, name, records, key):
    """json keeps the last of two values under one key without a word: which one was meant is unknown."""
    text = "\n".join(records) + "\n" if name.endswith("l") else "[" + ",\n".join(records) + "]"
    items, _ = read(write(name, text))
    assert [i.line for i in items] == [1, 2]
    good, bad = sorted(items, key=lambda i: bool(i.error))
    assert bad.value is None and f"the key '{key}' appears twice in one object" in bad.error
    assert good.error is None and good.value == alpaca(1)


def test_a_repeated_key_in_a_json_array_is_found_wherever_the_window_cuts(write):
    from tunelab.data.readers import _read_json

    text = f"[{json.dumps(alpaca(1))},\n {NESTED},\n {json.dumps(alpaca(2))}]"
    path = write("a.json", text)
    for chunk in range(1, len(text) + 2):
        items = list(_read_json(path, "utf-8", 0, FileInfo(str(path)), chunk=chunk))
        assert [bool(i.error) for i in items] == [False, True, False], chunk
        assert items[1].raw == NESTED and items[2].value == alpaca(2)


@pytest.mark.parametrize("top", [
    ["this is not json"],  # a stray line at the top costs only itself, as at the bottom
    ['{"instruction": "a", "output": "b",}', '{"instruction": "c",'],
    ["# exported by some tool", "---"],
])
def test_bad_lines_at_the_top_of_json_lines_are_rejected_alone(write, top):
    items, info = read(write("x.jsonl", "\n".join(top) + "\n" + jsonl([alpaca(1), alpaca(2), alpaca(3)])))
    assert info.container == "JSONL" and len(items) == len(top) + 3
    assert all(i.error.startswith("invalid JSON") for i in items[:len(top)])
    assert "cut off" not in items[0].error  # prose, or a trailing comma, is no sign of a truncated file
    assert [i.value for i in items[len(top):]] == [alpaca(1), alpaca(2), alpaca(3)]


@pytest.mark.parametrize("content,container", [
    ('{\n "messages": [\n  {"role": "user", "content": "q"},\n  {"role": "assistant", "content": "a"}\n ]\n}',
     "JSON object"),  # one complete object per line inside a document is no JSON Lines
    ('[\n{"instruction": "q", "output": "a"},\n{"instruction": "r", "output": "b"}\n]', "JSON array"),
])
def test_pretty_printed_json_documents_are_not_taken_for_json_lines(write, content, container):
    items, info = read(write("x.json", content))
    assert info.container == container and not any(i.error for i in items)


def test_cr_only_line_endings_are_named_with_the_fix(write):
    for name, text in (("x.jsonl", jsonl([alpaca(1), alpaca(2)])), ("x.csv", "instruction,output\nq,a\nr,b\n")):
        with pytest.raises(FileError, match="carriage return alone .* tr "):
            read(write(name, text.replace("\n", "\r")))
    items, _ = read(write("x.json", json.dumps([alpaca(1), alpaca(2)], indent=1).replace("\n", "\r")))
    assert [i.value for i in items] == [alpaca(1), alpaca(2)]  # in a JSON document a CR is whitespace


def test_blank_jsonl_lines_are_skipped_and_counted(write):
    path = write("x.jsonl", "\n" + jsonl([alpaca(1)]) + "\n   \n" + jsonl([alpaca(2)]))
    items, info = read(path)
    assert [i.location for i in items] == ["line 2", "line 5"] and info.blank_lines == 3


@pytest.mark.parametrize("content,message,line,column", [
    ("", "the file is empty", None, None),
    ("  \n\n ", "the file is empty", None, None),
    ("[]", "the JSON array is empty", 1, 2),
    ('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c", "out', "ends in the middle of record 2", 3, 27),
    ('[\n {"instruction": "a", "output": "b"}\n', "ends before the JSON array is closed", 3, 1),
    ('[\n {"instruction": "a", "output": "b"},\n]\n', "trailing comma after record 1", 2, 37),
    ('[\n {"instruction": "a", "output": "b"}\n {"instruction": "c", "output": "d"}]', "a missing comma?", 3, 2),
    ('[{"a": 1}] [', "extra data after the closing ']'", 1, 12),
    ('{\n  "instruction": "a",\n  "output": "b"\n}\n{"x": 1', "extra data after the JSON object", 5, 1),
    ('[\n {"instruction": "a", output: "b"}]', "invalid JSON in record 1: Expecting property name", 2, 23),
    ("hello world, this is prose\nmore prose", "cannot tell what this file is", 1, 1),
])
def test_whole_file_problems_are_one_located_message(write, content, message, line, column):
    path = write("bad.json", content)
    with pytest.raises(FileError) as e:
        read(path)
    assert message in str(e.value)
    assert (e.value.line, e.value.column) == (line, column)
    if line:
        assert f"line {line}, column {column}" in str(e.value)


def test_binary_file_is_a_clear_error(write):
    with pytest.raises(FileError, match="binary"):
        read(write("x.bin", bytes(range(256)) * 20))


def test_csv_rows_with_physical_lines_bom_crlf_and_quoted_newlines(write):
    text = '\ufeffinstruction,input,output\r\n"two\r\nlines",,a\r\nq2,ctx,"b, with comma"\r\nq3,only-two\r\n'
    path = write("data.txt", text)
    items, info = read(path)
    assert info.container == "CSV" and info.crlf and info.encoding == "UTF-8 with BOM"
    assert [i.location for i in items] == ["row 1 (line 2)", "row 2 (line 4)", "row 3 (line 5)"]
    assert items[0].value == {"instruction": "two\r\nlines", "input": "", "output": "a"}
    assert items[1].value["output"] == "b, with comma"
    assert items[2].error.startswith("the row has 2 fields but the header has 3")


def test_a_malformed_first_csv_row_is_that_rows_rejection_not_the_files(write):
    items, info = read(write("d.csv", "instruction,output\nwhat is 1,000 plus 1,two\nq1,a1\nq2,a2\n"))
    assert info.container == "CSV" and [i.location for i in items][:2] == ["row 1 (line 2)", "row 2 (line 3)"]
    assert items[0].error.startswith("the row has 3 fields but the header has 2")
    assert items[1].value == {"instruction": "q1", "output": "a1"}


def test_pandas_to_csv_with_its_unnamed_index_column_is_read_without_it(write):
    # pd.DataFrame({"instruction": ["q1", "q2"], "input": ["", "x"], "output": ["a1", "a2"]}).to_csv(path)
    items, info = read(write("d.csv", ",instruction,input,output\n0,q1,,a1\n1,q2,x,a2\n"))
    assert info.container == "CSV (unnamed first column, pandas' index: not read)"
    assert [i.value for i in items] == [{"instruction": "q1", "input": "", "output": "a1"},
                                        {"instruction": "q2", "input": "x", "output": "a2"}]
    with pytest.raises(FileError, match="cannot tell"):  # an empty name elsewhere is no pandas index
        read(write("e.csv", "instruction,,output\nq,x,a\n"))


def test_a_one_column_csv_is_read_and_prose_is_still_no_csv(write):
    # pd.DataFrame({"text": ["doc one", "doc, two"]}).to_csv(path, index=False): stage pt's text column
    items, info = read(write("d.csv", 'text\ndoc one\n"doc, two"\n'))
    assert info.container == "CSV" and [i.value for i in items] == [{"text": "doc one"}, {"text": "doc, two"}]
    for prose in ("Once upon a time\nthere was a file\n", "Chapter\nIt was late, and dark, and cold.\n"):
        with pytest.raises(FileError, match="cannot tell what this file is"):
            read(write("p.csv", prose))


def test_tsv_is_detected(write):
    items, info = read(write("d.tsv", "instruction\toutput\nq\ta\n"))
    assert info.container == "TSV" and items[0].value == {"instruction": "q", "output": "a"}


def test_csv_unclosed_quote_is_a_file_error(write):
    with pytest.raises(FileError, match="CSV cannot be parsed"):
        read(write("d.csv", 'instruction,output\nq,"never closed\nmore\n'))


def test_parquet_rows(write, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.data"  # no telling extension: the magic bytes decide
    pq.write_table(pa.Table.from_pylist([alpaca(1), alpaca(2)]), path)
    items, info = read(path)
    assert info.container == "Parquet"
    assert [i.location for i in items] == ["row 1", "row 2"] and items[1].value == alpaca(2)
    assert json.loads(items[0].raw) == alpaca(1)


def test_broken_parquet_is_a_file_error(write):
    with pytest.raises(FileError, match="not a readable Parquet file"):
        read(write("d.parquet", b"PAR1" + b"\x00garbage" * 10))


def _peak_reading(path) -> int:
    tracemalloc.start()
    count = sum(1 for _ in read_file(path, FileInfo(str(path))))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count > 0
    return peak


def test_jsonl_is_streamed_memory_does_not_grow_with_file_size(tmp_path):
    line = json.dumps(alpaca(0, output="x" * 400)) + "\n"
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    small.write_text(line * 500)
    big.write_text(line * 20000)  # ~9 MB
    peak_small, peak_big = _peak_reading(small), _peak_reading(big)
    assert peak_big < peak_small + 256 * 1024, (peak_small, peak_big)


def test_json_array_is_streamed_peak_memory_far_below_file_size(tmp_path):
    """A JSON array is read element by element through a window of about 1M characters, not parsed whole."""
    path = tmp_path / "big.json"
    record = json.dumps(alpaca(0, output="x" * 400))
    with open(path, "w", encoding="utf-8") as f:  # ~40 MB, written in pieces (the test itself stays flat)
        f.write("[\n")
        for i in range(80_000):
            f.write(("," if i else "") + record + "\n")
        f.write("]\n")
    size = path.stat().st_size
    tracemalloc.start()
    count = last = 0
    for item in read_file(path, FileInfo(str(path))):
        count += 1
        last = item.line
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (count, last) == (80_000, 80_001)  # every element, with its line
    assert peak < size / 5 and peak < 16 * 2**20, (peak, size)


GZ_CONTENT = {"JSONL": jsonl([alpaca(1), alpaca(2)]), "JSON array": json.dumps([alpaca(1), alpaca(2)], indent=1),
              "CSV": "instruction,input,output\nquestion 1,,answer 1\nquestion 2,,answer 2\n"}


@pytest.mark.parametrize("name", ["d.jsonl.gz", "d.jsonl"])  # told by its first bytes, whatever its name
@pytest.mark.parametrize("container", GZ_CONTENT)
def test_a_gzip_compressed_file_is_read_as_it_is(write, name, container):
    """As the datasets library reads a .jsonl.gz: the same records, locations and raw text as the plain file."""
    import gzip

    plain, _ = read(write("plain", GZ_CONTENT[container]))
    items, info = read(write(name, gzip.compress(GZ_CONTENT[container].encode())))
    assert info.container == f"gzip {container}" and info.describe().startswith("gzip ")
    assert [(i.location, i.value, i.raw) for i in items] == [(i.location, i.value, i.raw) for i in plain]


@pytest.mark.parametrize("damage", ["cut", "flipped"])
def test_gzip_data_damaged_or_cut_short_is_a_file_error(write, damage):
    import gzip

    data = gzip.compress(jsonl([alpaca(i) for i in range(200)]).encode())
    data = data[:len(data) // 2] if damage == "cut" else data[:-8] + bytes(b ^ 0xFF for b in data[-8:])
    with pytest.raises(FileError, match=r"d\.jsonl\.gz: the gzip data is damaged or cut short .*gzip -t FILE"):
        read(write("d.jsonl.gz", data))


def _zip(text: bytes) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("d.jsonl", text)
    return buf.getvalue()


@pytest.mark.parametrize("pack,says", [
    (lambda b: __import__("bz2").compress(b), "bzip2-compressed: decompress it first, e.g. bunzip2 -k FILE"),
    (lambda b: __import__("lzma").compress(b), "xz-compressed: decompress it first, e.g. unxz -k FILE"),
    (lambda b: b"\x28\xb5\x2f\xfd" + b, "zstd-compressed: decompress it first, e.g. unzstd FILE"),
    (_zip, "a zip archive .*: extract the data file first"),
])
def test_other_compressions_are_refused_with_the_command_that_unpacks_them(write, pack, says):
    with pytest.raises(FileError, match=says):
        read(write("d.jsonl", pack(jsonl([alpaca(1)]).encode())))


def test_a_gzip_compressed_parquet_file_is_refused_with_the_fix(write, tmp_path):
    import gzip

    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist([alpaca(1)]), tmp_path / "d.parquet")
    with pytest.raises(FileError, match="gzip-compressed Parquet file .*gunzip -k FILE"):
        read(write("d.parquet.gz", gzip.compress((tmp_path / "d.parquet").read_bytes())))


def test_a_gzip_compressed_text_file_is_read_for_pt(write):
    import gzip

    from tunelab.data.text import records_of

    path = write("corpus.txt.gz", gzip.compress(b"doc one\n\ndoc two\n"))
    info = FileInfo(str(path))
    docs = [i.value["text"] for i in records_of(path, info, "pt")]
    assert docs == ["doc one\n", "doc two\n"] and info.container.startswith("gzip text")
