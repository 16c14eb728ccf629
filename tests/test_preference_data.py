"""Preference records off the happy path: every record accepted or rejected with a reason that names the problem."""

from __future__ import annotations

import json

import pytest

from tunelab.data.formats import Invalid
from tunelab.data.preference import normalize_preference
from tunelab.data.prepare import prepare_dataset

Q = {"role": "user", "content": "Capital of France?"}
A = {"role": "assistant", "content": "Paris."}


@pytest.mark.parametrize("rec", [
    {"chosen": [Q], "rejected": [Q, A]},                                                     # TRL implicit
    {"chosen_messages": [Q], "rejected_messages": [Q, A]},                                   # LLaMA-Factory v1
    {"conversations": [{"from": "human", "value": "Hi?"}], "chosen": {"from": "human", "value": "Hello?"},
     "rejected": {"from": "gpt", "value": "Go away."}},                                      # answer by the user
])
def test_a_side_without_an_answer_is_named_as_such_not_as_weight_0(rec):
    """A prompt-only side (or an answer given by the user) was rejected as "every assistant turn of the answer has
    weight 0 (loss_weight / weight)": the record has no weights, and no assistant turn on that side."""
    with pytest.raises(Invalid, match=r"chosen holds no assistant answer \((the record is a prompt only|its turns: "
                                      r"user)\): nothing to score") as e:
        normalize_preference(rec, "dpo")
    assert e.value.category == "empty_field"


def test_kto_label_and_kto_tag_that_disagree_are_rejected_not_one_of_them_picked():
    rec = {"messages": [Q, A], "label": False, "kto_tag": True}
    with pytest.raises(Invalid, match="'label' and 'kto_tag' disagree") as e:
        normalize_preference(rec, "kto")
    assert e.value.category == "ambiguous_label"
    assert normalize_preference({**rec, "kto_tag": False}, "kto").label is False
    with pytest.raises(Invalid, match="'kto_tag' must be true or false, got str"):
        normalize_preference({**rec, "kto_tag": "true"}, "kto")


@pytest.mark.parametrize("extra", [{"rejected": "Rome."}, {"chosen": "Paris.", "rejected": "Rome."}])
def test_kto_record_that_also_holds_a_pair_is_rejected(extra):
    """A labelled completion with a `rejected` answer beside it trained the completion and ignored the rest."""
    with pytest.raises(Invalid, match="a labelled record that also holds '(chosen|rejected)'") as e:
        normalize_preference({"prompt": "Capital of France?", "completion": "Paris.", "label": True, **extra}, "kto")
    assert e.value.category == "wrong_stage"


def test_every_record_of_a_mixed_kto_file_is_counted_with_its_reason(tmp_path):
    records = [{"messages": [Q, A], "label": True}, {"messages": [Q, A], "label": "yes"},
               {"messages": [Q], "label": True}, {"messages": [Q, A], "label": True, "kto_tag": False},
               {"prompt": "Q?", "chosen": "a", "rejected": "b"}, {"prompt": "Q?", "completion": "x", "label": False,
                                                                  "rejected": "y"}]
    src = tmp_path / "k.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    r = prepare_dataset(str(src), None, check=True, stage="kto", console=lambda *_: None).report
    assert r["records_read"] == 6 and r["records_accepted"] == 1
    assert r["rejected_by_reason"] == {"wrong_type": 1, "order": 1, "ambiguous_label": 1, "wrong_stage": 2}


def test_kto_step_or_eval_without_one_kind_of_answer_logs_no_mean_for_it():
    """A kto step (or held-out set) with only desirable answers logged rewards/rejected 0.0 and a margin equal to
    rewards/chosen: a made-up number in every curve (TRL logs a kind only when the batch holds one)."""
    from tunelab.evaluate.preference import _kto_summary
    from tunelab.train.preference import reward_metrics

    only_good = {"rewards/chosen": 0.6, "rewards/rejected": 0.0, "count/chosen": 2.0, "count/rejected": 0.0, "kl": 0.2}
    assert reward_metrics(only_good, 2) == {"rewards/chosen": 0.3, "kl": 0.1}
    both = {**only_good, "rewards/rejected": -0.4, "count/rejected": 1.0}
    assert reward_metrics(both, 3) == pytest.approx({"rewards/chosen": 0.3, "rewards/rejected": -0.4,
                                                     "rewards/margin": 0.7, "kl": 0.2 / 3})
    rows = [{"label": True, "logp": -3.0, "mean_logp": -1.0, "reward": 0.2, "kl": 0.1},
            {"label": True, "logp": -6.0, "mean_logp": -2.0, "reward": -0.1, "kl": 0.1}]
    out = _kto_summary(rows)
    assert out["logps/chosen"] == -1.5 and out["rewards/chosen"] == pytest.approx(0.05)
    assert not {"logps/rejected", "rewards/rejected", "rewards/margin"} & set(out)
    assert out["undesirable"] == 0 and out["rewards/accuracy"] == 0.5


def test_kto_label_balance_is_said_and_advised_as_trl_does():
    """A kto run said nothing of its labels: a file whose labels were all true (or 9:1) trained without a word."""
    from tunelab.config import PreferenceConfig
    from tunelab.train.preference import kto_balance

    assert kto_balance([True, False] * 5, PreferenceConfig()) == "KTO labels: 5 desirable / 5 undesirable"
    assert kto_balance([True] * 4, PreferenceConfig()).startswith(
        "warning: KTO labels: 4 desirable / 0 undesirable: every answer is desirable")
    line = kto_balance([True] + [False] * 9, PreferenceConfig())
    assert "weighted 0.11 : 1" in line and "desirable_weight between 9.00 and 12.00" in line
    assert kto_balance([True] + [False] * 9, PreferenceConfig(desirable_weight=10)).startswith("KTO labels: 1 ")


def test_token_line_of_a_file_with_no_accepted_record_says_so():
    """It printed "tokens after the chat template (...): ; 0 of 0 (0.0%) had their answers cut"."""
    from tunelab.data.preference import PreferenceStats

    stats = PreferenceStats(512)
    assert PreferenceStats.line(stats.report()) == "tokens after the chat template: none (no record was accepted)"
    stats.add({"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5], "truncated": 0})
    assert PreferenceStats.line(stats.report()).startswith("tokens after the chat template (answers after the "
                                                           "train-time cut): prompt p50 2")
