"""Every format, alias and validation rule of tunelab.data.formats, on small hand-written records."""

from __future__ import annotations

from collections import Counter

import pytest

from tunelab.data.formats import Invalid, normalize


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def sg(*turns, **extra):
    return {"conversations": [{"from": f, "value": v} for f, v in turns], **extra}


def rejected(rec, **kw) -> Invalid:
    with pytest.raises(Invalid) as e:
        normalize(rec, **kw)
    return e.value


# ---------------------------------------------------------------- Alpaca


def test_alpaca_minimal():
    c = normalize({"instruction": "Say hi", "input": "", "output": "hi"})
    assert c.format == "alpaca" and c.messages == msgs(("user", "Say hi"), ("assistant", "hi")) and c.tools is None


def test_alpaca_input_system_and_history():
    c = normalize({"instruction": "Translate", "input": "chat", "output": "cat", "system": "Be brief.",
                   "history": [["hello", "hi"], ["again", "hi again"]]})
    assert c.messages == msgs(("system", "Be brief."), ("user", "hello"), ("assistant", "hi"), ("user", "again"),
                              ("assistant", "hi again"), ("user", "Translate\n\nchat"), ("assistant", "cat"))


def test_alpaca_input_only_and_history_as_json_string():
    notes = Counter()
    c = normalize({"instruction": "", "input": "2+2?", "output": "4", "history": '[["a", "b"]]'}, notes=notes)
    assert c.messages[-2:] == msgs(("user", "2+2?"), ("assistant", "4")) and len(c.messages) == 4
    assert notes["history parsed from a JSON string"] == 1


@pytest.mark.parametrize("rec,category,reason", [
    ({"instruction": "q"}, "missing_field", "missing field 'output'"),
    ({"instruction": "q", "output": "   "}, "empty_field", "field 'output' is empty"),
    ({"instruction": "q", "output": None}, "missing_field", "field 'output' is null"),
    ({"instruction": "", "input": "", "output": "a"}, "empty_field", "field 'instruction' is empty"),
    ({"instruction": ["q"], "output": "a"}, "wrong_type", "field 'instruction' must be text, got a list"),
    ({"instruction": "q", "output": {"a": 1}}, "wrong_type", "field 'output' must be text, got an object"),
    ({"instruction": "q", "output": "a", "history": [["only one"]]}, "wrong_type", "history item 1 must be"),
    ({"instruction": "q", "output": "a", "history": "nope"}, "wrong_type", "'history' must be a list"),
    ({"instruction": "q", "output": "a", "history": [["", "x"]]}, "empty_field", "history item 1 has an empty prompt"),
])
def test_alpaca_rejections(rec, category, reason):
    e = rejected(rec)
    assert e.category == category and reason in e.reason


def test_numbers_become_text_and_are_counted():
    notes = Counter()
    c = normalize({"instruction": "2+2", "output": 4}, notes=notes)
    assert c.messages[1]["content"] == "4" and notes["number in field 'output' → text"] == 1


def test_whitespace_trim_and_crlf_are_counted():
    notes = Counter()
    c = normalize({"instruction": "  q \r\n", "output": "line1\r\nline2"}, notes=notes)
    assert c.messages == msgs(("user", "q"), ("assistant", "line1\nline2"))
    assert notes["whitespace trimmed"] == 1 and notes["CRLF inside text → LF"] == 2


# ---------------------------------------------------------------- ShareGPT and role aliases


@pytest.mark.parametrize("user", ["human", "user", "prompter", "Human"])
@pytest.mark.parametrize("assistant", ["gpt", "assistant", "chatgpt", "bing", "bard", "model"])
def test_sharegpt_role_aliases(user, assistant):
    notes = Counter()
    c = normalize(sg((user, "hi"), (assistant, "hello")), notes=notes)
    assert c.format == "sharegpt" and c.messages == msgs(("user", "hi"), ("assistant", "hello"))
    assert sum(notes.values()) == (user != "user") + (assistant != "assistant")


def test_sharegpt_tools_system_and_tool_turns():
    notes = Counter()
    rec = sg(("human", "weather?"), ("function_call", '{"name": "w", "arguments": {}}'),
             ("observation", '{"t": 20}'), ("gpt", "20 degrees"),
             system="You can call tools.", tools='[{"name": "w", "parameters": {}}]')
    c = normalize(rec, notes=notes)
    assert [m["role"] for m in c.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert c.tools == [{"name": "w", "parameters": {}}] and not c.warnings
    assert notes["tools parsed from a JSON string"] == 1 and notes["role 'observation' → tool"] == 1


@pytest.mark.parametrize("role_key,text_key", [("role", "content"), ("role", "text"), ("role", "value"),
                                               ("from", "content")])
def test_sharegpt_turn_key_variants(role_key, text_key):
    rec = {"conversations": [{role_key: "user", text_key: "a"}, {role_key: "assistant", text_key: "b"}]}
    assert normalize(rec).messages == msgs(("user", "a"), ("assistant", "b"))


def test_unknown_role_is_rejected_with_its_name():
    e = rejected(sg(("human", "a"), ("narrator", "b")))
    assert e.category == "unknown_role" and "turn 2 has an unknown role 'narrator'" in e.reason


def test_turn_problems_are_located():
    assert "turn 2 (assistant) is empty" in rejected(sg(("human", "a"), ("gpt", " "))).reason
    assert "turn 1 has no role" in rejected({"conversations": [{"value": "x"}]}).reason
    assert "turn 2 must be an object" in rejected({"conversations": [{"from": "human", "value": "a"}, "b"]}).reason
    assert "'conversations' must be a list" in rejected({"conversations": {"from": "human"}}).reason
    assert "got a list" in rejected(sg(("human", "a"), ("gpt", "b"), tools=["x"])).reason


# ---------------------------------------------------------------- OpenAI messages, v1 blocks


def test_openai_messages_with_system_tool_and_tool_calls():
    rec = {"messages": [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "1", "content": "42"}, {"role": "assistant", "content": "it is 42"}]}
    c = normalize(rec)
    assert c.format == "openai" and not c.warnings
    assert c.messages[2] == {"role": "assistant", "content": '{"name": "f", "arguments": {"x": 1}}'}
    assert [m["role"] for m in c.messages] == ["system", "user", "assistant", "tool", "assistant"]


def test_v1_content_blocks_reasoning_and_tool_call():
    rec = {"messages": [
        {"role": "user", "content": [{"type": "text", "value": "q"}], "loss_weight": 0.0},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "think"},
                                          {"type": "tool_call", "value": '{"name": "f"}'}]},
        {"role": "tool", "content": [{"type": "text", "value": "r"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "done"}]}]}
    c = normalize(rec)
    assert c.messages[1]["content"] == '<think>\nthink\n</think>\n{"name": "f"}' and not c.warnings


def test_image_blocks_are_rejected():
    rec = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                        {"role": "assistant", "content": "a"}]}
    assert "type 'image_url' is not supported" in rejected(rec).reason


# ---------------------------------------------------------------- order rules


@pytest.mark.parametrize("turns,reason", [
    ([("gpt", "a"), ("human", "b"), ("gpt", "c")], "starts with the assistant (turn 1)"),
    ([("system", "s"), ("gpt", "a")], "starts with the assistant (turn 2)"),
    ([("human", "a"), ("human", "b"), ("gpt", "c")], "two user turns in a row (turns 1 and 2)"),
    ([("human", "a"), ("gpt", "b"), ("gpt", "c")], "two assistant turns in a row (turns 2 and 3)"),
    ([("human", "a"), ("gpt", "b"), ("human", "c")], "ends without an assistant answer (the last turn is the user)"),
    ([("human", "a"), ("system", "s"), ("gpt", "b")], "system turn in the middle of the conversation (turn 2)"),
    ([("human", "a"), ("observation", "r"), ("gpt", "b")], "a tool result (turn 2) follows the user"),
    ([("observation", "r"), ("gpt", "b")], "starts with the tool"),
    ([], "has no turns"),
])
def test_order_rules(turns, reason):
    e = rejected(sg(*turns))
    assert e.category == "order" and reason in e.reason


def test_tool_result_after_plain_assistant_is_only_a_warning():
    # glaive_toolcall_zh_demo #198 and #294: the call is written as text inside the gpt turn.
    c = normalize(sg(("human", "a"), ("gpt", "calling f"), ("observation", "r"), ("gpt", "b")))
    assert [w[0] for w in c.warnings] == ["tool_result_without_call"]


# ---------------------------------------------------------------- detection, forcing, column map


def test_unknown_record_and_pretraining_text_have_reasons():
    e = rejected({"question_id": 1, "turns": ["q"]})
    assert e.category == "unknown_format" and "found keys: question_id, turns" in e.reason and "--map" in e.reason
    assert "pretraining text" in rejected({"text": "web page"}).reason
    assert "must be a JSON object, got a list" in rejected([1, 2]).reason


def test_forced_format_mismatch_is_rejected():
    assert rejected(sg(("human", "a"), ("gpt", "b")), fmt="alpaca").reason == "missing field 'instruction'"
    assert rejected({"instruction": "q", "output": "a"}, fmt="sharegpt").reason.startswith(
        "missing field 'conversations'")


def test_column_map_for_custom_names():
    rec = {"question": "Q", "answer": "A", "instruction": "ignored?"}
    c = normalize(rec, column_map={"instruction": "question", "output": "answer"})
    assert c.messages == msgs(("user", "Q"), ("assistant", "A"))
    turns = {"dialog": [{"speaker": "user", "utterance": "hi"}, {"speaker": "assistant", "utterance": "yo"}]}
    c = normalize(turns, column_map={"messages": "dialog", "role": "speaker", "content": "utterance"})
    assert c.messages == msgs(("user", "hi"), ("assistant", "yo"))


def test_system_prompt_added_only_where_missing():
    notes = Counter()
    c = normalize({"instruction": "q", "output": "a"}, system_prompt="Be kind.", notes=notes)
    assert c.messages[0] == {"role": "system", "content": "Be kind."} and notes["system prompt added"] == 1
    c = normalize({"instruction": "q", "output": "a", "system": "Own."}, system_prompt="Be kind.")
    assert c.messages[0]["content"] == "Own."


@pytest.mark.parametrize("rec", [
    sg(("human", "hi"), ("gpt", "woof"), system="You are a dog."),
    {"system": "You are a dog.", "messages": msgs(("user", "hi"), ("assistant", "woof"))},
])
def test_a_system_field_is_the_first_turn_in_every_format(rec):
    assert normalize(rec).messages == msgs(("system", "You are a dog."), ("user", "hi"), ("assistant", "woof"))


@pytest.mark.parametrize("rec", [
    sg(("system", "Be brief."), ("human", "hi"), ("gpt", "arr"), system="You are a pirate."),
    {"system": "You are a cat.", "messages": msgs(("system", "Be brief."), ("user", "hi"), ("assistant", "meow"))},
])
def test_a_system_field_beside_a_system_turn_is_ambiguous_not_dropped(rec):
    e = rejected(rec)
    assert e.category == "ambiguous_prompt" and "both a 'system' field and a system turn" in e.reason


def test_a_turn_weight_of_0_masks_an_assistant_turn_and_is_counted():
    notes = Counter()
    rec = {"messages": [{"role": "user", "content": "rude?", "loss_weight": 0.0},
                        {"role": "assistant", "content": "You idiot.", "loss_weight": 0.0},
                        {"role": "user", "content": "polite?", "loss_weight": 0},
                        {"role": "assistant", "content": "Sorry.", "loss_weight": 1.0}]}
    assert [m.get("train", True) for m in normalize(rec, notes=notes).messages] == [True, False, True, True]
    c = normalize(sg(("human", "hi"), ("gpt", "bad"), ("human", "again"), ("gpt", "good"), notes=notes))
    assert "train" not in c.messages[1]
    c = normalize({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "bad", "weight": 0},
                                     {"from": "human", "value": "again"}, {"from": "gpt", "value": "good"}]},
                  notes=notes)
    assert c.messages[1] == {"role": "assistant", "content": "bad", "train": False} and "train" not in c.messages[3]
    assert notes["assistant turn with weight 0 → not trained"] == 2


@pytest.mark.parametrize("turn,category,reason", [
    ({"role": "assistant", "loss_weight": 0.5}, "wrong_type", "turn 2 (assistant): 'loss_weight' must be 0"),
    ({"role": "assistant", "weight": "0"}, "wrong_type", "turn 2 (assistant): 'weight' must be 0 (not trained) or 1"),
    ({"role": "assistant", "weight": True}, "wrong_type", "'weight' must be 0"),
    ({"role": "assistant", "weight": float("nan")}, "wrong_type", "'weight' must be 0"),
    ({"role": "assistant", "weight": 0}, "nothing_to_train", "every assistant turn has weight 0"),
])
def test_turn_weights_that_cannot_be_honoured_are_rejected(turn, category, reason):
    e = rejected({"messages": [{"role": "user", "content": "q"}, {"content": "a", **turn}]})
    assert e.category == category and reason in e.reason


def test_a_weight_of_1_on_a_turn_tunelab_never_trains_is_rejected():
    e = rejected({"conversations": [{"from": "human", "value": "q", "weight": 1}, {"from": "gpt", "value": "a"}]})
    assert e.category == "unsupported_weight" and "turn 1 (user): 'weight' 1 asks to train a user turn" in e.reason


# ---------------------------------------------------------------- preference data


def test_dpo_record_uses_the_chosen_answer():
    rec = {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "good"},
           "rejected": {"from": "gpt", "value": "bad"}}
    c = normalize(rec)
    assert c.messages == msgs(("user", "q"), ("assistant", "good"))
    assert [w[0] for w in c.warnings] == ["preference_chosen_used"]


def test_v1_dpo_record_uses_chosen_messages():
    rec = {"chosen_messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
           "rejected_messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]}
    assert normalize(rec).messages == msgs(("user", "q"), ("assistant", "good"))


@pytest.mark.parametrize("rec", [
    {"instruction": "q", "input": "", "chosen": "good", "rejected": "bad"},
    {"messages": [{"role": "user", "content": "q"}], "chosen": {"role": "assistant", "content": "good"},
     "rejected": {"role": "assistant", "content": "bad"}},
    {"prompt": "q", "chosen": "good", "rejected": "bad"},
    {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "good"}],
     "rejected": [{"role": "assistant", "content": "bad"}]},
    {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
     "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]},
])
def test_every_dpo_form_the_dpo_stage_reads_trains_its_chosen_answer_in_sft(rec):
    """docs/data.md: a DPO record in an SFT run trains its prompt and chosen answer. Only ShareGPT pairs and
    chosen_messages did; these forms, which --stage dpo reads, were rejected as 'missing field output', 'ends
    without an assistant answer' or 'not a recognised record', never pointing at the preference stages."""
    c = normalize(rec)
    assert c.messages == msgs(("user", "q"), ("assistant", "good"))
    assert [w[0] for w in c.warnings] == ["preference_chosen_used"]


def test_a_trl_kto_record_in_sft_is_kept_when_labelled_true():
    assert normalize({"prompt": "q", "completion": "a", "label": True}).messages == msgs(("user", "q"),
                                                                                        ("assistant", "a"))
    e = rejected({"prompt": "q", "completion": "a", "label": False})
    assert e.category == "preference_rejected" and "training.stage=kto" in e.reason


def test_an_sft_record_with_preference_like_columns_keeps_its_own_answer():
    """Only a record without an answer of its own is read as a preference record: an Alpaca `output` or a
    conversation ending in an assistant turn is trained as before, whatever chosen/rejected/label columns sit beside
    it, and a `label` that is not true/false is not a KTO label."""
    answered = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert normalize({"instruction": "q", "output": "a", "chosen": "A", "rejected": "B"}).messages == \
        msgs(("user", "q"), ("assistant", "a"))
    assert normalize({**answered, "chosen": "A", "rejected": "B"}).messages == msgs(("user", "q"), ("assistant", "a"))
    assert normalize({**answered, "completion": "x", "label": True}).messages == msgs(("user", "q"),
                                                                                      ("assistant", "a"))
    for label in ("positive", 1):
        assert rejected({"prompt": "q", "completion": "a", "label": label}).category == "unknown_format"


def test_kto_false_is_rejected_true_is_kept():
    base = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert rejected({**base, "label": False}).category == "preference_rejected"
    assert [w[0] for w in normalize({**base, "label": True}).warnings] == ["kto_label_true_kept"]


@pytest.mark.parametrize("fields,shown", [
    ({"kto_tag": False}, "labelled false"),  # LLaMA-Factory's KTO key, read by the kto stage too
    ({"label": 0}, "'label' is 0, not true/false"),
    ({"label": "false"}, "'label' is 'false', not true/false"),  # a CSV cell
    ({"label": 1}, "'label' is 1, not true/false"),  # the kto stage refuses it as well: no guessing
    ({"kto_tag": "yes"}, "'kto_tag' is 'yes', not true/false"),
    ({"label": False, "kto_tag": True}, "labelled false"),  # `label` first, as the kto stage reads it
])
@pytest.mark.parametrize("base", [
    {"messages": [{"role": "user", "content": "Is the earth flat?"}, {"role": "assistant", "content": "Yes."}]},
    {"instruction": "Is the earth flat?", "output": "Yes."},
])
def test_kto_records_not_labelled_true_are_rejected_in_sft(base, fields, shown):
    e = rejected({**base, **fields})
    assert e.category == "preference_rejected" and shown in e.reason and "training.stage=kto" in e.reason


def test_kto_tag_true_is_kept_and_a_label_that_is_no_kto_label_is_not_read():
    base = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert [w[0] for w in normalize({**base, "kto_tag": True}).warnings] == ["kto_label_true_kept"]
    for label in ("math", 3, None):
        assert normalize({**base, "label": label}).warnings == []


def test_placeholders_warn():
    c = normalize({"instruction": "who?", "output": "I am {{name}} by {{ author }}."})
    assert [w[0] for w in c.warnings] == ["template_placeholders"]
