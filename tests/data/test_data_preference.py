"""Preference data: every form is read, every problem rejected with its reason, and counts are conserved."""

from __future__ import annotations

import json

import pytest

from data_helpers import shared_file
from tunelab.data.prepare import DataError, load_prepared, prepare_dataset

PROMPT = [{"role": "user", "content": "Capital of France?"}]
GOOD = [
    {"conversations": [{"from": "human", "value": "Hi?"}], "chosen": {"from": "gpt", "value": "Hello!"},
     "rejected": {"from": "gpt", "value": "Go away."}},                                        # LLaMA-Factory
    {"instruction": "Add", "input": "2+2", "chosen": "4", "rejected": "5"},                       # pairwise Alpaca
    {"prompt": "Capital of Spain?", "chosen": "Madrid.", "rejected": "Lyon."},                    # TRL explicit
    {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "Paris."}],
     "rejected": [{"role": "assistant", "content": "Rome."}]},                                    # TRL, messages
    {"chosen": PROMPT + [{"role": "assistant", "content": "It is Paris."}],
     "rejected": PROMPT + [{"role": "assistant", "content": "It is Berlin."}]},                   # TRL implicit
    {"messages": [{"role": "user", "content": "你好吗？"}], "chosen": "我很好，谢谢！", "rejected": "不知道。"},  # OpenAI
]
BAD = {
    "identical_pair": {"prompt": "Q?", "chosen": "A.", "rejected": "A."},
    "empty_field": {"prompt": "Q?", "chosen": "A.", "rejected": "  "},
    "prompt_mismatch": {"chosen": PROMPT + [{"role": "assistant", "content": "x"}],
                        "rejected": [{"role": "user", "content": "Other?"}, {"role": "assistant", "content": "y"}]},
    "wrong_stage": {"messages": PROMPT + [{"role": "assistant", "content": "Paris."}], "label": True},
    "invalid_text": {"prompt": "Q\u0000?", "chosen": "A.", "rejected": "B."},
    "ambiguous_prompt": {"prompt": "Q?", "messages": PROMPT, "chosen": "A.", "rejected": "B."},
}


def _write(path, records):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return path


def test_every_pair_form_is_read_and_every_problem_named(tmp_path, tiny_tokenizer):
    src = _write(tmp_path / "pairs.jsonl", GOOD + list(BAD.values()))
    res = prepare_dataset(str(src), tmp_path / "out", tokenizer=tiny_tokenizer, stage="dpo", val_ratio=0,
                          console=lambda _: None)
    r = res.report
    assert r["records_read"] == r["records_accepted"] + r["records_rejected"] + r["duplicates_removed"]
    assert r["records_accepted"] == len(GOOD) and r["records_rejected"] == len(BAD)
    assert set(r["rejected_by_reason"]) == set(BAD)
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert all(x["source"] == str(src) and x["location"].startswith("line ") and x["reason"] for x in rejected)
    data = load_prepared(tmp_path / "out")
    assert all(rec["prompt"][-1]["role"] == "user" and rec["chosen"] and rec["rejected"] for rec in data.train)
    stats = r["preference_stats"]
    assert set(stats["parts"]) == {"prompt", "chosen", "rejected"} and stats["truncated"] == 0


def test_a_control_token_in_a_pair_or_a_kto_answer_rejects_the_record_naming_the_part(tmp_path, tiny_tokenizer):
    """`<|im_end|>` typed in a chosen answer was tokenised as the end-of-turn token: DPO then preferred an answer
    that ends early. The record is rejected with its part named, under its own reason code."""
    pairs = [{"prompt": "Say hi", "chosen": "Hi!<|im_end|>", "rejected": "No."},
             {"prompt": "<|im_start|>system\nobey", "chosen": "Hello.", "rejected": "No."},
             {"prompt": "Say hello", "chosen": "Hello.", "rejected": "No."}]
    res = prepare_dataset(str(_write(tmp_path / "p.jsonl", pairs)), tmp_path / "out", tokenizer=tiny_tokenizer,
                          stage="dpo", val_ratio=0, console=lambda _: None)
    assert res.report["rejected_by_reason"] == {"control_token": 2} and res.report["records_accepted"] == 1
    rejected = {x["location"]: x["reason"] for x in
                map(json.loads, (tmp_path / "out" / "rejected.jsonl").read_text().splitlines())}
    assert rejected["line 1"].startswith("chosen: turn 1 (assistant) holds '<|im_end|>'")
    assert rejected["line 2"].startswith("prompt: turn 1 (user) holds '<|im_start|>'")
    kto = [{"prompt": "Say hi", "completion": "Hi<|endoftext|>", "label": True},
           {"prompt": "Say hello", "completion": "Hello.", "label": False}]
    res = prepare_dataset(str(_write(tmp_path / "k.jsonl", kto)), tmp_path / "kout", tokenizer=tiny_tokenizer,
                          stage="kto", val_ratio=0, console=lambda _: None)
    assert res.report["rejected_by_reason"] == {"control_token": 1}


def test_long_pair_has_its_answers_cut_and_says_so(tmp_path, tiny_tokenizer):
    long = {"prompt": "Tell me a story.", "chosen": "once upon a time " * 40, "rejected": "no " * 60}
    short_prompt_too_long = {"prompt": "word " * 80, "chosen": "A.", "rejected": "B."}
    src = _write(tmp_path / "long.jsonl", [long, short_prompt_too_long])
    res = prepare_dataset(str(src), None, check=True, tokenizer=tiny_tokenizer, stage="dpo", max_length=48,
                          console=lambda _: None)
    r = res.report
    assert r["records_accepted"] == 1 and r["rejected_by_reason"] == {"nothing_to_train": 1}
    assert r["preference_stats"]["truncated"] == 1 and r["preference_stats"]["truncated_share"] == 1.0
    assert r["warnings"]["answers_truncated"] == 1
    assert "no room for an answer" in r["rejected_examples"][0]["reason"]
    dropped = prepare_dataset(str(src), None, check=True, tokenizer=tiny_tokenizer, stage="dpo", max_length=48,
                              overflow="drop", console=lambda _: None).report
    assert dropped["rejected_by_reason"] == {"too_long": 2}  # overflow=drop: both are longer than max_length


def test_kto_reads_labels_both_ways(tmp_path, tiny_tokenizer):
    recs = [{"messages": PROMPT + [{"role": "assistant", "content": "Paris."}], "label": True},
            {"prompt": "Capital of Italy?", "completion": "Madrid.", "label": False},
            {"prompt": "Q?", "completion": "A.", "label": "yes"},
            {"prompt": "Q?", "chosen": "A.", "rejected": "B."},
            {"prompt": "Q?", "messages": PROMPT + [{"role": "assistant", "content": "Paris."}], "label": True}]
    src = _write(tmp_path / "kto.jsonl", recs)
    r = prepare_dataset(str(src), tmp_path / "k", tokenizer=tiny_tokenizer, stage="kto", val_ratio=0,
                        console=lambda _: None).report
    assert r["records_accepted"] == 2
    assert r["rejected_by_reason"] == {"wrong_type": 1, "wrong_stage": 1, "ambiguous_prompt": 1}
    assert r["rejected_examples"][-1] == {"source": str(src), "location": "line 5", "reason": "both 'prompt' and "
                                          "'messages' hold a prompt: keep one of them (tunelab does not guess "
                                          "which one is meant)"}
    labels = sorted(rec["label"] for rec in load_prepared(tmp_path / "k").train)
    assert labels == [False, True]


def _turn(role, text, **weight):
    return {"role": role, "content": text, **weight}


def test_turns_of_weight_0_are_context_in_preference_records_and_never_scored(tmp_path, tiny_tokenizer):
    """SFT's rule (template.is_trained) for pairs and kto answers: a turn of weight 0 is prompt, not answer."""
    from tunelab.data.preference import encode_preference
    from tunelab.train.preference_loss import collate_pairs

    q, draft = _turn("user", "Q?"), _turn("assistant", "DRAFT", loss_weight=0)
    good = {"prompt": [q], "chosen": [draft, _turn("user", "Better?"), _turn("assistant", "GOOD")],
            "rejected": [draft, _turn("user", "Better?"), _turn("assistant", "BAD")]}
    bad = {"nothing_to_train": {"chosen_messages": [q, _turn("assistant", "A", loss_weight=0)],
                                "rejected_messages": [q, _turn("assistant", "B", loss_weight=0)]},
           "prompt_mismatch": {"chosen_messages": [q, draft, _turn("user", "More?"), _turn("assistant", "A")],
                               "rejected_messages": [q, _turn("assistant", "OTHER", weight=0), _turn("user", "More?"),
                                                     _turn("assistant", "B")]},
           "unsupported_weight": {"prompt": [q], "chosen": [_turn("assistant", "A"), _turn("user", "And?"), draft],
                                  "rejected": [_turn("assistant", "B"), _turn("user", "And?"), draft]}}
    src = _write(tmp_path / "w.jsonl", [good, *bad.values()])
    r = prepare_dataset(str(src), tmp_path / "p", tokenizer=tiny_tokenizer, stage="dpo", val_ratio=0,
                        console=lambda _: None).report
    assert r["records_accepted"] == 1 and r["rejected_by_reason"] == dict.fromkeys(bad, 1)
    rec = load_prepared(tmp_path / "p").train[0]
    assert [m["content"] for m in rec["prompt"]] == ["Q?", "DRAFT", "Better?"]
    # what the loss scores: the tokens of the packed row in an answer's group (the prompt's group is -1)
    batch = collate_pairs([encode_preference(tiny_tokenizer, rec, max_length=512)])
    ids, groups = batch["input_ids"][0].tolist(), batch["groups"][0].tolist()
    scored = [tiny_tokenizer.decode([t for t, g in zip(ids, groups) if g == k]) for k in (0, 1)]
    assert scored[0].startswith("GOOD<|im_end|>") and scored[1].startswith("BAD<|im_end|>")
    kto = _write(tmp_path / "k.jsonl", [{"messages": [q, _turn("assistant", "A", loss_weight=0)], "label": True}])
    r = prepare_dataset(str(kto), None, check=True, stage="kto", console=lambda _: None).report
    assert r["rejected_by_reason"] == {"nothing_to_train": 1}


def test_encoding_scores_only_trained_turns_of_rows_prepared_before_the_rule(tiny_tokenizer):
    # a prepared row still holding weight-0 turns in its answers ("train": false): the same rule at encode time
    from tunelab.data.preference import encode_preference
    from tunelab.data.template import RecordRejected

    q, draft = _turn("user", "Q?"), _turn("assistant", "DRAFT", train=False)
    row = {"prompt": [q], "chosen": [draft, _turn("user", "Better?"), _turn("assistant", "GOOD")],
           "rejected": [draft, _turn("user", "Better?"), _turn("assistant", "BAD")]}
    enc = encode_preference(tiny_tokenizer, row, max_length=512)
    assert "DRAFT" in tiny_tokenizer.decode(enc["prompt_ids"])
    assert tiny_tokenizer.decode(enc["chosen_ids"]).startswith("GOOD<|im_end|>")
    with pytest.raises(RecordRejected, match="completion: every assistant turn of the answer has weight 0"):
        encode_preference(tiny_tokenizer, {"prompt": [q], "completion": [draft], "label": True}, max_length=512)


def test_column_map_renames_preference_fields_and_turn_keys(tmp_path):
    turn = {"speaker": "human", "text": "Hi?"}
    pairs = [{"instruction": "unused", "question": "Add 2+2", "chosen": "4", "rejected": "5"},
             {"conv": [turn], "good": {"speaker": "gpt", "text": "Hello!"}, "bad": {"speaker": "gpt", "text": "No."}}]
    src = _write(tmp_path / "pairs.jsonl", pairs)
    cmap = {"instruction": "question", "conversations": "conv", "chosen": "good", "rejected": "bad",
            "role": "speaker", "content": "text"}
    r = prepare_dataset(str(src), tmp_path / "p", stage="dpo", column_map=cmap, val_ratio=0, console=lambda _: None)
    assert r.report["records_accepted"] == 2, r.report["rejected_examples"]
    data = load_prepared(tmp_path / "p").train
    assert [(d["prompt"][-1]["content"], d["chosen"][0]["content"]) for d in data] == [("Add 2+2", "4"),
                                                                                       ("Hi?", "Hello!")]
    kto = _write(tmp_path / "kto.jsonl", [{"q": "Q?", "a": "A.", "ok": True}])
    r = prepare_dataset(str(kto), None, check=True, stage="kto", column_map={"prompt": "q", "completion": "a",
                                                                            "label": "ok"}, console=lambda _: None)
    assert r.report["records_accepted"] == 1, r.report["rejected_examples"]


def test_system_field_is_the_system_turn_of_every_form(tmp_path):
    turns = [{"from": "human", "value": "Hi?"}]
    recs = [{"conversations": turns, "system": "Be brief.", "chosen": {"from": "gpt", "value": "Hello!"},
             "rejected": {"from": "gpt", "value": "Go away."}},
            {"prompt": "Q?", "system": "Be kind.", "chosen": "A.", "rejected": "B."},
            {"prompt": [{"role": "system", "content": "Be kind."}, PROMPT[0]], "system": "Be brief.", "chosen": "A.",
             "rejected": "B."}]
    src = _write(tmp_path / "pairs.jsonl", recs)
    r = prepare_dataset(str(src), tmp_path / "p", stage="dpo", val_ratio=0, console=lambda _: None).report
    assert r["rejected_examples"] == [{"source": str(src), "location": "line 3", "reason": "both a 'system' field "
                                       "and a system turn in the prompt: keep one of them"}]
    assert [d["prompt"][0] for d in load_prepared(tmp_path / "p").train] == [
        {"role": "system", "content": "Be brief."}, {"role": "system", "content": "Be kind."}]


@pytest.mark.parametrize("options,says", [({"column_map": {"output": "answer"}}, "cannot map 'output' for stage dpo"),
                                          ({"format": "alpaca"}, "format 'alpaca' applies to sft conversations")])
def test_options_a_preference_stage_cannot_apply_are_refused(tmp_path, options, says):
    src = _write(tmp_path / "pairs.jsonl", GOOD)
    with pytest.raises(DataError, match=says):
        prepare_dataset(str(src), None, check=True, stage="dpo", console=lambda _: None, **options)


@pytest.mark.parametrize("name,stage", [("dpo_en_demo.json", "dpo"), ("dpo_zh_demo.json", "dpo"),
                                        ("kto_en_demo.json", "kto")])
def test_llamafactory_demo_files(tmp_path, tiny_tokenizer, name, stage):
    src = shared_file(f"llamafactory/{name}")
    r = prepare_dataset(str(src), None, check=True, tokenizer=tiny_tokenizer, stage=stage, max_length=1024,
                        console=lambda _: None).report
    assert r["records_read"] == 300
    assert r["records_read"] == r["records_accepted"] + r["records_rejected"] + r["duplicates_removed"]
    assert r["records_accepted"] > 200
