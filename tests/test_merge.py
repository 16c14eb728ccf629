"""Merge: the merged folder computes what the adapter computes, loads without tunelab, and stops generating."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tunelab.errors import TunelabError


def make_adapter(model_dir: Path, out: Path, method: str = "lora", use_dora: bool = False, seed: int = 1,
                 std: float = 0.5) -> Path:
    """A tunelab-style checkpoint-final: a peft LoRA on the tiny model with random non-zero B (a real update)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"], use_dora=use_dora)
    torch.manual_seed(seed)  # lora_A's random init too: the adapter must not depend on the tests run before
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    ckpt = out / "checkpoint-final"
    model.save_pretrained(ckpt)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(ckpt)
    (ckpt / "tunelab.json").write_text(json.dumps(
        {"base_model": str(model_dir), "method": method, "dtype": "fp32", "run_name": out.name}))
    return ckpt


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny-run"
    make_adapter(tiny_model_dir, out)
    return out


def _logits(model_or_dir, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = model_or_dir
    if isinstance(model_or_dir, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(model_or_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_merged_logits_equal_adapter_logits(run_dir, tiny_model_dir, tiny_tokenizer, tmp_path, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.merge import merge_adapter

    report = merge_adapter(run_dir, tmp_path / "merged")  # a run folder resolves to its checkpoint-final
    assert report.verified and report.token_agreement == 1.0 and report.max_logit_diff < 1e-4

    ids = tiny_tokenizer("<|im_start|>user\nIndependent check text<|im_end|>\n")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base_logits = _logits(base, ids)
    adapted = PeftModel.from_pretrained(base, str(run_dir / "checkpoint-final")).eval()
    want = _logits(adapted, ids)
    got = _logits(tmp_path / "merged", ids)
    assert torch.allclose(got, want, atol=1e-4)
    assert (want - base_logits).abs().max() > 1e-2  # the adapter really changes the model: the check has teeth

    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "tunelab.json"} <= files
    assert not list(tmp_path.glob(".merged*"))  # no temporary folder left behind
    assert "adapter_config.json" not in files
    # where it came from, found again from any working folder (the dashboard's Export checks it)
    assert json.loads((tmp_path / "merged" / "tunelab.json").read_text())["merged_from"] == \
        str((run_dir / "checkpoint-final").resolve())


def test_merged_folder_loads_without_tunelab(run_dir, tmp_path):
    from tunelab.merge import merge_adapter

    merge_adapter(run_dir / "checkpoint-final", tmp_path / "m", dtype="bf16")
    code = textwrap.dedent(f"""
        import sys, json
        from transformers import AutoModelForCausalLM, AutoTokenizer
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r})
        t = AutoTokenizer.from_pretrained({str(tmp_path / 'm')!r})
        assert "tunelab" not in sys.modules and "peft" not in sys.modules, sorted(sys.modules)
        eos = m.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        print(json.dumps({{"dtype": str(m.dtype), "eos": eos, "im_end": t.convert_tokens_to_ids("<|im_end|>"),
                          "template": t.apply_chat_template([{{"role": "user", "content": "hi"}}], tokenize=False,
                                                            add_generation_prompt=True)}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["dtype"] == "torch.bfloat16"
    assert out["im_end"] in out["eos"]  # stops at the template's end of turn
    assert out["template"].endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_dora_and_qlora_adapters_merge_and_say_so(tiny_model_dir, tmp_path):
    from tunelab.merge import merge_adapter

    make_adapter(tiny_model_dir, tmp_path / "dora", use_dora=True)
    assert merge_adapter(tmp_path / "dora", tmp_path / "m1").token_agreement == 1.0
    make_adapter(tiny_model_dir, tmp_path / "ql", method="qlora")
    report = merge_adapter(tmp_path / "ql", tmp_path / "m2")
    assert report.verified and any("full-precision" in n for n in report.notes)
    assert "full-precision" in report.summary()


def test_merge_fails_loudly_beyond_tolerance_and_writes_nothing(run_dir, tmp_path):
    from tunelab.merge import MergeError, merge_adapter

    with pytest.raises(MergeError, match="does not match"):
        merge_adapter(run_dir, tmp_path / "bad", dtype="bf16", tolerance=1e-9)
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
    assert not list(tmp_path.glob(".bad*"))


def test_merge_refuses_non_model_output_and_missing_adapter(run_dir, tmp_path):
    from tunelab.merge import merge_adapter

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(TunelabError, match="not a model folder"):
        merge_adapter(run_dir, tmp_path / "notes")
    with pytest.raises(TunelabError, match="no adapter"):
        merge_adapter(tmp_path / "nowhere", tmp_path / "x")
    for bad in (float("nan"), float("inf"), 0.0, -1.0):  # nan switched the check off and still said "verified"
        with pytest.raises(TunelabError, match="tolerance must be a number above 0"):
            merge_adapter(run_dir, tmp_path / "x", tolerance=bad)


def test_merge_never_overwrites_what_it_reads_and_a_damaged_adapter_is_named(tiny_model_dir, tmp_path):
    """`--output` = the adapter's own base folder replaced the base with the merged weights (the run's adapter then
    sat on weights that already held it); damaged checkpoint files were tracebacks."""
    import hashlib
    import shutil

    from tunelab.cli import main
    from tunelab.merge import merge_adapter

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    run = tmp_path / "run"
    make_adapter(base, run)
    before = hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    with pytest.raises(TunelabError, match="holds a model that tunelab merge did not write"):
        merge_adapter(run, base)
    (base / "tunelab.json").write_text(json.dumps({"merged_from": "elsewhere"}))  # a merged model as a base
    with pytest.raises(TunelabError, match="would overwrite the adapter's base model .*which this merge reads"):
        merge_adapter(run, base)
    assert hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest() == before
    weights = run / "checkpoint-final" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(TunelabError, match="could not load the adapter in .*damaged or incomplete"):
        merge_adapter(run, tmp_path / "merged")
    (run / "checkpoint-final" / "tunelab.json").write_text("{not json")
    assert main(["merge", "--adapter", str(run), "--output", str(tmp_path / "merged")]) == 2
    (tmp_path / "afile").write_text("x")
    assert main(["merge", "--adapter", str(run), "--output", str(tmp_path / "afile" / "m")]) == 2


def test_merge_replaces_only_an_earlier_merge_and_names_the_files_it_did_not_write(run_dir, tiny_model_dir, tmp_path,
                                                                                    monkeypatch, capsys):
    """A folder holding config.json was replaced whole: a model and NOTES.md put there by hand, or the GGUF and
    Modelfile `tunelab export` wrote into an earlier merge, were deleted without a word (rc 0)."""
    import shutil

    import tunelab.merge
    from tunelab.cli import main
    from tunelab.merge import MergeError, merge_adapter

    def contents(folder):
        return {p.name: p.read_bytes() for p in folder.iterdir()}

    by_hand = tmp_path / "v"
    shutil.copytree(tiny_model_dir, by_hand)
    (by_hand / "NOTES.md").write_text("keep me")
    kept = contents(by_hand)
    with pytest.raises(MergeError, match="v holds a model that tunelab merge did not write"):
        merge_adapter(run_dir, by_hand, verify=False)
    assert contents(by_hand) == kept

    merged = tmp_path / "m"
    merge_adapter(run_dir, merged, verify=False)
    assert set(json.loads((merged / "tunelab.json").read_text())["files"]) == set(contents(merged))
    merge_adapter(run_dir, merged, verify=False)  # an earlier merge, nothing else in it: replaced
    (merged / "m.gguf").write_bytes(b"GGUF")
    (merged / "Modelfile").write_text("FROM ./m.gguf")
    kept = contents(merged)
    assert main(["merge", "--adapter", str(run_dir), "--output", str(merged), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert "files the merge did not write: Modelfile, m.gguf" in err and "--overwrite" in err
    assert contents(merged) == kept

    record = json.loads((merged / "tunelab.json").read_text())  # a merge from before `files` was recorded
    del record["files"]
    (merged / "tunelab.json").write_text(json.dumps(record))
    with pytest.raises(MergeError, match="did not write: Modelfile, m.gguf"):
        merge_adapter(run_dir, merged, verify=False)

    real = tunelab.merge.check_templates

    def a_file_arrives_meanwhile(*a, **k):  # put there while the merge ran: checked again before the swap
        (merged / "late.txt").write_text("x")
        return real(*a, **k)

    monkeypatch.setattr(tunelab.merge, "check_templates", a_file_arrives_meanwhile)
    (merged / "m.gguf").rename(tmp_path / "m.gguf")
    (merged / "Modelfile").rename(tmp_path / "Modelfile")
    with pytest.raises(MergeError, match="did not write: late.txt"):
        merge_adapter(run_dir, merged, verify=False)
    assert not list(tmp_path.glob(".m.*"))
    monkeypatch.undo()

    assert main(["merge", "--adapter", str(run_dir), "--output", str(merged), "--no-verify", "--overwrite"]) == 0
    assert set(contents(merged)) == set(json.loads((merged / "tunelab.json").read_text())["files"])


def test_a_merge_stopped_between_its_two_renames_gets_the_earlier_model_back(run_dir, tmp_path, monkeypatch):
    """Interrupted after the earlier merge was renamed aside, the output was gone and the earlier model stayed hidden
    as .NAME.old-PID: no later merge put it back or removed it."""
    import os

    from tunelab.files import _HOST, staging_dir
    from tunelab.merge import merge_adapter, prepare_output

    out = tmp_path / "m"
    merge_adapter(run_dir, out, verify=False)
    earlier = (out / "model.safetensors").read_bytes()
    real = os.replace

    def stopped(src, dst):
        if Path(src).name.startswith(".m.tmp-") and Path(dst) == out:  # the new model's rename into place
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        merge_adapter(run_dir, out, verify=False)
    monkeypatch.undo()
    assert (out / "model.safetensors").read_bytes() == earlier and os.listdir(tmp_path) == ["m"]

    # killed outright there (no handler ran): the next merge (or staging folder) of that output puts it back
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.rename(out, tmp_path / f".m.old-{_HOST}-{dead.pid}")
    (tmp_path / f".m.old-{_HOST}x-{dead.pid}").mkdir()  # another machine's, on shared storage: not ours to judge
    prepare_output(out)
    assert (out / "model.safetensors").read_bytes() == earlier
    # killed while removing the old copy, after the new one was in place: the old one is removed
    (tmp_path / f".m.old-{_HOST}-{dead.pid}").mkdir()
    staged = staging_dir(out)
    assert sorted(os.listdir(tmp_path)) == sorted(["m", f".m.old-{_HOST}x-{dead.pid}", staged.name])


def test_merged_and_prepared_folders_get_the_permissions_mkdir_would_give(run_dir, tmp_path):
    """They are written in a temporary folder and renamed into place; tempfile.mkdtemp made them 0700 (readable by
    their owner only: another user could not serve the merged model)."""
    import os

    from tunelab.data.prepare import prepare_dataset
    from tunelab.demo_data import write_demo_data
    from tunelab.merge import merge_adapter

    old = os.umask(0o022)
    try:
        merge_adapter(run_dir, tmp_path / "merged")
        prepare_dataset([str(write_demo_data(tmp_path / "raw")[0])], tmp_path / "prepared")
    finally:
        os.umask(old)
    assert (tmp_path / "merged").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "prepared").stat().st_mode & 0o777 == 0o755
    # and the files in them, and a checkpoint's: safetensors writes its files 0600
    import torch
    from safetensors.torch import save_file

    from tunelab.train.checkpoint import save_checkpoint

    (tmp_path / "run").mkdir()
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "run", "checkpoint-1",
                        lambda d: save_file({"w": torch.zeros(2)}, str(d / "adapter_model.safetensors")))
    finally:
        os.umask(old)
    files = [p for d in ("merged", "prepared", "run") for p in (tmp_path / d).rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(0o644) for p in files}


def test_cli_and_root_script(run_dir, tmp_path):
    from tunelab.cli import main

    assert main(["merge", "--adapter", str(run_dir), "--output", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    assert main(["merge", "--adapter", str(tmp_path / "none"), "--output", str(tmp_path / "y")]) == 2
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "merge_model.py"), "--adapter", str(run_dir / "checkpoint-final"),
                           "--output", str(tmp_path / "script"), "--no-verify"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "script" / "config.json").is_file()


@pytest.mark.slow
def test_bundled_model_merge_bf16(tmp_path):
    """On the real model: bf16 rounding stays inside the default tolerance and fp32 is exact."""
    from tunelab.merge import merge_adapter
    from tunelab.model.loading import ensure_bundled

    make_adapter(ensure_bundled(), tmp_path / "run", std=0.02)
    # tunelab.json names the bundled model as configured, like the trainer writes it
    meta = tmp_path / "run" / "checkpoint-final" / "tunelab.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "base_model": "bundled:smollm2-135m-instruct"}))
    r32 = merge_adapter(tmp_path / "run", tmp_path / "m32")
    r16 = merge_adapter(tmp_path / "run", tmp_path / "m16", dtype="bf16")
    print(r32.summary(), r16.summary(), sep="\n")
    assert r32.relative_diff < 1e-4 and r32.token_agreement == 1.0
    assert r16.token_agreement >= 0.9


def test_full_checkpoint_becomes_a_standalone_folder(tiny_model_dir, tmp_path):
    """method=full: the checkpoint is already a model; merge writes it in the standard form and verifies it."""
    import shutil

    from tunelab.merge import merge_adapter

    ckpt = tmp_path / "full-run" / "checkpoint-final"
    shutil.copytree(tiny_model_dir, ckpt)
    (ckpt / "tunelab.json").write_text(json.dumps({"base_model": "x", "method": "full", "run_name": "full-run"}))
    report = merge_adapter(tmp_path / "full-run", tmp_path / "out", dtype="fp16")
    assert report.method == "full" and report.verified and report.token_agreement >= 0.97
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] in (2, [2])


def test_a_merge_stopped_by_sigterm_leaves_no_staging_copy_and_a_killed_ones_is_swept(run_dir, tmp_path,
                                                                                       monkeypatch, capsys):
    """SIGTERM killed `tunelab merge` without its cleanup: a hidden full-size copy of the model stayed beside the
    output, and nothing ever removed it."""
    import os
    import signal
    import time

    import tunelab.merge
    from tunelab.cli import main
    from tunelab.files import _HOST

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid no process holds now
    orphan = tmp_path / f".merged.tmp-{_HOST}-{dead.pid}-abc123"
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"x" * 1024)
    elsewhere = tmp_path / f".merged.tmp-{_HOST}x-{dead.pid}-abc123"  # another machine's, on shared storage: kept
    elsewhere.mkdir()

    def stopped(tmp, output):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler interrupts this

    monkeypatch.setattr(tunelab.merge, "swap_into_place", stopped)
    assert main(["merge", "--adapter", str(run_dir), "--output", str(tmp_path / "merged"), "--no-verify"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert os.listdir(tmp_path) == [elsewhere.name]  # neither this merge's staging folder nor the killed one's
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the CLI put the handler back


def test_adapter_merged_model_and_export_stop_on_the_same_ids(tiny_model_dir, tmp_path):
    """A base whose generation_config ends text at `<|endoftext|>` while the chat tokenizer's EOS is `<|im_end|>`:
    serve --adapter, serve --model merged, the merged generation_config and the GGUF/Modelfile all stop on the
    ids of the one rule (stop_token_ids), the base's `<|endoftext|>` included."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from tunelab.export.gguf import export_gguf
    from tunelab.infer import load
    from tunelab.merge import merge_adapter
    from tunelab.model.stop_tokens import stop_token_ids
    from tunelab.serve import Engine

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text_end, im_end = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == im_end != text_end
    base_dir = tmp_path / "base"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base.generation_config.eos_token_id = [text_end]
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    make_adapter(base_dir, tmp_path / "run")

    want = stop_token_ids(tok, GenerationConfig.from_pretrained(base_dir))
    assert set(want) == {im_end, text_end}
    merge_adapter(tmp_path / "run", tmp_path / "merged")
    merged_eos = json.loads((tmp_path / "merged" / "generation_config.json").read_text())["eos_token_id"]
    assert merged_eos == want
    assert Engine(*load(adapter=str(tmp_path / "run"), dtype="fp32")).eos == set(want)
    assert Engine(*load(str(tmp_path / "merged"), dtype="fp32")).eos == set(want)

    report = export_gguf(tmp_path / "merged", tmp_path / "m.gguf", verify=False)
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert r.fields["tokenizer.ggml.eos_token_id"].contents() == im_end
    assert r.fields["tokenizer.ggml.eot_token_id"].contents() == text_end
    modelfile = Path(report.modelfile).read_text()
    assert 'PARAMETER stop "<|endoftext|>"' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_merge_onto_a_base_that_moved_with_model(run_dir, tiny_model_dir, tmp_path, capsys):
    """The base errors (moved, replaced since training) tell the user to pass --model; merge had no such option."""
    import shutil

    from tunelab.cli import main

    moved = tmp_path / "base-elsewhere"
    shutil.copytree(tiny_model_dir, moved)
    assert main(["merge", "--adapter", str(run_dir), "--output", str(tmp_path / "m"), "--model", str(moved)]) == 0
    record = json.loads((tmp_path / "m" / "tunelab.json").read_text())
    assert record["base_model"] == str(moved) and record["verification"]["verified"]
