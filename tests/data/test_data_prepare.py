"""The prepare pipeline: conservation, rejections, split, report, tokens, fingerprint, load_prepared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.data.fast_tokenizer import FastTokenizer
from tunelab.data.prepare import DataError, PreparedData, PrepareResult, load_prepared, prepare_dataset
from tunelab.data.formats import Conversation
from tunelab.data.template import encode_record
from tunelab.errors import TunelabError

from data_helpers import alpaca, jsonl, quiet


def lines(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.fixture
def messy(write):
    """10 lines: 6 good, 1 duplicate, 1 invalid JSON, 1 missing output, 1 wrong order (ShareGPT)."""
    good = [alpaca(i) for i in range(6)]
    text = jsonl(good[:3]) + jsonl([alpaca(1)]) + '{"instruction": "x", \n' + jsonl([{"instruction": "q"}])
    text += jsonl([{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}])
    text += jsonl(good[3:])
    return write("messy.json", text)


def test_public_api_types():
    assert issubclass(DataError, TunelabError)
    assert {"output", "report", "usable"} <= set(PrepareResult.__dataclass_fields__)
    assert {"train", "val", "report", "fingerprint"} <= set(PreparedData.__dataclass_fields__)


def test_conservation_and_rejected_file(messy, tmp_path):
    out = tmp_path / "out"
    printed = []
    r = prepare_dataset(str(messy), out, console=printed.append)
    rep = r.report
    assert (rep["records_read"], rep["records_accepted"], rep["records_rejected"], rep["duplicates_removed"]) == \
        (10, 6, 3, 1)
    assert "records: 10 read = 6 accepted + 3 rejected + 1 duplicates removed" in printed
    assert r.usable and r.output == out
    assert sorted(p.name for p in out.iterdir()) == ["rejected.jsonl", "report.json", "report.md", "train.jsonl",
                                                     "val.jsonl"]
    rej = lines(out / "rejected.jsonl")
    assert len(rej) == rep["records_rejected"] + rep["duplicates_removed"]
    by_loc = {x["location"]: x for x in rej}
    assert by_loc["line 4"]["duplicate_of"].endswith("messy.json line 2")
    assert by_loc["line 5"]["reason"].startswith("invalid JSON") and by_loc["line 5"]["raw"] == '{"instruction": "x",'
    assert by_loc["line 6"]["reason"] == "missing field 'output'" and json.loads(by_loc["line 6"]["raw"])
    assert "starts with the assistant" in by_loc["line 7"]["reason"]
    assert all({"source", "location", "reason", "raw"} <= set(x) for x in rej)
    saved = json.loads((out / "report.json").read_text())
    for key in ("records_read", "records_accepted", "records_rejected", "duplicates_removed", "warnings",
                "token_stats", "fingerprint", "options"):
        assert key in saved
    assert saved["rejected_by_reason"] == {"invalid_json": 1, "missing_field": 1, "order": 1}
    assert "10 read = 6 accepted + 3 rejected + 1 duplicates removed" in (out / "report.md").read_text()
    data = load_prepared(out)
    assert len(data.train) + len(data.val) == 6 and data.fingerprint == rep["fingerprint"]
    rec = data.train[0]
    assert set(rec) == {"messages", "tools", "source", "location"} and rec["source"] == str(messy)


def test_split_is_deterministic_and_exact(write, tmp_path):
    src = write("d.jsonl", jsonl([alpaca(i) for i in range(50)]))
    a = prepare_dataset(str(src), tmp_path / "a", val_ratio=0.2, seed=1, console=quiet)
    b = prepare_dataset(str(src), tmp_path / "b", val_ratio=0.2, seed=1, console=quiet)
    c = prepare_dataset(str(src), tmp_path / "c", val_ratio=0.2, seed=2, console=quiet)
    va, vb, vc = (load_prepared(x.output).val for x in (a, b, c))
    assert len(va) == 10 and va == vb and va != vc
    assert len(load_prepared(a.output).train) == 40
    assert a.report["fingerprint"] == b.report["fingerprint"] != c.report["fingerprint"]


def test_tiny_dataset_still_gets_one_validation_record(write, tmp_path):
    r = prepare_dataset(str(write("d.jsonl", jsonl([alpaca(i) for i in range(3)]))), tmp_path / "o", console=quiet)
    assert r.report["split"]["val"] == 1 and r.report["split"]["train"] == 2


def test_explicit_eval_file(write, tmp_path):
    train = write("t.jsonl", jsonl([alpaca(i) for i in range(5)]))
    ev = write("e.jsonl", jsonl([alpaca(i) for i in range(100, 103)] + [alpaca(0)]))  # one leaks from train
    r = prepare_dataset(str(train), tmp_path / "o", eval_inputs=str(ev), console=quiet)
    data = load_prepared(r.output)
    assert len(data.train) == 5 and len(data.val) == 3 and r.report["duplicates_removed"] == 1
    assert [f["role"] for f in r.report["files"]] == ["train", "eval"]
    assert r.report["warning_examples"]["eval_record_is_a_duplicate"] == [f"{ev} line 4"]
    assert "no_validation_split" not in r.report["warnings"]


def test_an_eval_file_that_only_repeats_the_training_data_is_said_to_hold_nothing_out(write, tmp_path):
    """`--eval-file` naming the training file (or a copy) left 0 validation records, every one removed as a
    duplicate, with nothing but the duplicate count to say so."""
    train = write("t.jsonl", jsonl([alpaca(i) for i in range(4)]))
    printed = []
    r = prepare_dataset(str(train), tmp_path / "o", eval_inputs=str(train), console=printed.append)
    assert r.report["split"]["val"] == 0 and r.report["warnings"]["eval_record_is_a_duplicate"] == 4
    assert r.report["warnings"]["no_validation_split"] == 1
    assert any(line.startswith("warning: no_validation_split") and "nothing held out" in line for line in printed)


def test_check_writes_nothing(messy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = prepare_dataset(str(messy), check=True, console=quiet)
    assert r.output is None and r.usable and not (tmp_path / "data").exists()


def test_default_output_is_data_processed_name(messy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = prepare_dataset(str(messy), console=quiet)
    assert r.output == tmp_path.joinpath("data", "processed", "messy").relative_to(tmp_path)
    assert (tmp_path / "data/processed/messy/train.jsonl").is_file()
    assert not [p for p in (tmp_path / "data/processed").iterdir() if p.name.startswith(".")]  # no temp left


def test_nothing_usable_and_reject_ratio(write, tmp_path):
    bad = write("bad.jsonl", jsonl([{"instruction": "q"}] * 2 + [{"text": "web"}]))
    r = prepare_dataset(str(bad), tmp_path / "o", console=quiet)
    assert not r.usable and "no record was accepted" in r.problems[0]
    with pytest.raises(DataError, match="not usable"):
        r.raise_if_unusable()
    mixed = write("mixed.jsonl", jsonl([alpaca(1), alpaca(2), {"instruction": "q"}]))
    assert prepare_dataset(str(mixed), check=True, max_reject_ratio=0.5, console=quiet).usable
    r = prepare_dataset(str(mixed), check=True, max_reject_ratio=0.2, console=quiet)
    assert not r.usable and "33.3%" in r.problems[0]


def test_whole_file_errors_from_several_files_are_reported_together(write, tmp_path):
    a = write("a.json", "[\n" + json.dumps(alpaca(1)) + ",\n]")
    b = write("b.json", "")
    c = write("c.jsonl", jsonl([alpaca(1)]))
    with pytest.raises(DataError) as e:
        prepare_dataset([str(a), str(b), str(c)], tmp_path / "o", console=quiet)
    msg = str(e.value)
    assert "a.json: line 2, column" in msg and "trailing comma" in msg and "b.json: the file is empty" in msg
    assert not (tmp_path / "o").exists()


def test_inputs_folder_glob_and_missing(write, tmp_path):
    write("in/x.jsonl", jsonl([alpaca(1)]))
    write("in/sub/y.csv", "instruction,output\nq,a\n")
    write("in/notes.md", "not data")
    r = prepare_dataset(str(tmp_path / "in"), check=True, console=quiet)
    assert r.report["records_accepted"] == 2 and len(r.report["files"]) == 2
    r = prepare_dataset(str(tmp_path / "in" / "**" / "*.csv"), check=True, console=quiet)
    assert [f["container"] for f in r.report["files"]] == ["CSV"]
    with pytest.raises(DataError, match="input not found"):
        prepare_dataset(str(tmp_path / "nope.json"), check=True, console=quiet)
    with pytest.raises(DataError, match="no files match"):
        prepare_dataset(str(tmp_path / "*.nothing"), check=True, console=quiet)
    with pytest.raises(DataError, match=r"^/dev/null is not a regular file or folder \(a device, pipe or socket\)"):
        prepare_dataset("/dev/null", check=True, console=quiet)  # it exists: "not found" was wrong


def test_bad_options_are_refused_together(messy):
    with pytest.raises(DataError) as e:
        prepare_dataset(str(messy), check=True, format="alpacca", overflow="cut", column_map={"instuction": "q"})
    assert "format must be one of" in str(e.value) and "overflow" in str(e.value)
    assert "did you mean 'instruction'" in str(e.value)


def test_normalisations_and_warnings_are_counted(write):
    text = "\ufeff" + jsonl([alpaca(1, output=" padded "), {"conversations": [{"from": "human", "value": "a"},
                             {"from": "gpt", "value": "{{name}}"}]}]).replace("\n", "\r\n")
    r = prepare_dataset(str(write("d.jsonl", text)), check=True, console=quiet)
    n = r.report["normalisations"]
    assert n["byte-order mark stripped"] == 1 and n["CRLF line endings read"] == 1 and n["whitespace trimmed"] == 1
    assert n["role 'human' → user"] == 1 and n["role 'gpt' → assistant"] == 1
    assert r.report["warnings"] == {"template_placeholders": 1, "mixed_formats": 1}  # alpaca + sharegpt
    assert r.report["warning_examples"]["template_placeholders"][0].endswith("d.jsonl line 2")


# ---------------------------------------------------------------- with the real tokenizer and chat template


def test_fast_tokenizer_proxy_gives_identical_encodings(tiny_tokenizer, monkeypatch):
    calls = []
    real = tiny_tokenizer.apply_chat_template
    monkeypatch.setattr(tiny_tokenizer, "apply_chat_template", lambda *a, **k: calls.append(1) or real(*a, **k))
    proxy = FastTokenizer(tiny_tokenizer)
    convs = [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
         {"role": "user", "content": "c 你好"}, {"role": "assistant", "content": "d ☕"}],
    ]
    for m in convs:
        for kw in ({}, {"max_length": 40}, {"train_on": "last_assistant"}, {"train_on": "all"}):
            proxy.begin()
            proxy.pretokenize([Conversation(m)], kw.get("train_on", "assistant"))  # answered from the batch
            calls.clear()
            a = encode_record(proxy, m, **kw)
            assert not calls  # every render encode_record asked for was predicted and batched
            b = encode_record(tiny_tokenizer, m, **kw)
            assert (a.input_ids, a.labels, a.spans, a.truncated) == (b.input_ids, b.labels, b.spans, b.truncated)
            proxy.begin()  # now answered by the single-text path
            a = encode_record(proxy, m, **kw)
            assert (a.input_ids, a.labels, a.spans, a.truncated) == (b.input_ids, b.labels, b.spans, b.truncated)


def long_alpaca(i, prompt_words, answer_words):
    return {"instruction": f"q{i} " + "word " * prompt_words, "output": f"a{i} " + "ok " * answer_words}


@pytest.mark.parametrize("overflow,accepted,truncated,dropped,kept", [
    ("truncate", 3, 1, 0, 0), ("drop", 2, 0, 1, 0), ("keep", 3, 0, 0, 1)])
def test_overflow_modes_are_counted(write, tiny_tokenizer, overflow, accepted, truncated, dropped, kept):
    recs = [long_alpaca(0, 3, 3), long_alpaca(1, 3, 3), long_alpaca(2, 3, 200)]
    r = prepare_dataset(str(write("d.jsonl", jsonl(recs))), check=True, tokenizer=tiny_tokenizer, max_length=64,
                        overflow=overflow, console=quiet)
    ts = r.report["token_stats"]
    assert r.report["records_accepted"] == accepted and ts["over_max_length"] == 1
    assert (ts["truncated"], ts["dropped"], ts["kept_over_max_length"]) == (truncated, dropped, kept)
    assert ts["max"] > 64 and ts["p50"] < 64 and ts["records"] == 3
    if overflow == "drop":
        assert r.report["rejected_by_reason"] == {"too_long": 1}


def test_prompt_filling_max_length_is_rejected_nothing_to_train(write, tiny_tokenizer, tmp_path):
    recs = [long_alpaca(0, 3, 3), long_alpaca(1, 200, 3)]
    r = prepare_dataset(str(write("d.jsonl", jsonl(recs))), tmp_path / "o", tokenizer=tiny_tokenizer, max_length=64,
                        console=quiet)
    assert r.report["records_rejected"] == 1 and r.report["token_stats"]["nothing_to_train"] == 1
    rej = lines(tmp_path / "o" / "rejected.jsonl")[0]
    assert rej["location"] == "line 2" and "nothing left to train" in rej["reason"]
    assert (tmp_path / "o" / "length_histogram.png").stat().st_size > 1000


def test_token_stats_histogram_and_samples(write, tiny_tokenizer):
    printed = []
    recs = [long_alpaca(i, i, 2 * i) for i in range(20)]
    r = prepare_dataset(str(write("d.jsonl", jsonl(recs))), check=True, tokenizer=tiny_tokenizer, max_length=128,
                        show_samples=2, console=printed.append)
    ts = r.report["token_stats"]
    assert ts["records"] == 20 and ts["p50"] <= ts["p95"] <= ts["max"] and sum(ts["histogram"]["counts"]) == 20
    out = "\n".join(printed)
    assert "◀ max_length" in out and out.count("--- sample") == 2
    assert "[[a0<|im_end|>" in out  # the trained span covers the answer and the end-of-turn token
    assert "user\nq0" in out and "[[q0" not in out


@pytest.mark.parametrize("train_on,marked", [("assistant", ["[[right]]"]), ("last_assistant", ["[[right]]"]),
                                              ("all", ["[[q]]", "[[wrong]]", "[[again]]", "[[right]]"])])
def test_samples_without_a_tokenizer_mark_what_the_mask_trains(write, train_on, marked):
    # a turn of weight 0 is context (template.is_trained): shown unmarked, as the loss mask leaves it out
    rec = {"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "wrong", "loss_weight": 0},
                        {"role": "user", "content": "again"}, {"role": "assistant", "content": "right"}]}
    printed = []
    prepare_dataset(str(write("w.jsonl", jsonl([rec]))), check=True, train_on=train_on, show_samples=1,
                    console=printed.append)
    turns = printed[printed.index("--- sample 1") + 1:][:4]
    assert [t.split(": ", 1)[1] for t in turns if "[[" in t] == marked


def test_fingerprint_covers_bytes_options_and_tokenizer(write, tiny_tokenizer):
    src = write("d.jsonl", jsonl([alpaca(1), alpaca(2)]))

    def fp(**kw):
        return prepare_dataset(str(src), check=True, console=quiet, **kw).report["fingerprint"]

    base = fp()
    assert fp() == base and fp(max_length=256) != base and fp(seed=3) != base
    with_tok = fp(tokenizer=tiny_tokenizer)
    assert with_tok != base and fp(tokenizer=tiny_tokenizer) == with_tok
    src.write_text(jsonl([alpaca(1), alpaca(3)]))
    assert fp() != base


def test_chat_template_that_refuses_a_record_rejects_it(write, tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
                         "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    recs = [alpaca(1), {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "call"},
                                     {"role": "tool", "content": "r"}, {"role": "assistant", "content": "b"}]}]
    r = prepare_dataset(str(write("d.jsonl", jsonl(recs))), check=True, tokenizer=tok, console=quiet)
    assert r.report["rejected_by_reason"] == {"chat_template": 1}
    assert "no tools" in r.report["rejected_examples"][0]["reason"]


def test_load_prepared_refuses_what_is_not_a_prepared_folder(tmp_path):
    with pytest.raises(DataError, match="not a prepared dataset"):
        load_prepared(tmp_path)


def test_parquet_and_csv_through_the_pipeline(write, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([alpaca(1), alpaca(2), alpaca(1)]), tmp_path / "d.parquet")
    csv_path = write("d.csv", 'instruction,input,output\nq,,"a, b"\n"multi\nline",,x\nq,,"a, b"\n')
    r = prepare_dataset([str(tmp_path / "d.parquet"), str(csv_path)], tmp_path / "o", val_ratio=0, console=quiet)
    rej = {x["location"]: x for x in lines(tmp_path / "o" / "rejected.jsonl")}
    assert rej["row 3"]["duplicate_of"].endswith("d.parquet row 1")
    assert rej["row 3 (line 5)"]["duplicate_of"].endswith("d.csv line 2")
    train = load_prepared(tmp_path / "o").train
    assert [t["location"] for t in train] == ["row 1", "row 2", "row 1 (line 2)", "row 2 (line 3)"]
    assert train[3]["messages"][0]["content"] == "multi\nline" and r.report["duplicates_removed"] == 2


def test_pipeline_memory_per_record_is_a_few_bytes_not_the_record(tmp_path):
    """Records stream through; only a hash per record is kept (for duplicates), so memory stays nearly flat."""
    import tracemalloc

    def peak(n):
        src = tmp_path / f"d{n}.jsonl"
        src.write_text(jsonl([alpaca(i, output="x" * 400) for i in range(n)]))
        tracemalloc.start()
        prepare_dataset(str(src), tmp_path / f"o{n}", console=quiet)
        p = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return p

    small, big = peak(1000), peak(11000)
    per_record = (big - small) / 10000
    assert per_record < 250, per_record  # each record is ~500 bytes of JSON, far more as Python objects


def test_output_that_is_not_a_prepared_folder_is_never_replaced(messy, tmp_path):
    precious = tmp_path / "raw"
    precious.mkdir()
    (precious / "keep.json").write_text("[]")
    with pytest.raises(DataError, match="refusing to replace it"):
        prepare_dataset(str(messy), precious, console=quiet)
    assert (precious / "keep.json").is_file()
    out = tmp_path / "prepared"
    prepare_dataset(str(messy), out, console=quiet)
    r = prepare_dataset([messy], out, val_ratio=0, console=quiet)  # a prepared folder is replaced; Path inputs work
    assert r.report["split"]["val"] == 0 and len(load_prepared(out).val) == 0


def test_a_file_name_that_is_not_utf8_is_written_escaped_and_reads_back(write, tmp_path):
    """validate passed a folder holding caf\\xe9.jsonl (a Latin-1 name), prepare crashed writing train.jsonl
    (UnicodeEncodeError: surrogates not allowed): every file that names the source now holds it escaped."""
    import os

    src = write(f"in/{os.fsdecode(b'caf' + bytes([0xE9]) + b'.jsonl')}",
                jsonl([alpaca(1), alpaca(2), {"instruction": "q"}]))
    out = tmp_path / "out"
    prepare_dataset(str(tmp_path / "in"), out, console=quiet)
    data = load_prepared(out)
    assert {r["source"] for r in data.train + data.val} == {str(src)}
    assert lines(out / "rejected.jsonl")[0]["source"] == str(src)
    assert json.loads((out / "report.json").read_text())["files"][0]["path"] == str(src)
    assert "caf\\udce9.jsonl" in (out / "report.md").read_text(encoding="utf-8")


def test_files_a_folder_input_holds_but_are_not_read_are_named(write, tmp_path):
    """A folder of shards read train-00000.jsonl and passed over train-00001.jsonl.gz without a word (4 of 12
    records read): a .jsonl.gz is now read as it is, and every file of a folder that is not read (another
    compression, a README) is named on the console and in the report."""
    import gzip
    import lzma

    write("in/train-00000.jsonl", jsonl([alpaca(1)]))
    write("in/train-00001.jsonl.gz", gzip.compress(jsonl([alpaca(2)]).encode()))
    write("in/train-00002.jsonl.xz", lzma.compress(jsonl([alpaca(3)]).encode()))
    write("in/README.md", "a dataset card")
    printed = []
    r = prepare_dataset(str(tmp_path / "in"), tmp_path / "out", console=printed.append)
    xz, readme = str(tmp_path / "in" / "train-00002.jsonl.xz"), str(tmp_path / "in" / "README.md")
    assert r.report["records_accepted"] == 2 and r.report["files"][1]["container"] == "gzip JSONL"
    assert r.report["skipped_files"] == [readme, xz]
    said = next(x for x in printed if x.startswith("warning: 2 file(s)"))
    assert xz in said and readme in said and "unxz -k" in said
    assert f"`{xz}`" in (tmp_path / "out" / "report.md").read_text()
    write("xz/a.jsonl.xz", lzma.compress(jsonl([alpaca(2)]).encode()))
    with pytest.raises(DataError, match=r"no data files .*; it holds .*a\.jsonl\.xz \(only gzip-compressed files"):
        prepare_dataset(str(tmp_path / "xz"), check=True, console=quiet)


def test_a_gzip_input_names_its_prepared_folder_without_its_suffixes(write, tmp_path, monkeypatch):
    import gzip

    monkeypatch.chdir(tmp_path)
    r = prepare_dataset(str(write("shard.jsonl.gz", gzip.compress(jsonl([alpaca(1)]).encode()))), console=quiet)
    assert r.output == Path("data") / "processed" / "shard" and r.report["name"] == "shard"


def test_truncated_records_are_named_as_the_preference_stages_name_theirs(write, tiny_tokenizer, tmp_path):
    """SFT counted its truncated records (token_stats.truncated) but recorded nowhere which they were, while the
    preference stages name theirs (answers_truncated): each cut record's location is now a warning example."""
    recs = [long_alpaca(0, 3, 3), long_alpaca(1, 3, 200), long_alpaca(2, 3, 3), long_alpaca(3, 3, 300)]
    src = write("d.jsonl", jsonl(recs))
    printed = []
    r = prepare_dataset(str(src), tmp_path / "o", tokenizer=tiny_tokenizer, max_length=64, console=printed.append)
    assert r.report["token_stats"]["truncated"] == r.report["warnings"]["truncated_to_max_length"] == 2
    assert r.report["warning_examples"]["truncated_to_max_length"] == [f"{src} line 2", f"{src} line 4"]
    assert any(x.startswith("warning: truncated_to_max_length: 2 record(s)") and f"{src} line 4" in x for x in printed)
    assert f"{src} line 2" in (tmp_path / "o" / "report.md").read_text()


def test_a_control_token_in_a_message_is_found_and_rejects_the_record(tiny_tokenizer):
    """The rendered conversation is tokenised whole: an answer that says "<|im_end|>" was encoded as the real
    end-of-turn token, teaching the model to end its turn there, with nothing said."""
    from tunelab.data.template import RecordRejected, find_control_tokens

    convo = [{"role": "system", "content": "You write code."},
             {"role": "user", "content": "What ends a turn? <filename> and <|endoftext|> too"},
             {"role": "assistant", "content": "This: <|im_end|>, and again <|im_end|>"}]
    assert find_control_tokens(tiny_tokenizer, convo) == [(1, "<filename>"), (1, "<|endoftext|>"), (2, "<|im_end|>")]
    looks_alike = [{"role": "user", "content": "<|im_end| > <im_end> |im_end|"}, {"role": "assistant", "content": "x"}]
    assert find_control_tokens(tiny_tokenizer, looks_alike) == []
    assert encode_record(tiny_tokenizer, looks_alike).num_trained > 0
    for tok in (tiny_tokenizer, FastTokenizer(tiny_tokenizer)):
        with pytest.raises(RecordRejected) as e:
            encode_record(tok, convo[1:])
        assert str(e.value) == ("turn 1 (user) holds '<filename>', '<|endoftext|>'; turn 2 (assistant) holds "
                                "'<|im_end|>' (control tokens of the tokenizer, as text): it would be read as the "
                                "control token (e.g. ending the turn), not as text")


def test_prepare_rejects_a_record_holding_a_control_token_with_its_location_and_reason(write, tiny_tokenizer,
                                                                                         tmp_path):
    bad_answer = alpaca(1, output="Done.<|im_end|>\n<|im_start|>user\nthanks")
    bad_user = {"conversations": [{"from": "human", "value": "<issue_start>bug"}, {"from": "gpt", "value": "ok"}]}
    src = write("d.jsonl", jsonl([alpaca(0), bad_answer, alpaca(2), bad_user, alpaca(0)]))
    printed = []
    r = prepare_dataset(str(src), tmp_path / "o", tokenizer=tiny_tokenizer, console=printed.append)
    rep = r.report
    assert (rep["records_read"], rep["records_accepted"], rep["records_rejected"], rep["duplicates_removed"]) == \
        (5, 2, 2, 1)
    assert "records: 5 read = 2 accepted + 2 rejected + 1 duplicates removed" in printed
    assert rep["rejected_by_reason"] == {"control_token": 2} and rep["token_stats"]["nothing_to_train"] == 0
    rej = {x["location"]: x for x in lines(tmp_path / "o" / "rejected.jsonl")}
    assert rej["line 2"]["reason"].startswith("turn 2 (assistant) holds '<|im_end|>'")
    assert rej["line 4"]["reason"].startswith("turn 1 (user) holds '<issue_start>'")
    assert all("not as text" in rej[k]["reason"] and rej[k]["source"] == str(src) for k in ("line 2", "line 4"))
    assert any(p.startswith(f"  rejected {src} line 2: turn 2 (assistant) holds '<|im_end|>'") for p in printed)
    kept = load_prepared(tmp_path / "o")
    assert all("<|im" not in m["content"] for rec in kept.train + kept.val for m in rec["messages"])


def test_a_control_token_in_a_tool_schema_rejects_the_record_where_the_template_renders_tools(tiny_tokenizer):
    """A record's tool schemas are rendered into the prompt by templates that take tools (Qwen's, Llama 3's): a
    description holding "<|im_end|>" became the real end-of-turn token there, unchecked (only message contents
    were). A template that leaves the tools out (SmolLM2's) never reads them, so the record stays."""
    import copy

    from tunelab.data.template import RecordRejected, find_control_tokens

    convo = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "Sunny."}]
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "ends with <|im_end|>",
                                               "parameters": {"type": "object", "properties": {}}}}]
    assert find_control_tokens(tiny_tokenizer, convo, tools) == []  # SmolLM2's template: no tools rendered
    assert encode_record(tiny_tokenizer, convo, tools=tools).num_trained > 0
    with_tools = copy.deepcopy(tiny_tokenizer)
    with_tools.chat_template = ("{% if tools %}<|im_start|>system\n{{ tools | tojson }}<|im_end|>\n{% endif %}"
                                "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert find_control_tokens(with_tools, convo, tools) == [(None, "<|im_end|>")]
    with pytest.raises(RecordRejected, match=r"^the tools hold '<\|im_end\|>' \(a control token of the tokenizer"):
        encode_record(with_tools, convo, tools=tools)


def test_a_map_whose_column_no_record_has_is_a_warning(write, tmp_path):
    """`--map instruction=quest` (a typo of question) on a file without that column read each record's own
    `instruction` without a word; the map read nothing."""
    src = write("d.jsonl", jsonl([alpaca(i) for i in range(3)]))
    r = prepare_dataset(str(src), tmp_path / "o", column_map={"instruction": "quest"}, console=quiet)
    assert r.report["records_accepted"] == 3
    assert r.report["warning_examples"]["map_column_not_found"] == [
        "--map instruction=quest: no record has a column 'quest' (each record's own 'instruction' was read)"]
    used = write("q.jsonl", jsonl([{"quest": "q", "output": "a"}]))
    r = prepare_dataset(str(used), tmp_path / "q", column_map={"instruction": "quest"}, val_ratio=0, console=quiet)
    assert "map_column_not_found" not in r.report["warnings"]
