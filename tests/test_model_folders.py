"""Model folders that do not load as they should: damaged files, no chat template, an adapter's base replaced or
moved or of another shape. Each must end in one ModelLoadError that names the folder, the file and what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


def _cli_error(capsys, *argv: str) -> str:
    from tunelab.cli import main

    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_a_truncated_weights_file_or_a_missing_tokenizer_json_is_named(tiny_model_dir, tmp_path, capsys):
    """A truncated model.safetensors was a SafetensorError traceback, a missing tokenizer.json a ValueError about
    sentencepiece, in every verb."""
    cut = tmp_path / "cut"
    shutil.copytree(tiny_model_dir, cut)
    with open(cut / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    err = _cli_error(capsys, "infer", "--model", str(cut), "--prompt", "hi")
    assert f"could not load the model from {cut}: {cut / 'model.safetensors'} is truncated or damaged" in err
    assert "copy or download the folder again" in err
    notok = tmp_path / "notok"
    shutil.copytree(tiny_model_dir, notok)
    (notok / "tokenizer.json").unlink()
    err = _cli_error(capsys, "infer", "--model", str(notok), "--prompt", "hi")
    assert f"could not load the tokenizer from {notok}: {notok / 'tokenizer.json'} is missing" in err


def _without_chat_template(model_dir: Path, to: Path) -> Path:
    shutil.copytree(model_dir, to)
    (to / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((to / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (to / "tokenizer_config.json").write_text(json.dumps(config))
    return to


def test_infer_refuses_a_model_without_a_chat_template_before_the_first_prompt(tiny_model_dir, tmp_path, capsys):
    """It was transformers' ValueError traceback ("Cannot use chat template functions ...") on the first prompt."""
    plain = _without_chat_template(tiny_model_dir, tmp_path / "plain")
    for argv in (["--prompt", "hi"], ["--compare", "--prompt", "hi"]):
        err = _cli_error(capsys, "infer", "--model", str(plain), "--max-new-tokens", "2", *argv)
        assert err.startswith(f"error: {plain} has no chat template") and "chat_template.jinja" in err


@pytest.fixture()
def base_and_run(tiny_model_dir, tmp_path) -> tuple[Path, Path]:
    """A copy of the tiny model as a base, and a run folder whose manifest recorded that base's identity."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.model.loading import base_identity

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    run = tmp_path / "run"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    model.save_pretrained(run / "checkpoint-final")
    AutoTokenizer.from_pretrained(base).save_pretrained(run / "checkpoint-final")
    (run / "checkpoint-final" / "tunelab.json").write_text(json.dumps({"base_model": str(base), "method": "lora"}))
    (run / "manifest.json").write_text(json.dumps({"base_model": base_identity(str(base))}))
    return base, run


def test_an_adapter_whose_recorded_base_was_replaced_is_refused_and_another_base_by_choice_is_not(
        base_and_run, model_dir, capsys):
    """merge, eval and infer applied the adapter to replaced base weights without a word (merge said "verified");
    `train --resume` already refused them."""
    from tunelab.model.loading import ModelLoadError, load_pretrained

    base, run = base_and_run
    load_pretrained(adapter=run, dtype="fp32")  # the base as it was recorded: loads
    shutil.copy(model_dir / "model.safetensors", base / "model.safetensors")  # other weights, the same shapes
    for model in (None, str(base)):
        with pytest.raises(ModelLoadError) as e:
            load_pretrained(model, adapter=run, dtype="fp32")
        said = str(e.value)
        assert f"the base model {base} is not the one {run} was trained on: {base / 'model.safetensors'}" in said
        assert "put the old weights back" in str(e.value) and "--model" in str(e.value)
    load_pretrained(str(model_dir), adapter=run, dtype="fp32")  # another base, named on purpose
    err = _cli_error(capsys, "infer", "--adapter", str(run), "--prompt", "hi")
    assert "is not the one" in err


def test_an_older_record_without_sampled_hashes_is_not_called_changed(base_and_run):
    from tunelab.model.loading import load_pretrained

    base, run = base_and_run
    (run / "manifest.json").write_text(json.dumps({"base_model": {
        "kind": "folder", "path": str(base.resolve()),
        "files": {"model.safetensors": {"bytes": (base / "model.safetensors").stat().st_size, "mtime_ns": 1}}}}))
    load_pretrained(adapter=run, dtype="fp32")


def test_an_adapter_on_a_base_of_other_shapes_or_whose_base_moved_says_so(base_and_run, tokenizer_dir, tmp_path):
    """Another shape read "a damaged or incomplete checkpoint?" with the size-mismatch line cut off; a moved base
    was "X does not exist", naming a folder the user never gave, and not how to point at the new place."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunelab.model.loading import ModelLoadError, load_pretrained

    base, run = base_and_run
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    wide = tmp_path / "wide"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(wide)
    tok.save_pretrained(wide)
    with pytest.raises(ModelLoadError) as e:
        load_pretrained(str(wide), adapter=run, dtype="fp32")
    said = str(e.value)
    assert f"was trained on {base} and does not fit {wide}" in said and "size mismatch for " in said
    assert "damaged" not in said
    moved = tmp_path / "moved"
    base.rename(moved)
    with pytest.raises(ModelLoadError) as e:
        load_pretrained(adapter=run, dtype="fp32")
    assert f"was trained on {base}, which cannot be loaded now" in str(e.value)
    assert "pass its new place with --model" in str(e.value)
    load_pretrained(str(moved), adapter=run, dtype="fp32")


def test_refuse_damaged_folder_for_verbs_that_read_a_folder_themselves(tiny_model_dir, tmp_path):
    from tunelab.model.loading import ModelLoadError, refuse_damaged_folder

    refuse_damaged_folder(tiny_model_dir)
    cut = tmp_path / "cut"
    shutil.copytree(tiny_model_dir, cut)
    (cut / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.json is missing"):
        refuse_damaged_folder(cut)
    with open(cut / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ModelLoadError, match="model.safetensors is truncated or damaged"):
        refuse_damaged_folder(cut)


def test_a_run_stopped_before_its_end_names_the_checkpoints_it_holds(tmp_path):
    """`--adapter RUN` on a run with checkpoint-2 and checkpoint-4 but no checkpoint-final said only that it held
    no adapter; the step checkpoints are usable adapters."""
    from tunelab.model.loading import ModelLoadError, resolve_adapter_dir

    run = tmp_path / "run"
    for step in (2, 10, 4):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "adapter_config.json").write_text("{}")
    (run / "checkpoint-best").mkdir()  # weights only, named by its own name: not listed as a step
    with pytest.raises(ModelLoadError, match=rf"no checkpoint-final/ with one; it holds checkpoint-2, checkpoint-4, "
                                             rf"checkpoint-10 \(a run stopped before its end\): pass one, e\.g\. "
                                             rf"--adapter {run}/checkpoint-10, or resume"):
        resolve_adapter_dir(run)
    assert resolve_adapter_dir(run / "checkpoint-4") == run / "checkpoint-4"
    with pytest.raises(ModelLoadError, match=r"no checkpoint-final/ with one$"):
        resolve_adapter_dir(tmp_path)
