"""GGUF export and the one-chat-template check: the file reads back as its source, and every path renders alike."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab.errors import TunelabError


def _noisy(model, seed=0):
    """Larger random weights: greedy output varies by prompt, so comparing first tokens means something."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15) if p.dim() == 2 else p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir, tmp_path_factory) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("llama-merged")
    _noisy(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qwen_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny Qwen2 (q/k/v biases, untied head, no q/k permutation in llama.cpp) with the ChatML tokenizer."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    out = tmp_path_factory.mktemp("qwen2-merged")
    _noisy(Qwen2ForCausalLM(cfg), seed=1).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_llama_f16_export_reads_back_and_matches(llama_dir, tmp_path):
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    from tunelab.export.gguf import export_gguf, permute_qk

    report = export_gguf(llama_dir, tmp_path / "m.gguf", quant="f16")
    assert (tmp_path / "m.gguf").is_file() and not list(tmp_path.glob(".m.gguf*"))
    assert any("transformers GGUF reload" in c and "on 3/3" in c for c in report.checks)
    assert "llama.cpp" in report.summary()

    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert fields["llama.attention.head_count_kv"] == 2 and fields["llama.rope.dimension_count"] == 16
    assert r.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert len(r.fields["tokenizer.ggml.merges"].contents()) > 40_000
    assert r.fields["tokenizer.ggml.eos_token_id"].contents() == 2  # <|im_end|>
    src = load_file(str(llama_dir / "model.safetensors"))
    t = {x.name: x for x in r.tensors}
    assert "output.weight" not in t  # tied embeddings: llama.cpp reuses token_embd
    q = src["model.layers.1.self_attn.q_proj.weight"]
    got = np.asarray(t["blk.1.attn_q.weight"].data, dtype=np.float32).reshape(q.shape)
    assert np.allclose(got, permute_qk(q, 4, 4), atol=1e-3) and not np.allclose(got, q, atol=1e-3)
    k = src["model.layers.0.self_attn.k_proj.weight"]
    assert np.allclose(np.asarray(t["blk.0.attn_k.weight"].data, np.float32).reshape(k.shape),
                       permute_qk(k, 4, 2), atol=1e-3)
    assert t["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_q8_0_export_is_smaller_and_verified(llama_dir, tmp_path):
    import gguf

    from tunelab.export.gguf import export_gguf

    f16 = export_gguf(llama_dir, tmp_path / "a.gguf", quant="f16", verify=False)
    q8 = export_gguf(llama_dir, tmp_path / "b.gguf", quant="q8_0")
    assert q8.size_bytes < 0.7 * f16.size_bytes
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / "b.gguf")).tensors}
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert all("differs" not in c for c in q8.checks)


def test_weights_beyond_f16_are_refused_by_name_and_export_at_f32(llama_dir, tmp_path):
    """An f16 export of weights beyond 65504 failed its own check naming a vanished temporary file and "differs
    by inf"; now refused before writing, naming the tensor and --quant f32, which exports them exactly."""
    import shutil

    import gguf
    import torch
    from safetensors.torch import load_file, save_file

    from tunelab.export.gguf import export_gguf

    big = tmp_path / "big"
    shutil.copytree(llama_dir, big)
    state = load_file(big / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"][0, 0] = 1e5
    save_file(state, big / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(TunelabError, match=r"model.layers.0.mlp.up_proj.weight holds weights up to 1e\+05, beyond "
                                           r"float16's largest value .*--quant f32"):
        export_gguf(big, tmp_path / "big.gguf", quant="f16")
    assert list(tmp_path.glob("*.gguf*")) == [] and list(tmp_path.glob(".big.gguf*")) == []
    report = export_gguf(big, tmp_path / "big.gguf", quant="f32")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / "big.gguf")).tensors}
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.F32 and "f32" in report.summary()
    assert torch.is_tensor(state["model.layers.0.mlp.up_proj.weight"])


def test_q8_0_says_which_matrices_it_kept_in_f16(tiny_model_dir, tmp_path):
    """q8_0 keeps a matrix whose rows are not whole 32-value blocks in f16, as llama.cpp does; the summary said only
    "q8_0" (a 48-wide model: every matrix reading the hidden state has 48-value rows, down_proj's are 96)."""
    import gguf
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunelab.export.gguf import export_gguf

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m48")
    tok.save_pretrained(tmp_path / "m48")
    report = export_gguf(tmp_path / "m48", tmp_path / "q.gguf", quant="q8_0", verify=False)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors if len(t.shape) == 2}
    kept = sum(t == gguf.GGMLQuantizationType.F16 for t in types.values())
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0 and kept == report.kept_f16 > 0
    assert f"note: {kept} matrices kept in f16: their rows are not a multiple of 32" in report.summary()


def test_qwen2_export(qwen_dir, tmp_path, monkeypatch):
    import gguf
    from transformers import AutoTokenizer

    from tunelab.export import gguf as export
    from tunelab.export.gguf import export_gguf

    # transformers loads the SmolLM2 vocabulary of this folder as a Qwen2Tokenizer (Qwen's pre-tokenizer): tell
    # the exporter that its token hash is llama.cpp's "qwen2", as a real Qwen tokenizer's hash is.
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    with pytest.raises(TunelabError, match="pre-tokenizer"):
        export._pre_tokenizer(tok)
    from hashlib import sha256
    monkeypatch.setitem(export.KNOWN_PRE, sha256(str(tok.encode(export.CHK_TXT, add_special_tokens=False))
                                                 .encode()).hexdigest(), "qwen2")
    report = export_gguf(qwen_dir, tmp_path / "q.gguf")
    names = {t.name for t in gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors}
    assert {"blk.0.attn_q.bias", "blk.1.attn_k.bias", "output.weight"} <= names
    assert report.arch == "qwen2" and any("on 3/3" in c for c in report.checks)


def test_modelfile_matches_the_chat_template(llama_dir, tmp_path):
    from transformers import AutoTokenizer

    from tunelab.export.gguf import export_gguf
    from tunelab.export.template_check import SAMPLE_CONVERSATIONS, render_go, template_from_modelfile

    report = export_gguf(llama_dir, tmp_path / "out" / "m.gguf", verify=False)
    text = Path(report.modelfile).read_text()
    assert text.count("FROM ./m.gguf") == 1 and 'PARAMETER stop "<|im_end|>"' in text
    tok = AutoTokenizer.from_pretrained(llama_dir)
    for convo in SAMPLE_CONVERSATIONS:
        assert render_go(template_from_modelfile(text), convo) == tok.apply_chat_template(
            convo, tokenize=False, add_generation_prompt=True)


def test_untranslatable_template_fails_clearly_unless_no_modelfile(llama_dir, tmp_path):
    import shutil

    from tunelab.export.gguf import export_gguf

    other = tmp_path / "inst"
    shutil.copytree(llama_dir, other)
    (other / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
    with pytest.raises(TunelabError, match="ChatML"):
        export_gguf(other, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    report = export_gguf(other, tmp_path / "y.gguf", modelfile=False, verify=False)
    assert report.modelfile is None and (tmp_path / "y.gguf").is_file()


def test_export_refuses_adapters_and_other_archs(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from tunelab.export.gguf import export_gguf

    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text("{}")
    with pytest.raises(TunelabError, match="merge"):
        export_gguf(tmp_path / "ad", tmp_path / "a.gguf")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "g")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "g")
    with pytest.raises(TunelabError, match="supports llama, qwen2"):
        export_gguf(tmp_path / "g", tmp_path / "g.gguf")
    with pytest.raises(TunelabError, match="is a folder; give the .gguf file"):  # was found after all the writing
        export_gguf(tmp_path / "g", tmp_path)


def test_template_check_catches_a_changed_template(tiny_tokenizer):
    import copy

    from tunelab.export.template_check import (
        TemplateMismatch,
        check_templates,
        ollama_template,
    )
    from tunelab.model.stop_tokens import stop_token_ids

    tpl = ollama_template(tiny_tokenizer)
    assert check_templates({"training": tiny_tokenizer}, tpl.template) == 4
    changed = copy.deepcopy(tiny_tokenizer)
    changed.chat_template = tiny_tokenizer.chat_template.replace("named SmolLM", "named Bob")
    with pytest.raises(TemplateMismatch, match="named Bob"):
        check_templates({"training": tiny_tokenizer, "merged": changed})
    with pytest.raises(TemplateMismatch):
        check_templates({"training": tiny_tokenizer}, tpl.template.replace("\n{{ .Content }}", "{{ .Content }}"))
    assert tiny_tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tiny_tokenizer)


def test_go_template_subset():
    from tunelab.export.template_check import render_go

    tpl = ('{{- if .Messages }}{{ range $i, $m := .Messages }}{{ if eq $i 0 }}[first]{{ else if eq .Role "user" }}'
           '[u]{{ else }}[o]{{ end }}{{ $m.Content }}|{{ end }}{{ else }}none{{ end -}}  \n')
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "x", "content": "c"}]
    assert render_go(tpl, msgs) == "[first]a|[u]b|[o]c|"
    assert render_go(tpl, []) == "none"


def test_cli_export(llama_dir, tmp_path):
    from tunelab.cli import main

    assert main(["export", "--model", str(llama_dir), "--format", "gguf", "--quant", "q8_0", "--output",
                 str(tmp_path / "c.gguf"), "--no-verify"]) == 0
    assert (tmp_path / "c.gguf").is_file() and (tmp_path / "Modelfile").is_file()
    # a second GGUF in the folder gets its own Modelfile; the first one's still points at c.gguf
    for name in ("d.gguf", "c.gguf"):
        assert main(["export", "--model", str(llama_dir), "--output", str(tmp_path / name), "--no-verify"]) == 0
    assert "FROM ./c.gguf\n" in (tmp_path / "Modelfile").read_text()
    assert "FROM ./d.gguf\n" in (tmp_path / "d.Modelfile").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "c.gguf", "d.Modelfile", "d.gguf"]
    assert main(["export", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "d.gguf")]) == 2
    # --output naming a file that is not a GGUF (here the model's own weights) replaced it with the GGUF
    import shutil

    shutil.copytree(llama_dir, tmp_path / "m")
    weights = next((tmp_path / "m").glob("*.safetensors"))
    before = weights.read_bytes()
    assert main(["export", "--model", str(tmp_path / "m"), "--output", str(weights), "--no-verify"]) == 2
    assert weights.read_bytes() == before


@pytest.mark.slow
def test_bundled_export_matches_llama_cpps_own_conversion(tmp_path):
    """The bundled Q4_1 GGUF was written by llama.cpp's converter. Our export of the same weights (dequantised
    by transformers, which undid llama.cpp's q/k permutation) must put back exactly its layout and metadata."""
    import gguf
    import numpy as np

    from tunelab.export.gguf import export_gguf
    from tunelab.model.loading import bundled_gguf_path, ensure_bundled

    report = export_gguf(ensure_bundled(), tmp_path / "s.gguf", quant="f16")
    print(report.summary())
    ours, theirs = gguf.GGUFReader(str(tmp_path / "s.gguf")), gguf.GGUFReader(str(bundled_gguf_path(
        "bundled:smollm2-135m-instruct")))
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.chat_template", "llama.rope.dimension_count", "llama.attention.head_count_kv",
                "llama.rope.freq_base", "llama.context_length"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    assert ours.fields["tokenizer.ggml.tokens"].contents() == theirs.fields["tokenizer.ggml.tokens"].contents()
    assert ours.fields["tokenizer.ggml.token_type"].contents() == theirs.fields["tokenizer.ggml.token_type"].contents()
    assert ours.fields["tokenizer.ggml.merges"].contents() == theirs.fields["tokenizer.ggml.merges"].contents()
    t_ours = {t.name: t for t in ours.tensors}
    for t in theirs.tensors:
        if not t.name.startswith(("blk.0.", "blk.29.")):
            continue
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        got = gguf.quants.dequantize(t_ours[t.name].data, t_ours[t.name].tensor_type).reshape(want.shape)
        assert np.allclose(got, want, atol=2e-3 * max(1.0, float(np.abs(want).max()))), t.name


def test_a_killed_exports_partial_file_is_removed_by_the_next_export(llama_dir, tmp_path):
    """SIGKILL (the OOM killer) during an export left a full-size hidden .NAME.gguf.tmp-PID that nothing removed."""
    import subprocess
    import sys

    from tunelab.export.gguf import export_gguf
    from tunelab.files import _HOST

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid no process holds now
    orphan = tmp_path / f".m.gguf.tmp-{_HOST}-{dead.pid}"
    orphan.write_bytes(b"GGUF" + b"\0" * 4096)
    elsewhere = tmp_path / f".m.gguf.tmp-{_HOST}x-{dead.pid}"  # another machine's, on shared storage: kept
    elsewhere.write_bytes(b"GGUF")
    export_gguf(llama_dir, tmp_path / "m.gguf", verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [elsewhere.name, "Modelfile", "m.gguf"]


@pytest.mark.parametrize("damage", ["truncate", "no_tokenizer"])
def test_a_damaged_model_folder_is_one_error_not_a_traceback(llama_dir, tmp_path, damage):
    import os
    import shutil

    from tunelab.export.gguf import export_gguf

    folder = tmp_path / "m"
    shutil.copytree(llama_dir, folder)
    if damage == "truncate":
        os.truncate(folder / "model.safetensors", 100_000)
    else:
        (folder / "tokenizer.json").unlink()
    with pytest.raises(TunelabError, match="tokenizer.json is missing" if damage != "truncate" else
                       r"model.safetensors is truncated or damaged"):
        export_gguf(folder, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".m.gguf*"))
