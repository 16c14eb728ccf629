"""The one place peft and bitsandbytes objects are built from our schema (translate at the boundary)."""

from __future__ import annotations

import logging
import math
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tunelab.config import Config
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)


@contextmanager
def without_bitsandbytes() -> Iterator[None]:
    """Importing peft and adding adapters with bitsandbytes hidden, unless it is loaded already.

    With bitsandbytes installed, peft 0.21 imports it when peft is imported (`peft.helpers`) and when it adds
    adapters (its 8-/4-bit layer dispatchers), whatever the model: 30-90 MiB (~50 on average) of a LoRA training
    process's peak RSS and ~2 s of start-up (docs/perf-notes.md section 16). A model with bitsandbytes layers has
    imported it already (transformers' quantiser, QLoRA's `bnb_config`), and then nothing is hidden; otherwise none of
    its layers can be bitsandbytes layers, so peft's checks can only come out "no". Inside, `import bitsandbytes`
    fails and find_spec finds nothing; afterwards the package is visible again and the availability checks that cache
    their answer (peft's, transformers') are cleared, so a QLoRA run later in the same process finds it."""
    if "bitsandbytes" in sys.modules:
        yield
        return
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
            del sys.modules["bitsandbytes"]
        checks = [getattr(sys.modules.get("peft.import_utils"), n, None) for n in ("is_bnb_available",
                                                                                  "is_bnb_4bit_available")]
        checks.append(getattr(sys.modules.get("transformers.utils.import_utils"), "is_bitsandbytes_available", None))
        for check in checks:
            getattr(check, "cache_clear", lambda: None)()


@contextmanager
def peft_calls() -> Iterator[None]:
    """Around tunelab's imports of peft and its calls that add or load adapters: bitsandbytes hidden
    (`without_bitsandbytes`), and not reported the FutureWarning peft 0.21 causes each time it wraps a model (it reads
    transformers' renamed `is_gradient_checkpointing`): harmless, and noise in every run, for library callers too."""
    with without_bitsandbytes(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def bnb_config(cfg: Config, compute_dtype):
    """4-bit NF4 (or FP4) with optional double quantisation, for training.method=qlora."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TunelabError("training.method=qlora needs bitsandbytes: pip install 'tunelab[qlora]'") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quantization.quant_type,
                              bnb_4bit_use_double_quant=cfg.quantization.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype)


def lora_config(cfg: Config, tie_embeddings: bool = False):
    """The peft LoraConfig of our schema. `tie_embeddings`: the model ties its input and output embeddings and the
    adapter trains one of them (see `adapts_tied_embeddings`), so peft must keep the two tied."""
    with peft_calls():
        from peft import LoraConfig, TaskType

    lc = cfg.lora
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                      target_modules=lc.target_modules, modules_to_save=lc.modules_to_save or None,
                      use_rslora=lc.use_rslora, use_dora=cfg.training.method == "dora", bias=lc.bias,
                      ensure_weight_tying=tie_embeddings)


def adapts_tied_embeddings(model: Any, cfg: Config) -> bool:
    """True when the model ties lm_head to the input embeddings and lora.modules_to_save (or a target_modules
    list) names one of them. Without peft's weight tying the two copies would train apart, and a merged model,
    reloaded with tie_word_embeddings=True, would silently drop the trained output head (peft issue 2777)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    embeddings = {model.get_input_embeddings(), model.get_output_embeddings()}
    leaf_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module in embeddings}
    named = set(cfg.lora.modules_to_save)
    if isinstance(cfg.lora.target_modules, list):
        named |= set(cfg.lora.target_modules)
    return any(n.rsplit(".", 1)[-1] in leaf_names for n in named)


def apply_method(model: Any, cfg: Config, say: Callable[[str], None] | None = None) -> Any:
    """Return the model to train: a peft model for lora/qlora/dora, the model itself (all weights) for full.
    `say`: where a warning line goes (the run's output); by default this module's logger."""
    method = cfg.training.method
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    with peft_calls():
        from peft import get_peft_model, prepare_model_for_kbit_training

    refuse_unmatched_modules(model, cfg)
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.training.gradient_checkpointing)
    # adapters stay fp32 (autocast_adapter_dtype) while the frozen base may be bf16
    try:
        with peft_calls():
            model = get_peft_model(model, lora_config(cfg, adapts_tied_embeddings(model, cfg)),
                                   autocast_adapter_dtype=True)
    except ValueError as e:  # e.g. a lora.target_modules entry that names a module peft cannot adapt
        raise TunelabError(f"lora: {str(e).splitlines()[0][:300]} ({_linear_layers_hint(model)})") from None
    warning = rank_warning(model, cfg)
    if warning:
        (say or log.warning)(warning)
    return model


def _linear_layers_hint(model: Any) -> str:
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
    return f"this model's linear layers: {', '.join(linear)}; or use lora.target_modules: all-linear"


def refuse_unmatched_modules(model: Any, cfg: Config) -> None:
    """Every lora.target_modules and lora.modules_to_save entry must name a module of the model. peft raises only
    when no target matches at all and skips the rest without a word (and adapter_config.json still lists them), so
    `[q_proj, c_attn]` on a Llama trained q_proj alone. The rules are peft 0.21's: a target matches a module whose
    dotted name is it or ends with "." + it (check_target_module_exists); a module to save, one whose name ends with
    it (_set_trainable). `all-linear` is peft's to resolve."""
    names = [n for n, _ in model.named_modules(remove_duplicate=False)]  # tied modules under both names
    targets = cfg.lora.target_modules if isinstance(cfg.lora.target_modules, list) else []
    unmatched = {
        "lora.target_modules": [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)],
        "lora.modules_to_save": [m for m in cfg.lora.modules_to_save if not any(n.endswith(m) for n in names)],
    }
    problems = [f"{key} {', '.join(map(repr, entries))}" for key, entries in unmatched.items() if entries]
    if problems:
        raise TunelabError(f"lora: no module of this model matches {' and '.join(problems)} "
                           f"({_linear_layers_hint(model)})")


def rank_warning(model: Any, cfg: Config) -> str | None:
    """A line when lora.r exceeds the width of an adapted layer: there the update's rank cannot pass min(in, out),
    while the scale still falls to alpha/r (alpha/sqrt(r) with rslora). Allowed, as some do it on purpose."""
    widths = [(min(m.in_features, m.out_features), n.removeprefix("base_model.model."))
              for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "in_features")]
    if not widths:
        return None
    width, name = min(widths)
    r = cfg.lora.r
    if r <= width:
        return None
    scale = cfg.lora.alpha / (math.sqrt(r) if cfg.lora.use_rslora else r)
    return (f"warning: lora.r={r} exceeds the width of the narrowest adapted layer ({name}: {width}); its update has "
            f"rank at most {width} while the scale is {scale:g} (lora.r <= {width} avoids this)")


def parameter_counts(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for p in model.parameters():
        # a bitsandbytes 4-bit tensor packs two values per byte; count logical parameters
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
    return trainable, total
