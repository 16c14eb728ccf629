"""Merge a LoRA/DoRA/QLoRA adapter into its base model and prove the merged model computes the same thing.

    report = merge_adapter("outputs/my-run", "models/merged", dtype="bf16")
    print(report.summary())

The output is a standalone folder that plain `transformers.AutoModelForCausalLM.from_pretrained` loads: weights
(safetensors), config, the tokenizer with the chat template used in training, and a generation_config whose
eos_token_id holds the stop ids of `stop_token_ids` (EOS, the template's end-of-turn token and the base model's
own generation_config eos ids), so generation stops after one answer where the adapter's would. A
`tunelab.json` records where it came from and the verification figures.

How it is verified: a few chat samples go through the adapter model (fp32 base + adapter, unmerged) and through
the merged folder as saved, reloaded in the output dtype. The max |logit difference| and the share of positions
whose greedy (argmax) token agrees are printed; beyond the tolerance the merge fails and nothing is written.

QLoRA adapters were trained against 4-bit (NF4) weights. Merging into 4-bit weights would round the update away,
so the base is reloaded in full precision (fp32) and the adapter merged there; the report says so.

For method=full the checkpoint already is a model: it is copied into the same standalone form and verified alike.
The output folder is written to a temporary folder beside it and renamed into place only once verified. A folder
already there is replaced only if an earlier merge wrote it (its tunelab.json says so) and it holds nothing else;
other files in it (notes, a GGUF exported from it) are named and the merge refused, unless `overwrite`.
"""

from __future__ import annotations

import json
import math
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from functools import partial
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.files import as_umask_allows, remove_orphans, staging_dir, swap_into_place, writing
from tunelab.export.template_check import SAMPLE_CONVERSATIONS, check_templates
from tunelab.model.stop_tokens import stop_token_ids

log = logging.getLogger(__name__)

# Max |logit difference| allowed between the adapter model (fp32) and the merged model in the output dtype,
# relative to the largest |logit| of the reference (SmolLM2-135M's logits reach ~25-35).
# fp32: only summation order differs (W+BA)x vs Wx+B(Ax): ~1e-6 relative. bf16 keeps 8 bits of mantissa, so
# rounding 30 layers of weights moves logits by a few percent; fp16 keeps 11 bits.
DEFAULT_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 1e-1}
# Share of positions whose argmax token must agree. Rounding can flip near-ties in bf16/fp16, never in fp32.
MIN_AGREEMENT = {"fp32": 1.0, "fp16": 0.97, "bf16": 0.9}


class MergeError(TunelabError):
    """The merge could not be done, or the merged model does not match the adapter model."""


@dataclass
class MergeReport:
    output: str
    adapter: str
    base_model: str
    method: str
    dtype: str
    verified: bool = False
    max_logit_diff: float | None = None
    relative_diff: float | None = None
    token_agreement: float | None = None
    positions: int = 0
    tolerance: float | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"merged {self.adapter} ({self.method}) into {self.base_model} -> {self.output} [{self.dtype}]"]
        lines += [f"note: {n}" for n in self.notes]
        if self.verified:
            lines.append(f"verified on {self.positions} positions: max |logit diff| {self.max_logit_diff:.3g} "
                         f"({self.relative_diff:.2%} of the largest logit; tolerance {self.tolerance:.2%}), "
                         f"greedy-token agreement {self.token_agreement:.1%}")
        else:
            lines.append("verification skipped (--no-verify)")
        lines.append(f"generation stops on token ids {self.eos_token_ids}")
        return "\n".join(lines)


def _sample_ids(tokenizer) -> list[list[int]]:
    """Token ids of complete chat samples (prompt + an answer): logits are compared at every position."""
    from tunelab.data.template import render

    samples = []
    for convo in SAMPLE_CONVERSATIONS[:3]:
        text = render(tokenizer, convo + [{"role": "assistant", "content": "Paris is the capital of France."}])
        samples.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return samples


def _logits(model, samples: list[list[int]]):
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in samples]


def compare_logits(reference, candidate) -> tuple[float, float, float, int]:
    """(max |diff|, max |diff| / max |reference|, argmax agreement, positions)."""
    diff = max(float((r - c).abs().max()) for r, c in zip(reference, candidate))
    scale = max(float(r.abs().max()) for r in reference) or 1.0
    agree = sum(int((r.argmax(-1) == c.argmax(-1)).sum()) for r, c in zip(reference, candidate))
    n = sum(r.shape[0] for r in reference)
    return diff, diff / scale, agree / n, n


def prepare_output(output: Path, option: str = "--output", overwrite: bool = False) -> None:
    """A merge may write `output` (given as `option`): new, empty, or a model an earlier merge wrote and nothing else
    (`overwrite`: other files in it too, deleted with it). Checked before any work, and again before the swap."""
    remove_orphans(output)  # a killed merge's earlier model, renamed aside, is put back first: then judged
    if output.exists() and not output.is_dir():
        raise MergeError(f"{option} {output} is a file; choose a folder")
    if output.is_dir() and any(output.iterdir()):
        extra = _not_merge_output(output, option)
        if extra and not overwrite:
            # not moved into the new folder either: a GGUF or Modelfile exported there holds the old weights
            hint = " (or merge with --overwrite to delete them with the old model)" if option == "--output" else ""
            raise MergeError(f"{output} holds an earlier merge and files the merge did not write: {', '.join(extra)}. "
                             f"A merge replaces the whole folder (and a GGUF exported from the old weights would no "
                             f"longer match the new ones): move them elsewhere{hint}, or choose another {option}")
    output.parent.mkdir(parents=True, exist_ok=True)


# What a merge writes, for a tunelab.json from before it listed them (`files`): tokenizer files vary by tokenizer.
_MERGE_FILES = ("config.json", "generation_config.json", "tunelab.json", "model*.safetensors",
                "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
                "chat_template.*", "vocab.json", "merges.txt")


def _not_merge_output(output: Path, option: str) -> list[str]:
    """The names in `output` that an earlier merge did not write; MergeError if no merge wrote it (only a folder
    tunelab merge made is replaced whole: a model or notes put there by hand are not ours to delete)."""
    if not (output / "config.json").is_file():
        raise MergeError(f"{output} exists and is not a model folder; choose another {option} or empty it")
    try:
        record = json.loads((output / "tunelab.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or "merged_from" not in record:
        raise MergeError(f"{output} holds a model that tunelab merge did not write (no tunelab.json recording "
                         f"merged_from) and a merge replaces only its own: choose another {option}, or move it away")
    names = sorted(p.name for p in output.iterdir())
    if isinstance(record.get("files"), list):
        return [n for n in names if n not in record["files"]]
    return [n for n in names if not any(fnmatch(n, pattern) for pattern in _MERGE_FILES)]


def _refuse_own_sources(output: Path, adapter_dir: Path, base_name: str) -> None:
    """The output must not be (inside, or hold) what the merge reads: the adapter, or the base model's folder — a
    merged copy over the base would leave the run's adapter on top of weights it already holds."""
    from tunelab.model.loading import resolve_model_path

    base = Path(resolve_model_path(base_name))
    out = output.expanduser().resolve()
    for what, src in (("the adapter", adapter_dir), ("the adapter's base model", base)):
        if not src.exists():
            continue  # a hub id
        src = src.resolve()
        if out == src or out in src.parents or src in out.parents:
            raise MergeError(f"--output {output} would overwrite {what} ({src}), which this merge reads; choose "
                             "another --output")


def _load_reference(adapter_dir: Path, meta: dict, base: str | None = None):
    """(the model the adapter defines, in fp32 and unmerged; the training tokenizer; base name; notes). `base`: the
    base weights to merge into when not the recorded ones (moved, or other weights of the same shapes on purpose)."""
    from tunelab.model.loading import base_model_of, load_pretrained

    notes = []
    model, tok = load_pretrained(base, adapter=adapter_dir, dtype="fp32")
    if not (adapter_dir / "adapter_config.json").is_file():  # method=full: the checkpoint is the model
        return model, tok, meta.get("base_model", str(adapter_dir)), notes
    if meta.get("method", "lora") == "qlora":
        notes.append("QLoRA adapter: merged into a full-precision (fp32) copy of the base model, never into the "
                     "4-bit weights it was trained against; expect small differences from the 4-bit model")
    return model, tok, base or base_model_of(adapter_dir), notes


def merge_adapter(adapter: str | os.PathLike, output: str | os.PathLike, dtype: str = "fp32", verify: bool = True,
                  tolerance: float | None = None, overwrite: bool = False, model: str | None = None) -> MergeReport:
    """Merge `adapter` (a run folder or checkpoint) into its base (`model`: other base weights than the recorded
    ones); write a standalone model folder at `output` (`overwrite`: replacing an earlier merge there that holds
    other files too, e.g. a GGUF exported from it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from tunelab.model.loading import quiet_local_loading, read_tunelab_json, resolve_adapter_dir

    if dtype not in DEFAULT_TOLERANCE:
        raise MergeError(f"unknown dtype {dtype!r}; choose fp32, bf16 or fp16")
    if tolerance is not None and not 0 < tolerance < math.inf:  # nan would compare false: never a failure
        raise MergeError(f"the tolerance must be a number above 0, not {tolerance}")
    adapter_dir = resolve_adapter_dir(adapter)
    meta = read_tunelab_json(adapter_dir)
    method = meta.get("method") or ("lora" if (adapter_dir / "adapter_config.json").is_file() else "full")
    output = Path(output)
    prepare_output(output, overwrite=overwrite)

    unmerged, tok, base_name, notes = _load_reference(adapter_dir, meta, model)
    _refuse_own_sources(output, adapter_dir, base_name)
    for n in notes:
        log.warning(n)
    report = MergeReport(str(output), str(adapter_dir), base_name, method, dtype, notes=notes,
                         tolerance=tolerance if tolerance is not None else DEFAULT_TOLERANCE[dtype])
    samples = _sample_ids(tok)
    reference = _logits(unmerged, samples) if verify else None

    merged = unmerged.merge_and_unload() if hasattr(unmerged, "merge_and_unload") else unmerged
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    merged = merged.to(torch_dtype)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(merged.config, attr):
            delattr(merged.config, attr)
    merged.config.dtype = torch_dtype

    stops = stop_token_ids(tok, merged.generation_config)  # the base model's own eos ids too, before it is replaced
    gen = GenerationConfig.from_model_config(merged.config)
    gen.eos_token_id = stops if len(stops) > 1 else stops[0]
    gen.pad_token_id = tok.pad_token_id
    gen.bos_token_id = tok.bos_token_id
    report.eos_token_ids = stops
    merged.generation_config = gen

    # every write into the staging folder: a failure (a full disk) names the output; the finally removes the folder
    written = partial(writing, f"the merged model {output}", output.parent, MergeError,
                      f"Nothing was written to {output} and no partial copy was left", "merge again")
    with written():
        tmp = staging_dir(output)
    try:
        with written():
            merged.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        del merged, unmerged
        if verify:
            with quiet_local_loading(tmp):
                reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch_dtype).eval()
            diff, rel, agree, n = compare_logits(reference, _logits(reloaded, samples))
            del reloaded
            report.verified, report.max_logit_diff, report.relative_diff = True, diff, rel
            report.token_agreement, report.positions = agree, n
            if rel > report.tolerance or agree < MIN_AGREEMENT[dtype]:
                raise MergeError(
                    f"the merged model does not match the adapter model: max |logit diff| {diff:.4g} "
                    f"({rel:.2%} of the largest logit, tolerance {report.tolerance:.2%}), greedy-token agreement "
                    f"{agree:.1%} (need {MIN_AGREEMENT[dtype]:.0%}). Nothing was written to {output}. Try --dtype "
                    "fp32, or check that the adapter matches its base model")
        check_templates({"training": tok, "merged": AutoTokenizer.from_pretrained(tmp)})
        # merged_from absolute: found again from any working folder (the dashboard's Export checks it)
        record = {"merged_from": str(Path(adapter_dir).resolve()), "base_model": base_name,
                  "revision": meta.get("revision"), "trust_remote_code": bool(meta.get("trust_remote_code")),
                  "method": method, "dtype": dtype,
                  "run_name": meta.get("run_name"), "verification": {k: v for k, v in asdict(report).items() if k in (
                      "verified", "max_logit_diff", "relative_diff", "token_agreement", "positions", "tolerance")},
                  "eos_token_ids": stops, "notes": notes,
                  "files": sorted([p.name for p in tmp.iterdir()] + ["tunelab.json"])}  # what a re-merge may replace
        with written():
            (tmp / "tunelab.json").write_text(json.dumps(record, indent=2) + "\n")
        as_umask_allows(tmp)
        prepare_output(output, overwrite=overwrite)  # again: files may have been put there while this merge ran
        swap_into_place(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
