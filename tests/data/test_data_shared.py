"""The real, externally written datasets under ../shared/data (skipped when absent)."""

from __future__ import annotations

import json

import pytest

from tunelab.data.prepare import prepare_dataset

from data_helpers import quiet, shared_file

# file -> (read, accepted, rejected, duplicates): exact figures, each checked by hand against the file.
EXPECTED = {
    "llamafactory/alpaca_en_demo.json": (999, 985, 0, 14),
    "llamafactory/alpaca_zh_demo.json": (1000, 992, 0, 8),
    "llamafactory/identity.json": (91, 91, 0, 0),
    "llamafactory/glaive_toolcall_en_demo.json": (300, 265, 0, 35),
    "llamafactory/glaive_toolcall_zh_demo.json": (300, 257, 0, 43),
    "llamafactory/v1_sft_demo.jsonl": (500, 499, 0, 1),
    "llamafactory/reason_tool_use_demo_50.jsonl": (50, 50, 0, 0),
    "fastchat/dummy_conversation.json": (500, 500, 0, 0),
    "axolotl/conversation.json": (1, 1, 0, 0),
    # preference data, used as SFT where that is safe (see tunelab.data.formats)
    # 2 rejected as invalid text: record 16 holds mojibake ('â\x80\x94' for '—'), record 287 a '\frac' whose
    # unescaped backslash JSON read as a form feed (U+000C)
    "llamafactory/dpo_en_demo.json": (300, 293, 2, 5),
    "llamafactory/dpo_zh_demo.json": (300, 289, 0, 11),
    "llamafactory/v1_dpo_demo.jsonl": (10, 10, 0, 0),
    "llamafactory/kto_en_demo.json": (300, 150, 150, 0),
}


def counts(r):
    rep = r.report
    return rep["records_read"], rep["records_accepted"], rep["records_rejected"], rep["duplicates_removed"]


@pytest.mark.parametrize("rel", sorted(EXPECTED))
def test_shared_dataset_loads_fully(rel):
    r = prepare_dataset(str(shared_file(rel)), check=True, console=quiet)
    assert counts(r) == EXPECTED[rel] and r.usable


def test_glaive_zh_quirk_is_only_a_warning():
    r = prepare_dataset(str(shared_file("llamafactory/glaive_toolcall_zh_demo.json")), check=True, console=quiet)
    assert r.report["warnings"]["tool_result_without_call"] == 2
    where = r.report["warning_examples"]["tool_result_without_call"]
    assert [w.split("json ")[1].split(" (")[0] for w in where] == ["record 198", "record 294"]


def test_glaive_en_tool_turns_and_tools(tmp_path):
    r = prepare_dataset(str(shared_file("llamafactory/glaive_toolcall_en_demo.json")), tmp_path / "g",
                        console=quiet, val_ratio=0)
    recs = [json.loads(x) for x in (tmp_path / "g" / "train.jsonl").read_text().splitlines()]
    assert len(recs) == r.report["records_accepted"] == 265
    assert all(x["tools"] is None or isinstance(x["tools"], list) for x in recs)
    assert sum(x["tools"] is not None for x in recs) > 100
    call = next(x for x in recs if any(m["role"] == "tool" for m in x["messages"]))
    roles = [m["role"] for m in call["messages"]]
    i = roles.index("tool")
    assert roles[i - 1] == "assistant" and json.loads(call["messages"][i - 1]["content"])["name"]


def test_axolotl_missing_turns_is_rejected_with_location():
    r = prepare_dataset(str(shared_file("axolotl/conversation.missingturns.json")), check=True, console=quiet)
    assert counts(r) == (1, 0, 1, 0) and not r.usable
    assert r.report["rejected_examples"][0]["location"] == "record 1 (line 1)"
    assert r.report["rejected_examples"][0]["reason"] == "turn 2 (assistant) is empty"


@pytest.mark.parametrize("rel,reason", [
    ("llamafactory/c4_demo.jsonl", "plain pretraining text"),
    ("fastchat/mt_bench_question.jsonl", "found keys: category, question_id, turns"),
])
def test_non_sft_files_are_refused_with_a_reason(rel, reason):
    r = prepare_dataset(str(shared_file(rel)), check=True, console=quiet)
    assert not r.usable and r.report["records_accepted"] == 0
    assert reason in r.report["rejected_examples"][0]["reason"]


def test_plain_text_file_is_a_whole_file_error():
    from tunelab.data.prepare import DataError

    with pytest.raises(DataError, match="cannot tell what this file is"):
        prepare_dataset(str(shared_file("llamafactory/wiki_demo.txt")), check=True, console=quiet)


@pytest.mark.parametrize("rel", ["llamafactory/glaive_toolcall_zh_demo.json", "fastchat/dummy_conversation.json",
                                 "llamafactory/reason_tool_use_demo_50.jsonl"])
def test_shared_dataset_with_the_real_chat_template(rel, tiny_tokenizer):
    r = prepare_dataset(str(shared_file(rel)), check=True, tokenizer=tiny_tokenizer, max_length=1024, console=quiet)
    ts = r.report["token_stats"]
    assert r.usable and ts["trained_tokens"] > 0
    # every record that reached the tokenizer is in the statistics, including those rejected for its sake
    assert ts["records"] == r.report["records_accepted"] + ts["nothing_to_train"] + ts["dropped"]
    assert r.report["records_read"] == EXPECTED[rel][0]


def test_tools_the_template_ignores_are_flagged(tiny_tokenizer):
    # SmolLM2's ChatML template has no tools section: the glaive schemas would silently vanish from training.
    r = prepare_dataset(str(shared_file("llamafactory/glaive_toolcall_en_demo.json")), check=True,
                        tokenizer=tiny_tokenizer, max_length=2048, console=quiet)
    assert r.report["warnings"]["tools_not_rendered"] > 100
