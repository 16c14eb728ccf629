"""Nothing crashes on any input: damaged files end as located rejections or one clear DataError."""

from __future__ import annotations

import json
import random

import pytest

from tunelab.data.prepare import DataError, prepare_dataset

from data_helpers import alpaca, jsonl, quiet

VALID = {
    "json": json.dumps([alpaca(1), {"conversations": [{"from": "human", "value": "héllo"},
                                                      {"from": "gpt", "value": "hi ☕"}], "tools": "[]"},
                        alpaca(2, history=[["a", "b"]])], ensure_ascii=False, indent=1).encode(),
    "jsonl": jsonl([alpaca(1), {"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a"}]}]).encode(),
    "csv": "instruction,input,output\nq1,,a1\n\"multi\nline\",x,a2\n".encode(),
}


def run(path):
    try:
        r = prepare_dataset(str(path), check=True, console=quiet)
    except DataError as e:
        assert str(e)
        return None
    rep = r.report
    assert rep["records_read"] == rep["records_accepted"] + rep["records_rejected"] + rep["duplicates_removed"]
    return r


@pytest.mark.parametrize("kind", sorted(VALID))
def test_random_damage_never_crashes(write, kind):
    rng = random.Random(kind)
    data = VALID[kind]
    for i in range(60):
        b = bytearray(data)
        op = i % 4
        if op == 0:
            b = b[: rng.randrange(len(b))]  # truncated
        elif op == 1:
            for _ in range(3):
                b[rng.randrange(len(b))] = rng.randrange(256)  # flipped bytes (invalid UTF-8 too)
        elif op == 2:
            pos = rng.randrange(len(b))
            b[pos:pos] = rng.choice([b",", b"]", b"}", b'"', b"\n", b"\x00", b"\xff\xfe", b"{", b"\r\n"])
        else:
            pos = rng.randrange(len(b))
            del b[pos: pos + rng.randrange(1, 20)]
        run(write(f"f{i}.{kind}", bytes(b)))


@pytest.mark.parametrize("content", [
    b"[" * 100000, b'{"instruction": ' + b"[" * 100000,
    jsonl([{"instruction": "q", "output": "a", "tools": [[[[[[[[[[{"x": 1}]]]]]]]]]]}]).encode(),
    jsonl([{"conversations": [{"from": None, "value": 1}, {"role": ["x"], "content": {"a": 1}}]}]).encode(),
    jsonl([{"messages": "not a list"}, {"messages": [None]}, {"messages": [{"role": "user", "content": [1, 2]}]}]
          ).encode(),
    jsonl([{"instruction": "q", "output": float("nan")}, 42, "text", None, [], {}]).encode(),
    b'\xef\xbb\xbf', b"\xff\xfe", b"\xff\xfe{\x00", "instruction,output\n".encode(),
    b'"only a string"', b"123", b"null",
])
def test_nasty_inputs(write, content):
    run(write("nasty.json", content))


# ---------------------------------------------------------------- values that are not text (issue 11 item 4)


def rejected(r):
    return {x["location"]: x["reason"] for x in r.report["rejected_examples"]}


def test_lone_surrogate_is_a_located_rejection_not_a_tokenizer_crash(write, tiny_tokenizer, tmp_path):
    text = '{"instruction": "hi", "output": "\\ud800"}\n' + jsonl([alpaca(1), alpaca(2)])
    r = prepare_dataset(str(write("s.jsonl", text)), tmp_path / "o", tokenizer=tiny_tokenizer, console=quiet)
    assert (r.report["records_accepted"], r.report["records_rejected"]) == (2, 1)
    assert rejected(r) == {"line 1": "field 'output': unpaired UTF-16 surrogate \\ud800 (high half) at character 1: "
                                     "the text is not valid Unicode (a string cut in the middle of an emoji?)"}
    assert r.report["rejected_by_reason"] == {"invalid_text": 1}
    saved = json.loads((tmp_path / "o" / "rejected.jsonl").read_text(encoding="utf-8"))
    assert saved["raw"] == '{"instruction": "hi", "output": "\\ud800"}'


@pytest.mark.parametrize("value,reason", [
    ("NaN", "field 'output' is NaN (not a number)"),
    ("Infinity", "field 'output' is Infinity"),
    ("1e999", "field 'output' is Infinity"),
    ("-Infinity", "field 'output' is -Infinity"),
    ("1" * 30, "field 'output' is a 30-digit number, too large"),
    ("9" * 5000, "field 'output' is a 5000-digit number, too large"),
    ('"a\\u0000b"', "field 'output': NUL U+0000 at character 2"),
    ('"\\u001b[31mred"', "field 'output': ESC U+001B at character 1"),
    ('"\\u0085"', "field 'output': control character U+0085 at character 1: control characters other than tab"),
    ('"\\udc00x"', "field 'output': unpaired UTF-16 surrogate \\udc00 (low half)"),
])
@pytest.mark.parametrize("container", ["jsonl", "json"])
def test_values_that_are_not_text_are_rejected_with_where_and_why(write, container, value, reason):
    recs = [json.dumps(alpaca(1)), '{"instruction": "q", "output": ' + value + '}', json.dumps(alpaca(2))]
    text = "\n".join(recs) + "\n" if container == "jsonl" else "[\n" + ",\n".join(recs) + "\n]\n"
    r = prepare_dataset(str(write(f"v.{container}", text)), check=True, console=quiet)
    assert (r.report["records_accepted"], r.report["records_rejected"]) == (2, 1)
    (where, why), = rejected(r).items()
    assert where == ("line 2" if container == "jsonl" else "record 2 (line 3)")
    assert why.startswith(reason), why


def test_numbers_as_text_are_kept_and_counted_bad_values_in_unread_fields_cost_nothing(write):
    recs = ['{"instruction": "2+2", "output": 4}', '{"instruction": "pi", "output": 3.14, "score": NaN}',
            '{"conversations": [{"from": "human", "value": 7}, {"from": "gpt", "value": 8}], "id": "\\ud800"}',
            '{"instruction": "deep", "output": "ok", "meta": ' + "[" * 3000 + "]" * 3000 + "}"]
    r = prepare_dataset(str(write("n.jsonl", "\n".join(recs))), check=True, console=quiet)
    assert r.report["records_accepted"] == 3 and r.report["records_rejected"] == 1
    assert rejected(r) == {"line 4": "invalid JSON: nested too deeply"}  # deeper than any JSON parser goes
    notes = r.report["normalisations"]
    assert notes["number in field 'output' → text"] == 2 and notes["number in a turn's text → text"] == 2


def test_wrong_types_at_every_level_are_located(write):
    recs = [42, "text", None, [alpaca(1)], {"messages": "hi"}, {"messages": [None]},
            {"messages": [{"role": 1, "content": "a"}]}, {"messages": [{"role": "user", "content": {"a": 1}}]},
            {"conversations": {"from": "human"}}, {"instruction": ["q"], "output": "a"},
            {"instruction": "q", "output": "a", "history": "x"}, {"instruction": "q", "output": True}]
    r = prepare_dataset(str(write("t.json", recs)), check=True, console=quiet)
    assert r.report["records_read"] == len(recs) == r.report["records_rejected"]
    assert all(x["location"].startswith(f"record {i} (line ") for i, x in enumerate(r.report["rejected_examples"], 1))
    assert set(r.report["rejected_by_reason"]) <= {"wrong_type", "missing_field", "invalid_json"}


def test_a_record_too_deep_for_the_parser_costs_only_itself_in_a_json_array(write):
    text = "[" + json.dumps(alpaca(1)) + ", {\"instruction\": " + "[" * 5000 + "]" * 5000 + "}, " + \
        json.dumps(alpaca(2)) + "]"
    r = prepare_dataset(str(write("d.json", text)), check=True, console=quiet)
    assert r.report["records_accepted"] == 2 and rejected(r) == {
        "record 2 (line 1)": "invalid JSON: nested too deeply (thousands of levels)"}


def test_csv_control_characters_and_bad_bytes_are_located(write):
    data = b"instruction,output\nq1,a1\nq2,\"a\x00b\"\nq3,caf\xe9\nq4,a4\n"
    r = prepare_dataset(str(write("c.csv", data)), check=True, console=quiet)
    rej = rejected(r)
    assert r.report["records_accepted"] == 2 and set(rej) == {"row 2 (line 3)", "row 3 (line 4)"}
    assert rej["row 2 (line 3)"].startswith("field 'output': NUL U+0000 at character 2")
    assert rej["row 3 (line 4)"].startswith("line 4: invalid UTF-8 byte 0xe9")


def test_parquet_nan_control_characters_and_invalid_utf8_cells(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = pa.array([b"a1", b"a\x07", b"caf\xe9", b"a4"], pa.binary())
    outputs = pa.Array.from_buffers(pa.string(), 4, raw.buffers())  # Arrow does not check: other writers do this
    table = pa.table({"instruction": ["q1", "q2", "q3", "q4"], "output": outputs,
                      "score": [1.0, 2.0, 3.0, float("nan")]})  # NaN in a column nobody reads: harmless
    pq.write_table(table, tmp_path / "p.parquet")
    nan_output = pa.table({"instruction": ["q"], "output": [float("nan")]})
    pq.write_table(nan_output, tmp_path / "n.parquet")
    r = prepare_dataset([str(tmp_path / "p.parquet"), str(tmp_path / "n.parquet")], check=True, console=quiet)
    rej = {(x["source"][-9:], x["location"]): x["reason"] for x in r.report["rejected_examples"]}
    assert r.report["records_accepted"] == 2 and len(rej) == 3
    assert rej[("p.parquet", "row 2")].startswith("field 'output': control character U+0007 at character 2")
    assert rej[("p.parquet", "row 3")] == "column 'output': invalid UTF-8 byte 0xe9 at byte 4 of the text"
    assert rej[("n.parquet", "row 1")].startswith("field 'output' is NaN")


def test_mixed_formats_are_a_warning_with_counts_and_first_locations(write, tmp_path):
    sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    openai = {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}
    recs = [alpaca(1), alpaca(2), sharegpt, alpaca(3), openai, {"instruction": "q"}]  # the last is rejected
    printed = []
    r = prepare_dataset(str(write("m.jsonl", jsonl(recs))), tmp_path / "o", console=printed.append)
    f = r.report["files"][0]
    assert f["formats"] == {"alpaca": 4, "sharegpt": 1, "openai": 1}
    assert f["format_first"] == {"alpaca": "line 1", "sharegpt": "line 3", "openai": "line 5"}
    assert r.usable and r.report["records_accepted"] == 5 and r.report["warnings"] == {"mixed_formats": 2}
    line = "alpaca 4 (first at line 1), sharegpt 1 (first at line 3), openai 1 (first at line 5)"
    assert any("m.jsonl mixes record formats: " + line in p for p in printed)
    md = (tmp_path / "o" / "report.md").read_text(encoding="utf-8")
    assert "**Mixed formats** in 1 file(s)" in md and line in md
    single = prepare_dataset(str(write("one.jsonl", jsonl([alpaca(1), alpaca(2)]))), check=True, console=quiet)
    assert single.report["files"][0]["formats"] == {"alpaca": 2} and not single.report["warnings"]


def test_undecodable_bytes_in_a_json_array_show_as_replacement_characters(write, tmp_path):
    text = "[" + json.dumps(alpaca(1)) + ', {"instruction": "caf\xe9", "output": "x"}]'
    r = prepare_dataset(str(write("b.json", text.encode("latin-1"))), tmp_path / "o", console=quiet)
    assert r.report["records_rejected"] == 1
    saved = json.loads((tmp_path / "o" / "rejected.jsonl").read_text(encoding="utf-8"))
    assert saved["reason"].startswith("line 1: invalid UTF-8 byte 0xe9 at column")
    assert saved["raw"] == '{"instruction": "caf\ufffd", "output": "x"}'



def test_assistant_turns_weighted_0_are_not_trained_after_prepare(write, tiny_tokenizer, tmp_path):
    """LLaMA-Factory's loss_weight and axolotl's weight of 0: the prepared records train only the other answers
    (training and tunelab eval mask from the same prepared messages with encode_record)."""
    from tunelab.data.template import IGNORE_INDEX, encode_record

    def turn(role, text, **w):
        return {"role": role, "content": [{"type": "text", "value": text}], **w}

    recs = [{"messages": [turn("user", "Say something rude", loss_weight=0.0),
                          turn("assistant", "You idiot.", loss_weight=0.0), turn("user", "Now be polite"),
                          turn("assistant", "Sorry, I apologise.", loss_weight=1.0)]},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "bad answer", "weight": 0},
                               {"from": "human", "value": "again"}, {"from": "gpt", "value": "good answer"}]}]
    prepare_dataset(str(write("w.jsonl", jsonl(recs))), tmp_path / "o", tokenizer=tiny_tokenizer, val_ratio=0,
                    console=quiet)
    trained = []
    for line in (tmp_path / "o" / "train.jsonl").read_text(encoding="utf-8").splitlines():
        enc = encode_record(tiny_tokenizer, json.loads(line)["messages"])
        trained.append(tiny_tokenizer.decode([t for t in enc.labels if t != IGNORE_INDEX]))
    assert sorted(t.split("<")[0] for t in trained) == ["Sorry, I apologise.", "good answer"]


@pytest.mark.parametrize("content", [b"", b" \n\n", b"\xef\xbb\xbf\n"])
def test_an_empty_text_file_for_pt_is_a_file_error_like_an_empty_json_file(write, content):
    with pytest.raises(DataError, match="empty.txt: the file is empty"):
        prepare_dataset(str(write("empty.txt", content)), check=True, stage="pt", console=quiet)
