"""Evaluation: metrics that score unsegmented text, perplexity with training's masking, `tunelab eval`."""

from __future__ import annotations

import json
import math
import re

import pytest

from tunelab.evaluate import EvalError, choose_tokenize, normalize_metrics, score_texts

ZH_REF = "中国的首都是北京，它是一座历史悠久的城市。"
ZH_PRED = "北京是中国的首都，历史很悠久。"


# ---------------------------------------------------------------- text metrics


def test_chinese_reference_does_not_score_zero():
    from rouge_score import rouge_scorer

    # rouge-score's own tokeniser keeps only [a-z0-9]: a Chinese pair scores 0 with it ...
    default = rouge_scorer.RougeScorer(["rougeL"]).score(ZH_REF, ZH_PRED)["rougeL"].fmeasure
    assert default == 0.0
    # ... and sacrebleu's 13a sees one "word" per sentence: BLEU 0 as well.
    import sacrebleu

    assert sacrebleu.corpus_bleu([ZH_PRED], [[ZH_REF]], tokenize="13a").score == 0.0

    s = score_texts([ZH_PRED], [ZH_REF], ["bleu", "chrf", "rouge", "exact_match"])
    assert s.tokenize == "zh"
    assert s.corpus["bleu"] > 0 and s.corpus["chrf"] > 0 and s.corpus["rouge_l"] > 0
    assert s.per_sample[0]["bleu"] > 0 and s.per_sample[0]["rouge_l"] > 0
    assert "Chinese" in s.describe()["bleu_tokenize_reason"]


def test_identical_chinese_answer_is_perfect():
    s = score_texts([ZH_REF], [ZH_REF], ["bleu", "chrf", "rouge", "exact_match"])
    assert s.corpus["bleu"] == pytest.approx(100)
    assert s.corpus["rouge_l"] == pytest.approx(100)
    assert s.corpus["exact_match"] == 100


@pytest.mark.parametrize("refs, expected", [
    (["The cat sat on the mat."], "13a"),
    (["北京是首都", "hello"], "zh"),
    (["わたしはねこがすきです"], "char"),  # kana: not split by sacrebleu's zh tokeniser
    (["สวัสดีครับ"], "char"),
])
def test_tokenizer_choice(refs, expected):
    assert choose_tokenize(refs)[0] == expected


def test_english_scores_match_sacrebleu_and_rouge_defaults():
    import sacrebleu
    from rouge_score import rouge_scorer

    pred, ref = "the cat sat on the mat", "the cat is on the mat"
    s = score_texts([pred], [ref], ["bleu", "rouge"])
    assert s.corpus["bleu"] == pytest.approx(sacrebleu.corpus_bleu([pred], [[ref]]).score)
    default = rouge_scorer.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure
    assert s.corpus["rouge_l"] == pytest.approx(100 * default)


def test_exact_match_is_normalised():
    s = score_texts(["  Paris. ", "北京 是 首都", "Lyon"], ["paris", "北京是首都。", "Paris"], ["exact_match"])
    assert [p["exact_match"] for p in s.per_sample] == [100.0, 100.0, 0.0]
    assert s.corpus["exact_match"] == pytest.approx(200 / 3)


def test_metric_names():
    assert normalize_metrics("perplexity, bleu,rouge_l") == ["perplexity", "bleu", "rouge"]
    with pytest.raises(EvalError, match="unknown metric"):
        normalize_metrics(["bleu", "meteor"])


# ---------------------------------------------------------------- perplexity and evaluate_records

RECORDS = [
    {"messages": [{"role": "user", "content": "Who are you?"},
                  {"role": "assistant", "content": "I am Tuna, a small assistant."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "首都？"},
                  {"role": "assistant", "content": "中国的首都是北京。"}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Say more"},
                  {"role": "assistant", "content": "Hello again, from a longer answer than before."}]},
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from tunelab.model.loading import load_pretrained

    return load_pretrained(str(tiny_model_dir), dtype="fp32")


def test_changes_are_marked_by_the_metrics_direction_only_where_it_is_known():
    """A preference run's falling logps/rejected (the undesirable answers made less likely: the aim) was marked
    "(worse)": every metric not listed counted as higher-is-better."""
    from tunelab.evaluate.report import before_after_rows

    rows = {r[0]: r[3] for r in before_after_rows(
        {"perplexity": 9.0, "bleu": 20.0, "logps/rejected": -30.0, "logps/chosen": -10.0, "some_count": 5},
        {"perplexity": 10.0, "bleu": 25.0, "logps/rejected": -20.0, "logps/chosen": -12.0, "some_count": 4})}
    assert rows["Perplexity"].endswith("(better)") and rows["BLEU"].endswith("(worse)")
    assert rows["logps/rejected"] == "-10 (better)" and rows["logps/chosen"] == "+2 (better)"
    assert rows["some_count"] == "+1"


def test_perplexity_is_token_weighted_exp_of_training_loss(tiny):
    """Independent reference: HF's own loss per record (mean over its trained tokens), weighted by token count."""
    import torch

    from tunelab.data.template import encode_record
    from tunelab.evaluate import evaluate_records

    model, tok = tiny
    total, count = 0.0, 0
    with torch.no_grad():
        for rec in RECORDS:
            enc = encode_record(tok, rec["messages"], max_length=512)
            n = sum(1 for x in enc.labels[1:] if x != -100)
            out = model(input_ids=torch.tensor([enc.input_ids]), labels=torch.tensor([enc.labels]))
            total += float(out.loss) * n
            count += n
    res = evaluate_records(model, tok, RECORDS, ["perplexity"], batch_size=2)
    assert res.metrics["eval_tokens"] == count
    assert res.metrics["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert res.metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    # Batching does not change a token-weighted sum.
    one = evaluate_records(model, tok, RECORDS, ["perplexity"], batch_size=1)
    assert one.metrics["eval_loss"] == pytest.approx(res.metrics["eval_loss"], rel=1e-6)


def test_eval_loss_under_a_token_budget_holds_no_more_than_a_pass_and_gives_the_same_loss(tiny):
    """Training under training.batch_tokens evaluates in padded batches of at most a pass's tokens (one record at
    least): every record once, no batch above the budget unless it is one record, and the same token-weighted
    loss as record-count batches."""
    from tunelab.data.template import encode_record
    from tunelab.model.loss import CausalLMLoss, _eval_batches, autocast_for, eval_loss

    model, tok = tiny
    examples = [vars(encode_record(tok, r["messages"], max_length=512)) for r in RECORDS] * 3
    lengths = sorted(len(e["input_ids"]) for e in examples)
    budget = 2 * lengths[len(lengths) // 2]
    batches = _eval_batches(examples, 4, budget)
    assert sorted(len(e["input_ids"]) for b in batches for e in b) == lengths
    assert all(len(b) <= 4 and (len(b) == 1 or len(b) * max(len(e["input_ids"]) for e in b) <= budget)
               for b in batches)
    assert len(batches) > len(_eval_batches(examples, 4, 0)) == -(-len(examples) // 4)
    loss_fn = CausalLMLoss(model)
    plain, n = eval_loss(loss_fn, examples, 4, tok.pad_token_id, autocast_for("cpu", "fp32"))
    capped, m = eval_loss(loss_fn, examples, 4, tok.pad_token_id, autocast_for("cpu", "fp32"), max_tokens=budget)
    assert m == n and capped == pytest.approx(plain, rel=1e-5)


def test_perplexity_counts_only_assistant_tokens(tiny):
    from tunelab.evaluate import evaluate_records

    model, tok = tiny
    assistant = evaluate_records(model, tok, RECORDS, ["perplexity"])
    everything = evaluate_records(model, tok, RECORDS, ["perplexity"], train_on="all")
    last = evaluate_records(model, tok, RECORDS, ["perplexity"], train_on="last_assistant")
    assert last.metrics["eval_tokens"] < assistant.metrics["eval_tokens"] < everything.metrics["eval_tokens"]


def test_perplexity_with_nothing_to_score_is_an_error_not_nan(tiny):
    """`eval --max-length 1` skipped every record and wrote perplexity NaN over the run's earlier eval result."""
    from tunelab.errors import TunelabError
    from tunelab.evaluate import evaluate_records

    model, tok = tiny
    with pytest.raises(TunelabError, match=f"none of the {len(RECORDS)} records has a token to score at max_length=2"):
        evaluate_records(model, tok, RECORDS, ["perplexity"], max_length=2, overflow="drop")


STRICT = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant', 'system'] %}"
          "{{ raise_exception('Only user, assistant and system roles are supported!') }}{% endif %}"
          "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_records_the_chat_template_refuses_are_set_aside_with_where_and_why(tiny):
    """A template that raises for a record (a tool turn; content 5, a TypeError) ended `tunelab eval` with jinja's
    traceback: such a record is left out of perplexity and generation and listed with its location and reason."""
    import copy

    from tunelab.evaluate import evaluate_records
    from tunelab.evaluate.preference import encode_pairs

    model, tok = tiny
    tok = copy.deepcopy(tok)
    tok.chat_template = STRICT
    user, answer = {"role": "user", "content": "weather?"}, {"role": "assistant", "content": "sunny"}
    tool = [user, {"role": "assistant", "content": "call"}, {"role": "tool", "content": "r"}, answer]
    recs = [dict(r, source="d.jsonl", location=f"line {i}") for i, r in enumerate(
        [RECORDS[0], {"messages": tool}, {"messages": [{**user, "content": 5}, answer]}], 1)]
    res = evaluate_records(model, tok, recs, ["perplexity", "bleu"], max_new_tokens=2)
    assert res.settings["perplexity_records"] == 1 and [p["index"] for p in res.predictions] == [0]
    assert [(r["index"], r["location"]) for r in res.settings["rejected"]] == [(1, "line 2"), (2, "line 3")]
    assert "Only user, assistant and system roles" in res.settings["rejected"][0]["reason"]
    pairs = [{"prompt": r["messages"][:-1], "chosen": [answer], "rejected": [{**answer, "content": "no"}],
              "location": r["location"]} for r in recs]
    encoded, index, rejected = encode_pairs(tok, pairs, 128, "truncate")
    assert index == [0] and [r["location"] for r in rejected] == ["line 2", "line 3"]


def test_generation_metrics_and_predictions(tiny):
    from tunelab.evaluate import evaluate_records

    model, tok = tiny
    res = evaluate_records(model, tok, RECORDS, ["bleu", "chrf", "rouge", "exact_match"], max_new_tokens=4,
                           max_samples=2, batch_size=2)
    assert set(res.metrics) == {"bleu", "chrf", "rouge_l", "exact_match"}
    assert len(res.predictions) == 2
    p = res.predictions[1]
    assert p["reference"] == "中国的首都是北京。" and p["prompt"] == "首都？"
    assert isinstance(p["prediction"], str) and set(p["scores"]) == {"bleu", "chrf", "rouge_l", "exact_match"}
    assert res.settings["tokenizer_choice"]["bleu_tokenize"] == "zh"  # one Chinese reference among the samples


def test_greedy_fallback_is_deterministic_and_batch_independent(tiny):
    from tunelab.evaluate.generation import greedy_generate

    model, tok = tiny
    convs = [r["messages"][:-1] for r in RECORDS]
    a = greedy_generate(model, tok, convs, max_new_tokens=5, batch_size=3)
    b = greedy_generate(model, tok, convs, max_new_tokens=5, batch_size=1)
    assert a == b and len(a) == 3


# ---------------------------------------------------------------- tunelab eval on a plain model


def _prepared_folder(tmp_path, records):
    folder = tmp_path / "prepared"
    folder.mkdir()
    for split, recs in (("train", records), ("val", records)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    (folder / "report.json").write_text(json.dumps({"fingerprint": "f" * 64}))
    return folder


def test_eval_cli_on_a_model_writes_results(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from tunelab.cli import main

    data = _prepared_folder(tmp_path, RECORDS)
    from tunelab.evaluate import runner

    # The prepared-folder reader belongs to the data module; here only the eval plumbing is under test.
    monkeypatch.setattr(runner, "load_eval_data", lambda d, split, *_, **__: runner.EvalData(RECORDS, "f" * 64, str(d),
                                                                                         split or "val"))
    rc = main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--metrics", "perplexity,bleu,rouge",
               "--max-new-tokens", "3", "--dtype", "fp32", "--output-dir", str(tmp_path / "ev"), "--name", "t"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Perplexity" in out and "BLEU tokenisation" in out
    rec = json.loads((tmp_path / "ev" / "t.json").read_text())
    assert rec["data"]["fingerprint"] == "f" * 64
    assert rec["model"]["model"] == str(tiny_model_dir)
    assert rec["tokenizer_choice"]["bleu_tokenize"] == "zh"
    assert set(rec["metrics"]) >= {"perplexity", "eval_loss", "bleu", "rouge_l"}
    rows = [json.loads(x) for x in (tmp_path / "ev" / "t.predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and set(rows[0]) >= {"prompt", "reference", "prediction", "scores"}


def test_eval_on_a_raw_file_reports_its_rejected_records(tiny_model_dir, tmp_path, capsys):
    """Not silently dropped: each rejection with file and line on the console, the counts in the result json."""
    from tunelab.cli import main

    raw = tmp_path / "raw.jsonl"
    raw.write_text('{"instruction": "Q1", "output": "A1"}\n{"instruction": "Q2"}\nnot json\n'
                   '{"instruction": "Q3", "output": "A3"}\n')
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(raw), "--metrics", "perplexity", "--dtype",
                 "fp32", "--output-dir", str(tmp_path / "ev"), "--name", "t"]) == 0
    out = capsys.readouterr().out
    assert f"rejected {raw} line 2" in out and f"rejected {raw} line 3" in out and "tunelab-eval-" not in out
    assert f"2 of 4 records of {raw} rejected" in out
    data = json.loads((tmp_path / "ev" / "t.json").read_text())["data"]
    assert data["records"] == 2 and data["records_read"] == 4 and data["records_rejected"] == 2
    assert sum(data["rejected_by_reason"].values()) == 2 and len(data["rejected_examples"]) == 2


def test_eval_result_names_a_file_whose_name_is_not_utf8(tiny_model_dir, tmp_path):
    """A raw file named caf\\xe9.jsonl with a rejected record: writing the result (its rejected_examples name the
    file) crashed with UnicodeEncodeError."""
    import os

    from tunelab.evaluate import run_eval

    raw = tmp_path / os.fsdecode(b"caf" + bytes([0xE9]) + b".jsonl")
    raw.write_text('{"instruction": "Q1", "output": "A1"}\n{"instruction": "Q2"}\n')
    ev = run_eval(model=str(tiny_model_dir), data=str(raw), metrics="perplexity", dtype="fp32",
                  output_dir=tmp_path / "ev", name="t", console=lambda *_: None)
    data = json.loads(ev.json_path.read_text(encoding="utf-8"))["data"]
    assert data["source"] == str(raw) and data["rejected_examples"][0]["source"] == str(raw)


def test_a_raw_folder_holding_train_jsonl_is_evaluated_as_raw_data(tmp_path):
    """A folder in the Hugging Face layout (train.jsonl, test.jsonl) was taken for a prepared folder and refused
    ("not a prepared dataset"): it is raw data, read as validate reads it."""
    from tunelab.evaluate import load_eval_data

    raw = tmp_path / "hf"
    raw.mkdir()
    (raw / "train.jsonl").write_text('{"instruction": "Q1", "output": "A1"}\n')
    (raw / "test.jsonl").write_text('{"instruction": "Q2", "output": "A2"}\n')
    data = load_eval_data(raw, console=lambda *_: None)
    assert data.split == "all" and [r["location"] for r in data.records] == ["line 1", "line 1"]
    with pytest.raises(EvalError, match="is a raw data folder, whose every record is evaluated"):
        load_eval_data(raw, "val")


def test_eval_of_a_run_refuses_its_prepared_folder_prepared_again_since(tmp_path):
    """A run trained on a prepared folder that was then prepared again (another seed and val_ratio): `tunelab eval
    --adapter RUN` scored the new val split, records the run had trained on, without a word. The folder's
    fingerprint is now compared with the one the run's manifest records."""
    from tunelab.data.prepare import prepare_dataset
    from tunelab.evaluate import load_eval_data

    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"instruction": f"Q{i}", "output": f"A{i}"}) + "\n" for i in range(5)))
    folder, run = tmp_path / "prepared", tmp_path / "run"
    trained = prepare_dataset(str(raw), folder, console=lambda *_: None).report["fingerprint"]
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"data": {"folder": str(folder)}, "data_fingerprint": trained}))
    assert load_eval_data(run).fingerprint == trained
    now = prepare_dataset(str(raw), folder, seed=7, val_ratio=0.6, console=lambda *_: None).report["fingerprint"]
    with pytest.raises(EvalError, match="prepared again after the run") as e:
        load_eval_data(run)
    assert now[:19] in str(e.value) and trained[:19] in str(e.value)


def test_eval_options_that_would_be_ignored_or_mean_nothing_are_errors(tiny_model_dir, tmp_path, capsys):
    """`--metrics ,` wrote an empty result over the last one; --base without --compare-base and --split on a raw file
    were ignored (the result recorded the unused base); a max_length past the model's positions scored garbage."""
    from transformers import AutoConfig

    from tunelab.cli import main

    raw = tmp_path / "raw.jsonl"
    raw.write_text('{"instruction": "Q1", "output": "A1"}\n')
    common = ["eval", "--model", str(tiny_model_dir), "--data", str(raw), "--dtype", "fp32", "--output-dir",
              str(tmp_path / "ev")]
    context = AutoConfig.from_pretrained(tiny_model_dir).max_position_embeddings
    for extra, says in [(["--metrics", ","], "no metric given"),
                        (["--base", str(tiny_model_dir)], "add --compare-base"),
                        (["--split", "train"], "is a raw file, whose every record is evaluated")]:
        assert main(common + extra) == 2, extra
        assert re.search(says, capsys.readouterr().err), extra
    assert not (tmp_path / "ev").exists()
    # past the positions: scored at the context, and said (a run trained with a longer data.max_length evaluates)
    assert main(common + ["--metrics", "perplexity", "--max-length", str(context + 1), "--name", "long"]) == 0
    assert f"max_length {context + 1} is beyond this model's context: scored at {context}" in capsys.readouterr().out
    settings = json.loads((tmp_path / "ev" / "long.json").read_text())["settings"]
    assert settings["max_length"] == context and settings["max_length_asked"] == context + 1


def test_eval_without_a_model_says_what_to_give():
    from tunelab.evaluate import run_eval

    with pytest.raises(EvalError, match="--model"):
        run_eval(data="x")


@pytest.mark.parametrize("dtype,method", [("fp32", "lora"), ("bf16", "lora"), ("bf16", "full")])
def test_eval_perplexity_equals_exp_of_the_runs_final_eval_loss(tiny_model_dir, tmp_path, dtype, method):
    """`tunelab eval` on a run: the same records, system prompt, loss function and autocast as training's final
    evaluation, so perplexity = exp(eval loss) to 1e-4 in either precision; BLEU is scored on those records too."""
    import json

    from tunelab.config import load_config
    from tunelab.demo_data import write_demo_data
    from tunelab.evaluate import run_eval
    from tunelab.train.recipe import train

    write_demo_data(tmp_path / "raw")
    run = train(load_config(None, [
        f"model.name={tiny_model_dir}", f"model.dtype={dtype}", f"data.train={tmp_path / 'raw' / 'demo_alpaca.json'}",
        f"output.dir={tmp_path / 'out'}", "output.run_name=r", "training.max_steps=3", "training.learning_rate=5e-3",
        f"training.method={method}",
        "data.system_prompt=You are a terse assistant.", "eval.metrics=[perplexity,bleu]", "eval.max_samples=4",
        "eval.max_new_tokens=4", "tracking.report_to=[none]"]))
    final = json.loads((run / "manifest.json").read_text())["metrics"]
    ev = run_eval(adapter=str(run))
    assert ev.record["settings"]["dtype"] == dtype
    assert ev.result.metrics["eval_tokens"] == final["eval_tokens"]
    assert abs(math.log(ev.result.metrics["perplexity"]) - final["eval_loss"]) < 1e-4
    assert ev.result.metrics["bleu"] == pytest.approx(final["bleu"], abs=1e-6)
