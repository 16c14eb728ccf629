"""Continued pretraining (training.stage: pt): raw text read and accounted for, blocks that never attend across
documents, a run on the tiny model, and `tunelab eval` perplexity on its held-out text."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import shared_file
from tunelab.config import ConfigError, load_config
from tunelab.data.prepare import load_prepared, prepare_dataset
from tunelab.data.text import block_examples, collate_blocks, encode_text, pack_blocks

DOCS = ["The tuna is a fast fish of the open ocean. It swims all its life.",
        "Rivers carry water to the sea.\nSome rivers are long.",
        "金枪鱼是一种大型海鱼。它游得很快。",
        "Bread is baked from flour, water and yeast. " * 12]


def _quiet(*_):
    pass


def test_txt_documents_by_blank_lines_by_line_and_by_file(tmp_path, tiny_tokenizer):
    para = tmp_path / "para.txt"
    para.write_text("First document,\nstill the first.\n\n\nSecond document.\n\nThird.\n", encoding="utf-8")
    lines = tmp_path / "lines.txt"
    lines.write_text("one article\nanother article\nthird article\n", encoding="utf-8")
    for path, mode, expect in ((para, "auto", ["First document,\nstill the first.\n", "Second document.\n",
                                               "Third.\n"]),
                               (lines, "auto", ["one article\n", "another article\n", "third article\n"]),
                               (para, "file", [para.read_text()]), (para, "line", None)):
        r = prepare_dataset([str(path)], tmp_path / f"out-{path.stem}-{mode}", tokenizer=tiny_tokenizer,
                            stage="pt", text_documents=mode, val_ratio=0, console=_quiet)
        docs = load_prepared(r.output).train
        if expect is not None:
            assert [d["text"] for d in docs] == expect
        else:
            assert len(docs) == 4 and docs[1]["location"] == "line 2"
    r = prepare_dataset([str(para)], tmp_path / "p", stage="pt", val_ratio=0, console=_quiet)
    assert [d["location"] for d in load_prepared(r.output).train] == ["lines 1-2", "line 5", "line 7"]
    assert r.report["files"][0]["container"] == "text, blank-line separated documents"


@pytest.mark.parametrize("text", ["A\nB\nC\n\n", "\n\nA\nB\nC\n\n\n", "A\r\nB\r\nC\r\n \r\n"])
def test_blank_lines_only_around_the_text_do_not_make_paragraphs(tmp_path, text):
    src = tmp_path / "lines.txt"
    src.write_bytes(text.encode())
    r = prepare_dataset([str(src)], tmp_path / "out", stage="pt", val_ratio=0, console=_quiet)
    assert r.report["files"][0]["container"] == "text, one document per line"
    assert [d["text"].strip() for d in load_prepared(r.output).train] == ["A", "B", "C"]


def test_text_documents_option_of_prepare_and_validate(tmp_path, capsys):
    from tunelab.cli import main

    src = tmp_path / "para.txt"
    src.write_text("One.\nStill one.\n\nTwo.\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["prepare", "-i", str(src), "--stage", "pt", "--no-tokenizer", "--val-ratio", "0", "-o", str(out),
                 "--text-documents", "line"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["options"]["text_documents"] == "line" and report["records_accepted"] == 3
    assert report["files"][0]["container"] == "text, one document per line"
    assert main(["validate", str(src), "--stage", "pt", "--no-tokenizer", "--text-documents", "file"]) == 0
    assert "text, one document per file" in capsys.readouterr().out
    assert main(["validate", str(src), "--no-tokenizer", "--text-documents", "line"]) == 2
    assert capsys.readouterr().err.strip() == "error: --text-documents applies to --stage pt (raw text), not --stage sft"


def test_column_map_names_the_text_field(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"content": d}) + "\n" for d in DOCS), encoding="utf-8")
    r = prepare_dataset([str(src)], None, check=True, stage="pt", column_map={"text": "content"}, console=_quiet)
    assert r.report["records_accepted"] == len(DOCS)


def test_every_document_accepted_or_rejected_with_its_reason(tmp_path, tiny_tokenizer):
    src = tmp_path / "mixed.jsonl"
    rows = [{"text": d, "url": "x"} for d in DOCS] + [
        {"text": "bad \u0000 byte"}, {"text": "   "}, {"text": 42}, {"title": "no text"},
        {"messages": [{"role": "user", "content": "hi"}]}, {"text": DOCS[0]}]
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    r = prepare_dataset([str(src)], tmp_path / "out", tokenizer=tiny_tokenizer, stage="pt", max_length=16,
                        val_ratio=0.25, console=_quiet)
    rep = r.report
    assert rep["records_read"] == 10 == rep["records_accepted"] + rep["records_rejected"] + rep["duplicates_removed"]
    assert (rep["records_accepted"], rep["duplicates_removed"]) == (4, 1)
    assert rep["rejected_by_reason"] == {"invalid_text": 1, "empty_field": 1, "wrong_type": 1, "missing_field": 1,
                                         "wrong_stage": 1}
    rejected = [json.loads(x) for x in (r.output / "rejected.jsonl").read_text().splitlines()]
    assert {x["location"] for x in rejected} == {f"line {n}" for n in range(5, 11)}
    ts = rep["text_stats"]
    assert ts["documents"] == 4 and ts["split_documents"] >= 1  # the long bread document, cut into pieces
    assert ts["train"]["documents"] + ts["val"]["documents"] == 4
    assert ts["tokens"] == sum(len(tiny_tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in DOCS)
    assert ts["train"]["blocks"] >= math.ceil(ts["train"]["tokens"] / 16)
    md = (r.output / "report.md").read_text()
    assert "## Text (continued pretraining)" in md and "blocks (fill)" in md


def test_pieces_end_with_eos_and_blocks_keep_documents_whole(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    pieces, dropped = encode_text(tiny_tokenizer, DOCS[3], 16)
    ids = tiny_tokenizer(DOCS[3], add_special_tokens=False)["input_ids"] + [eos]
    assert [t for p in pieces for t in p] + ([eos] if dropped else []) == ids and all(len(p) <= 16 for p in pieces)
    lengths = [5, 9, 3, 16, 1, 7, 8]
    blocks = pack_blocks(lengths, 16)
    assert [i for b in blocks for i in b] == list(range(len(lengths)))  # every piece once, in order
    assert all(sum(lengths[i] for i in b) <= 16 for b in blocks) and blocks == [[0, 1], [2], [3], [4, 5, 6]]
    all_pieces = [p for d in DOCS for p in encode_text(tiny_tokenizer, d, 16)[0]]
    examples = block_examples(all_pieces, [f"doc {i}" for i in range(len(all_pieces))], 16)
    batch = collate_blocks(examples)
    assert int((batch["position_ids"][0] == 0).sum()) == len(all_pieces)  # positions restart at every piece
    assert int((batch["labels"] != -100).sum()) == sum(e["n_targets"] for e in examples)


def test_no_attention_crosses_documents_within_a_block(tiny_model_dir, tiny_tokenizer):
    """A document's hidden states in a block equal its hidden states alone, whatever the document before it holds:
    with tunelab's per-record packed attention (what training uses on SDPA models) and with transformers' SDPA
    given the record boundaries, called exactly as the training loss calls the decoder."""
    from transformers import AutoModelForCausalLM

    from tunelab.model.attention import packed_kwargs, use_packed_attention
    from tunelab.model.loss import CausalLMLoss

    a, b, other = (encode_text(tiny_tokenizer, d, 64)[0][0] for d in DOCS[:3])
    for packed in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        if packed:
            assert use_packed_attention(model)
        decoder = model.get_decoder()
        with torch.no_grad():
            alone = decoder(input_ids=torch.tensor([b])).last_hidden_state[0]
            for first in (a, other):
                batch = collate_blocks(block_examples([first, b], ["a", "b"], 64))
                assert batch["input_ids"].shape[1] == len(first) + len(b)  # one block, two documents
                hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                                 **packed_kwargs(batch["position_ids"], 1)).last_hidden_state[0]
                assert torch.allclose(hidden[len(first):], alone, atol=1e-5)
            s, n = CausalLMLoss(model)(**collate_blocks(block_examples([a, b], ["a", "b"], 64)))
            sa, _ = CausalLMLoss(model)(**collate_blocks(block_examples([a], ["a"], 64)))
            sb, _ = CausalLMLoss(model)(**collate_blocks(block_examples([b], ["b"], 64)))
        assert int(n) == len(a) + len(b) - 2 and float(s) == pytest.approx(float(sa + sb), rel=1e-5)


def test_pt_run_trains_every_token_and_eval_reports_perplexity(tiny_model_dir, tmp_path):
    from tunelab.evaluate.runner import run_eval
    from tunelab.rundir import read_metrics
    from tunelab.train.recipe import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(DOCS * 3) + "\n", encoding="utf-8")
    cfg = load_config(None, [f"model.name={tiny_model_dir}", "model.dtype=fp32", f"data.train={corpus}",
                             "training.stage=pt", f"output.dir={tmp_path}", "output.run_name=pt",
                             "data.max_length=32", "data.val_ratio=0.25", "training.epochs=4",
                             "training.batch_size=2", "training.learning_rate=3e-3", "training.logging_steps=1",
                             "eval.metrics=[perplexity,bleu]", "tracking.report_to=[none]"])
    run = train(cfg)
    man = json.loads((run / "manifest.json").read_text())
    assert man["status"] == "finished" and man["stage"] == "pt"
    assert json.loads((run / "checkpoint-final" / "tunelab.json").read_text())["stage"] == "pt"
    report = json.loads((run / "data" / "report.json").read_text())
    assert report["records_accepted"] == 4  # the repeats are duplicates, counted as such
    assert man["data"]["train_records"] == report["text_stats"]["train"]["blocks"]
    assert man["data"]["train_target_tokens"] == report["text_stats"]["train"]["tokens"] - report["text_stats"][
        "train"]["pieces"]
    steps = [m for m in read_metrics(run) if "loss" in m and not m.get("final")]
    assert steps[-1]["loss"] < steps[0]["loss"]
    final = man["metrics"]
    ev = run_eval(adapter=str(run), compare_base=True)
    assert ev.record["settings"]["metrics"] == ["perplexity"]  # no prompt to answer in raw text
    assert ev.result.metrics["eval_tokens"] == final["eval_tokens"]
    assert ev.result.metrics["perplexity"] == pytest.approx(math.exp(final["eval_loss"]), rel=1e-4)
    assert ev.result.metrics["perplexity"] < ev.base_result.metrics["perplexity"]


def test_pt_config_and_stage_mismatch_refused(tmp_path, tiny_tokenizer):
    with pytest.raises(ConfigError, match="training.packing=true"):
        load_config(None, ["training.stage=pt", "training.packing=false"])
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"instruction": "hi", "output": "hello"}) + "\n")
    r = prepare_dataset([str(sft)], tmp_path / "prepared", tokenizer=tiny_tokenizer, val_ratio=0, console=_quiet)
    from tunelab.errors import TunelabError
    from tunelab.train.inputs import _check_stage

    with pytest.raises(TunelabError, match="--stage pt"):
        _check_stage(r.report, load_config(None, ["training.stage=pt"]), r.output)
    # a pt folder split by paragraph does not train a run that asks for one document per line (it did, silently)
    txt = tmp_path / "notes.txt"
    txt.write_text("one\ntwo\n\nthree\n")
    r = prepare_dataset([str(txt)], tmp_path / "pt", tokenizer=tiny_tokenizer, val_ratio=0, console=_quiet, stage="pt",
                        text_documents="paragraph")
    with pytest.raises(TunelabError, match="prepared with --text-documents paragraph, this run asks for "
                                           "data.text_documents=line"):
        _check_stage(r.report, load_config(None, ["training.stage=pt", "data.text_documents=line"]), r.output)
    for same in ("auto", "paragraph"):
        _check_stage(r.report, load_config(None, ["training.stage=pt", f"data.text_documents={same}"]), r.output)


@pytest.mark.parametrize("rel,docs", [("llamafactory/c4_demo.jsonl", 300), ("llamafactory/wiki_demo.txt", 30)])
def test_shared_raw_text_files(tmp_path, tiny_tokenizer, rel, docs):
    path = shared_file(rel)
    r = prepare_dataset([str(path)], tmp_path / "out", tokenizer=tiny_tokenizer, stage="pt", max_length=512,
                        console=_quiet)
    rep, ts = r.report, r.report["text_stats"]
    assert rep["records_read"] == docs == rep["records_accepted"] + rep["records_rejected"] + rep[
        "duplicates_removed"] and rep["records_rejected"] == 0
    assert ts["train"]["blocks"] > 0 and ts["val"]["pieces"] > 0 and 0.5 < ts["train"]["block_fill"] <= 1
    if rel.endswith(".txt"):
        assert rep["files"][0]["container"] == "text, one document per line" and ts["split_documents"] > 20


def test_resumed_pt_run_equals_uninterrupted_run(tiny_model_dir, tmp_path, signal_after_step):
    """A pt run stopped mid-epoch and resumed trains the same blocks in the same order: the same losses step by
    step, the same eval losses and the same adapter as a run that was never stopped."""
    from safetensors.torch import load_file

    from tunelab.rundir import read_metrics
    from tunelab.train.recipe import TrainingInterrupted, train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(DOCS + [d.upper() for d in DOCS]) + "\n", encoding="utf-8")

    def cfg(name):
        return load_config(None, [f"model.name={tiny_model_dir}", "model.dtype=fp32", f"data.train={corpus}",
                                  "training.stage=pt", f"output.dir={tmp_path}", f"output.run_name={name}",
                                  "data.max_length=24", "data.val_ratio=0.25", "training.epochs=2",
                                  "training.batch_size=2", "training.learning_rate=3e-3", "training.logging_steps=1",
                                  "training.save_steps=2", "training.eval_steps=2", "eval.metrics=[perplexity]",
                                  "tracking.report_to=[none]"])

    full = train(cfg("full"))
    signal_after_step(3)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        train(cfg("split"))
    signal_after_step(None)
    split = tmp_path / "split"
    train(load_config(None, [f"output.dir={tmp_path}"]), resume=str(split))
    for key in ("loss", "eval_loss"):
        a = [(m["step"], m[key]) for m in read_metrics(full) if key in m]
        b = [(m["step"], m[key]) for m in read_metrics(split) if key in m]
        assert len(a) == len(b) > 3 and [s for s, _ in a] == [s for s, _ in b]
        assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-5, (key, a, b)
    wa, wb = (load_file(r / "checkpoint-final" / "adapter_model.safetensors") for r in (full, split))
    assert wa.keys() == wb.keys() and max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


def test_a_document_starts_with_bos_for_a_tokenizer_that_puts_one_before_every_text(tiny_tokenizer):
    """pt tokenised every document without special tokens: for Llama / Gemma / Mistral, whose tokenizers (and
    pretraining) start every text with BOS, no document had one (Gemma's output is garbage without it). The
    document's first piece starts with BOS now; a tokenizer without one (SmolLM2, Qwen) is unchanged."""
    import copy

    from tokenizers.processors import TemplateProcessing

    plain = encode_text(tiny_tokenizer, DOCS[3], 16)[0]
    assert plain[0][0] != tiny_tokenizer.bos_token_id
    llama_like = copy.deepcopy(tiny_tokenizer)
    bos = llama_like.bos_token_id
    llama_like._tokenizer.post_processor = TemplateProcessing(single=f"{llama_like.bos_token} $A",
                                                              special_tokens=[(llama_like.bos_token, bos)])
    assert llama_like("a")["input_ids"][0] == bos
    pieces, _ = encode_text(llama_like, DOCS[3], 16)
    flat, ids = [t for p in pieces for t in p], [t for p in plain for t in p]
    assert flat[0] == bos and flat[1:len(ids) + 1] == ids[:len(flat) - 1]
    assert [p[0] for p in pieces[1:]].count(bos) == 0  # only the document's start, not every piece


def test_control_tokens_written_in_a_document_are_trained_as_text(tmp_path, tiny_tokenizer):
    """A document that held "<|im_end|>" or "<|endoftext|>" as text (code about tokenizers, a chat log, corpora
    joined by a separator) was tokenised with those as the control tokens: the model learnt to end a turn or a
    document there. They are its characters now, and prepare says which records held them."""
    text = "A chat log: <|im_start|>user\nhi<|im_end|> and the end marker <|endoftext|> in prose."
    pieces, _ = encode_text(tiny_tokenizer, text, 512)
    ids = [t for p in pieces for t in p]
    assert ids[-1] == tiny_tokenizer.eos_token_id and tiny_tokenizer.eos_token_id not in ids[:-1]
    assert not set(ids[:-1]) & set(tiny_tokenizer.all_special_ids)
    assert tiny_tokenizer.decode(ids[:-1]) == text
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}) for t in (DOCS[0], text, DOCS[1])) + "\n")
    r = prepare_dataset([str(src)], tmp_path / "out", tokenizer=tiny_tokenizer, stage="pt", max_length=64,
                        val_ratio=0.0, console=_quiet)
    assert r.report["records_accepted"] == 3
    assert r.report["warnings"]["control_token_as_text"] == 1
    assert r.report["warning_examples"]["control_token_as_text"] == [f"{src} line 2"]
