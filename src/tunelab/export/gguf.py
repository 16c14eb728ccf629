"""Export a merged Llama-family model (Llama/SmolLM2, Qwen2/2.5) to GGUF for llama.cpp, plus an Ollama Modelfile.

    report = export_gguf("models/merged", "models/merged.gguf", quant="q8_0")
    print(report.summary())          # then: ollama create my-model -f models/Modelfile

Written with the `gguf` library, following what llama.cpp's convert_hf_to_gguf.py does for these architectures:
- tensor names through gguf's TensorNameMap (model.layers.N.self_attn.q_proj -> blk.N.attn_q, ...);
- Llama q/k weights permuted from Hugging Face's rotate-half layout to llama.cpp's interleaved RoPE pairs
  (Qwen2 uses NEOX RoPE in llama.cpp: no permutation);
- 1-D tensors (norms, biases) stay F32; matrices become F16 or Q8_0 (rows not divisible by 32 fall back to F16);
- a gpt2 (byte-level BPE) tokenizer: tokens, token types (normal/control/user-defined/unused), merges, the
  pre-tokenizer recognised by the same token hash llama.cpp uses, bos/eos/pad/eot ids and the chat template.

The file is checked after writing, three ways: (1) read back with gguf.GGUFReader, every tensor compared with
its source (dequantised, q/k permutation undone) and the metadata with config and tokenizer; (2) loaded by
transformers' own GGUF reader, an independent implementation that undoes the permutation itself, and its
logits and greedy tokens compared with the source model's; (3) when llama.cpp's Python binding is installed
(`pip install 'tunelab[llamacpp]'`), the same prompts must give the same first greedy tokens in llama.cpp.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from functools import partial
from hashlib import sha256
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.files import staging_file, writing
from tunelab.export.template_check import (
    SAMPLE_CONVERSATIONS,
    UnsupportedTemplate,
    check_templates,
    modelfile_text,
    ollama_template,
    render_hf,
    template_from_modelfile,
)
from tunelab.model.stop_tokens import stop_token_ids

log = logging.getLogger(__name__)

ARCHS = {"llama": "LLAMA", "qwen2": "QWEN2"}  # transformers model_type -> gguf.MODEL_ARCH member
QUANTS = {"f16": ("F16", "MOSTLY_F16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "f32": ("F32", "ALL_F32")}
F16_MAX = 65504.0  # float16's largest finite value: a weight beyond it would be inf in an f16 GGUF

# llama.cpp recognises a BPE pre-tokenizer by hashing the token ids of this text (convert_hf_to_gguf.py).
CHK_TXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
           "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
           "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
           "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
KNOWN_PRE = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3 tokenizer variant
}


class ExportError(TunelabError):
    """The model cannot be exported, or the exported file does not match its source."""


@dataclass
class ExportReport:
    output: str
    arch: str
    quant: str
    tensors: int = 0
    size_bytes: int = 0
    modelfile: str | None = None
    checks: list[str] = field(default_factory=list)
    llama_cpp: str = "skipped"
    kept_f16: int = 0  # q8_0: matrices whose rows are not whole 32-value blocks, stored in f16

    def summary(self) -> str:
        lines = [f"wrote {self.output} ({self.arch}, {self.quant}, {self.tensors} tensors, "
                 f"{self.size_bytes / 2**20:.1f} MiB)"]
        if self.kept_f16:
            lines.append(f"note: {self.kept_f16} matrices kept in f16: their rows are not a multiple of 32 values, "
                         "the q8_0 block (as llama.cpp's converter does)")
        if self.modelfile:
            lines.append(f"wrote {self.modelfile}: ollama create NAME -f {self.modelfile}")
        lines += [f"check: {c}" for c in self.checks]
        lines.append(f"llama.cpp: {self.llama_cpp}")
        return "\n".join(lines)


def permute_qk(w, n_head: int, n_head_kv: int | None = None):
    """HF rotate-half layout -> llama.cpp interleaved pairs, per head (as convert_hf_to_gguf.py's permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w, n_head: int, n_head_kv: int | None = None):
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _pre_tokenizer(tokenizer) -> str:
    chkhsh = sha256(str(tokenizer.encode(CHK_TXT, add_special_tokens=False)).encode()).hexdigest()
    if chkhsh not in KNOWN_PRE:
        raise ExportError(f"llama.cpp would not recognise this tokenizer's pre-tokenizer (token hash {chkhsh}); "
                          f"supported: SmolLM/SmolLM2 and Qwen2-family tokenizers")
    return KNOWN_PRE[chkhsh]


def _vocab(tokenizer, vocab_size: int):
    """Token strings and types as convert_hf_to_gguf.py's get_vocab_base builds them."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tok = reverse[i]
        if tok in added:
            if decoder[i].special or (tok.startswith("<|") and tok.endswith("|>")):
                types.append(gguf.TokenType.CONTROL)
            else:
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(tok)
    return tokens, types


def _load_state(model_dir: Path) -> dict:
    """name -> float32 numpy array, from model.safetensors or a sharded index."""
    import torch
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{model_dir} has no .safetensors weights; export a merged model folder (tunelab merge)")
    state = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                state[name] = sf.get_tensor(name).to(torch.float32).numpy()
    return state


def _writer(model_dir: Path, tmp: Path, cfg, tok, quant: str, stops: list[int]):
    """The GGUF file's writer, holding every tensor and key but nothing written yet (`stops`: `stop_token_ids`, the
    tokenizer's eos first); returns (writer, arch name, {gguf name: (source name, source array, permuted?)}, heads,
    how many matrices q8_0 kept in f16)."""
    import gguf
    import numpy as np

    arch_enum = getattr(gguf.MODEL_ARCH, ARCHS[cfg.model_type])
    arch = gguf.MODEL_ARCH_NAMES[arch_enum]
    qtype_name, ftype_name = QUANTS[quant]
    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", 10000.0)}
    if (rope.get("rope_type") or "default") != "default":
        raise ExportError(f"rope type {rope.get('rope_type')!r} is not supported by tunelab's GGUF export")

    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(model_dir.name)
    w.add_file_type(getattr(gguf.LlamaFileType, ftype_name))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(cfg.vocab_size)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer(tok))
    tokens, types = _vocab(tok, cfg.vocab_size)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise ExportError(f"{model_dir}/tokenizer.json has no BPE merges: only byte-level BPE (gpt2-style) "
                          "tokenizers are supported")
    if special.chat_template is None:
        special.chat_template = tok.chat_template
    special.add_to_gguf(w, quiet=True)
    eot = [i for i in stops if i != tok.eos_token_id]
    if eot:  # GGUF holds one eos and one eot id; llama.cpp also ends on <|endoftext|>/<|im_end|> by their text
        w.add_eot_token_id(eot[0])

    state = _load_state(model_dir)
    tmap = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    written, kept_f16 = {}, 0
    for name, data in state.items():
        if name.endswith(".rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ExportError(f"no GGUF name for tensor {name!r} ({cfg.model_type}); is this a merged model?")
        permuted = arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight"))
        if permuted:
            data = permute_qk(data, n_head, n_head if name.endswith("q_proj.weight") else n_kv)
        if data.ndim <= 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(new, data.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(data, qtype)
            w.add_tensor(new, q, raw_dtype=qtype)
        else:  # f16, and under q8_0 a matrix whose rows are not whole 32-value blocks (llama.cpp does the same)
            _refuse_beyond_f16(name, data, quant)
            w.add_tensor(new, data.astype(np.float16))
            kept_f16 += qtype == gguf.GGMLQuantizationType.Q8_0
        written[new] = (name, state[name], permuted)
    return w, arch, written, (n_head, n_kv), kept_f16


def _refuse_beyond_f16(name: str, data, quant: str) -> None:
    import numpy as np

    peak = float(np.abs(data).max()) if data.size else 0.0
    if peak > F16_MAX:
        raise ExportError(f"{name} holds weights up to {peak:.3g}, beyond float16's largest value ({F16_MAX:.0f}): "
                          f"a {quant} GGUF would hold inf there. Export with --quant f32 (4 bytes per weight)")


def _save(w) -> None:
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()  # flushes the last buffer: a full disk can surface here too


def _generation_config(model_dir: Path):
    """The folder's GenerationConfig, or None when it has none."""
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(model_dir) if (model_dir / "generation_config.json").is_file() else None


def _field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _check_readback(path: Path, model_dir: Path, cfg, tok, arch: str, written: dict, heads):
    """Every tensor and the key metadata, read back with GGUFReader, against the source."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(str(path))  # parsing 49k tokens + merges takes seconds: read once, return it
    problems = []
    want = {"general.architecture": arch, f"{arch}.block_count": cfg.num_hidden_layers,
            f"{arch}.embedding_length": cfg.hidden_size, f"{arch}.attention.head_count": heads[0],
            f"{arch}.attention.head_count_kv": heads[1], "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.eos_token_id": tok.eos_token_id, "tokenizer.chat_template": tok.chat_template}
    if tok.bos_token_id is not None:
        want["tokenizer.ggml.bos_token_id"] = tok.bos_token_id
    for key, value in want.items():
        if _field(r, key) != value:
            problems.append(f"{key} = {_field(r, key)!r}, expected {value!r}")
    tokens = _field(r, "tokenizer.ggml.tokens")
    vocab = tok.get_vocab()
    if len(tokens) != cfg.vocab_size or any(vocab.get(t, i) != i for i, t in enumerate(tokens)):
        problems.append("tokenizer.ggml.tokens differs from the tokenizer's vocabulary")
    merges = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"].get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    if _field(r, "tokenizer.ggml.merges") != merges:
        problems.append("tokenizer.ggml.merges differs from tokenizer.json's merges")
    seen = set()
    for t in r.tensors:
        seen.add(t.name)
        if t.name not in written:
            problems.append(f"unexpected tensor {t.name}")
            continue
        src_name, src, permuted = written[t.name]
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(src.shape).astype(np.float32)
        if permuted:
            data = unpermute_qk(data, heads[0], heads[0] if src_name.endswith("q_proj.weight") else heads[1])
        err = float(np.abs(data - src).max()) if src.size else 0.0
        # F32 exact; F16 keeps 11 bits (~5e-4 relative); Q8_0 rounds to max|block|/127 steps
        limit = {gguf.GGMLQuantizationType.F32: 0.0, gguf.GGMLQuantizationType.F16: 1e-3}.get(t.tensor_type, 1 / 127)
        if err > limit * max(1.0, float(np.abs(src).max())):
            problems.append(f"{t.name} ({src_name}) differs from the source by {err:.3g}")
    problems += [f"tensor {n} missing" for n in set(written) - seen]
    if problems:
        raise ExportError(f"{path} does not match its source:\n  " + "\n  ".join(problems[:20]))
    return f"GGUFReader: {len(r.tensors)} tensors and metadata match the source", r


def _greedy(model, ids, n: int) -> list[int]:
    import torch

    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _check_transformers(path: Path, model_dir: Path, tok, quant: str, n_tokens: int) -> tuple[str, list]:
    """Reload the GGUF with transformers' GGUF reader; compare logits and greedy tokens with the source."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.model.loading import quiet_local_loading

    with quiet_local_loading(model_dir):
        src = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        ggm = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                   config=src.config).eval()  # the config is checked by readback
    gtok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    prompts = [render_hf(tok, c) for c in SAMPLE_CONVERSATIONS[:3]]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if [gtok(p, add_special_tokens=False)["input_ids"] for p in prompts] != ids:
        raise ExportError("the tokenizer read back from the GGUF splits the sample prompts differently")
    with torch.inference_mode():
        a = [src(input_ids=torch.tensor([x])).logits[0] for x in ids]
        b = [ggm(input_ids=torch.tensor([x])).logits[0] for x in ids]
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
    scale = max(float(x.abs().max()) for x in a) or 1.0
    want = [_greedy(src, x, n_tokens) for x in ids]
    got = [_greedy(ggm, x, n_tokens) for x in ids]
    first_ok = all(w[:1] == g[:1] for w, g in zip(want, got))
    limit = 0.15 if quant == "q8_0" else 0.05
    if diff / scale > limit or not first_ok:
        raise ExportError(f"the GGUF, read by transformers, disagrees with the source: max |logit diff| {diff:.3g} "
                          f"({diff / scale:.1%}), first greedy tokens {got} vs {want}")
    same = sum(w == g for w, g in zip(want, got))
    return (f"transformers GGUF reload: max |logit diff| {diff:.3g} ({diff / scale:.2%}), first greedy token equal "
            f"on {len(ids)}/{len(ids)} prompts, all {n_tokens} greedy tokens equal on {same}/{len(ids)}"), want


def _check_llama_cpp(path: Path, tok, want: list[list[int]], n_tokens: int) -> str:
    try:
        from llama_cpp import Llama
    except ImportError:
        return "verification by llama.cpp skipped (llama-cpp-python not installed: pip install 'tunelab[llamacpp]')"
    # use_extra_bufts=False: llama.cpp's AMX kernels crash on some Xeons (see docs/machine-notes)
    try:
        llm = Llama(model_path=str(path), n_ctx=1024, verbose=False, use_extra_bufts=False, seed=0)
    except TypeError:
        return "verification by llama.cpp skipped (this llama-cpp-python has no use_extra_bufts option)"
    except Exception as e:  # noqa: BLE001 - llama.cpp refusing the file is the failure this check looks for
        raise ExportError(f"llama.cpp could not load {path.name}: {e}") from None
    prompts = [render_hf(tok, c) for c in SAMPLE_CONVERSATIONS[:3]]
    got = []
    for p in prompts:
        ids = llm.tokenize(p.encode(), add_bos=False, special=True)
        if ids != tok(p, add_special_tokens=False)["input_ids"]:
            raise ExportError("llama.cpp tokenises the sample prompts differently from the tokenizer")
        llm.reset()
        out = []
        for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
            out.append(int(t))
            if len(out) == n_tokens:
                break
        got.append(out)
    if any(w[:1] != g[:1] for w, g in zip(want, got)):
        raise ExportError(f"llama.cpp's first greedy tokens {got} differ from transformers' {want}")
    same = sum(w == g for w, g in zip(want, got))
    return f"verified: same first greedy token on {len(got)}/{len(got)} prompts ({same} equal over {n_tokens} tokens)"


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def export_gguf(model_dir: str | os.PathLike, output: str | os.PathLike, quant: str = "f16", modelfile: bool = True,
                verify: bool = True, n_tokens: int = 8) -> ExportReport:
    """Write `output` (.gguf) from a merged model folder, and an Ollama `Modelfile` beside it; verify both."""
    from transformers import AutoConfig, AutoTokenizer

    from tunelab.model.loading import refuse_damaged_folder

    model_dir, output = Path(model_dir), Path(output)
    if quant not in QUANTS:
        raise ExportError(f"unknown quant {quant!r}; choose {' or '.join(QUANTS)}")
    if output.is_dir():  # found before the minutes of writing and verifying, not after
        raise ExportError(f"--output {output} is a folder; give the .gguf file to write, e.g. {output / 'model.gguf'}")
    if output.is_file() and _magic(output) != b"GGUF":  # e.g. the model's own model.safetensors
        raise ExportError(f"--output {output} exists and is not a GGUF file: the export would replace it; give "
                          "another file name")
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir} is not a model folder (no config.json); merge an adapter first: "
                          "tunelab merge --adapter RUN --output DIR")
    if (model_dir / "adapter_config.json").is_file():
        raise ExportError(f"{model_dir} is an adapter; merge it first: "
                          f"tunelab merge --adapter {model_dir} --output DIR")
    refuse_damaged_folder(model_dir)  # a truncated weights file or no tokenizer.json: one error, not a traceback
    cfg = AutoConfig.from_pretrained(model_dir)
    if cfg.model_type not in ARCHS:
        raise ExportError(f"GGUF export supports {', '.join(ARCHS)} models, not {cfg.model_type!r}")
    tok = AutoTokenizer.from_pretrained(model_dir)
    tpl = None
    if modelfile:
        try:
            tpl = ollama_template(tok)
        except UnsupportedTemplate as e:
            raise ExportError(f"cannot write the Ollama Modelfile: {e}") from None

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_file(output)  # renamed into place once verified
    stops = stop_token_ids(tok, _generation_config(model_dir))  # merge wrote the base model's eos ids there
    if tpl is not None:  # Ollama stops on strings: every stop id's token, as serve and merge stop on the ids
        tpl.stop += [s for s in tok.convert_ids_to_tokens(stops) if s not in tpl.stop]
    modelfile_body = modelfile_text(output.name, tpl) if tpl is not None else None
    mf = _modelfile_path(output) if modelfile_body is not None else None
    tmp_mf = staging_file(mf) if mf else None
    # the GGUF and its Modelfile are written beside their places and renamed in together: a failure leaves neither
    writes = partial(writing, f"the GGUF export {output}", output.parent, ExportError,
                     f"Nothing was written to {output} and no partial file was left", "export again")
    try:
        w, arch, written, heads, kept_f16 = _writer(model_dir, tmp, cfg, tok, quant, stops)
        with writes():
            _save(w)
        report = ExportReport(str(output), arch, quant, tensors=len(written), size_bytes=tmp.stat().st_size,
                              kept_f16=kept_f16)
        if verify:
            msg, reader = _check_readback(tmp, model_dir, cfg, tok, arch, written, heads)
            report.checks.append(msg)
            gguf_tok = AutoTokenizer.from_pretrained(model_dir)
            gguf_tok.chat_template = _field(reader, "tokenizer.chat_template")
            del reader
            tokenizers = {"model folder": tok, "GGUF metadata": gguf_tok}
            n = check_templates(tokenizers, template_from_modelfile(modelfile_body) if modelfile_body else None)
            report.checks.append(f"chat template: {n} sample conversations render identically from the "
                                 f"{' and the '.join(tokenizers)}{' and the Modelfile TEMPLATE' if tpl else ''}")
            msg, want = _check_transformers(tmp, model_dir, tok, quant, n_tokens)
            report.checks.append(msg)
            report.llama_cpp = _check_llama_cpp(tmp, tok, want, n_tokens)
        else:
            report.llama_cpp = "not verified (--no-verify)"
        if tmp_mf is not None:
            with writes():
                tmp_mf.write_text(modelfile_body, encoding="utf-8")
        os.replace(tmp, output)
        if tmp_mf is not None:
            os.replace(tmp_mf, mf)
            report.modelfile = str(mf)
    finally:
        tmp.unlink(missing_ok=True)
        if tmp_mf is not None:
            tmp_mf.unlink(missing_ok=True)
    return report


def _modelfile_path(output: Path) -> Path:
    """`Modelfile` beside the GGUF, unless that one belongs to another GGUF of the folder: then `<name>.Modelfile`
    (a second export into a folder must not repoint the first one's Modelfile)."""
    plain = output.parent / "Modelfile"
    try:
        text = plain.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return plain
    return plain if f"\nFROM ./{output.name}\n" in f"\n{text}" else output.with_suffix(".Modelfile")
