"""Evaluate a model on canonical records, and `tunelab eval`: load, evaluate (optionally base too), write results.

    from tunelab.evaluate import evaluate_records
    result = evaluate_records(model, tokenizer, val_records, ["perplexity", "bleu", "rouge"])
    result.metrics["perplexity"], result.predictions[0]["prediction"]

    from tunelab.evaluate import run_eval
    out = run_eval(adapter="outputs/my-run", data="outputs/my-run/data", compare_base=True)
    out.json_path   # outputs/my-run/eval/val.json
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tunelab.errors import TunelabError
from tunelab.evaluate.metrics import ALL_METRICS, GENERATION_METRICS

METRIC_ALIASES = {"rouge_l": "rouge", "rougel": "rouge", "ppl": "perplexity", "em": "exact_match",
                  "exact-match": "exact_match"}


RAW_STAGES = ("pt", "dpo", "orpo", "simpo", "kto")  # runs whose raw data files prepare reads their own way (else sft)


class EvalError(TunelabError):
    """Evaluation could not run as asked; the message says what to change."""


@dataclass
class EvalResult:
    metrics: dict[str, float]  # perplexity, eval_loss, eval_tokens, bleu, chrf, rouge_l, exact_match (as asked)
    predictions: list[dict[str, Any]]  # {index, prompt, messages, reference, prediction, scores}
    settings: dict[str, Any] = field(default_factory=dict)


def normalize_metrics(metrics: Sequence[str] | str) -> list[str]:
    if isinstance(metrics, str):
        metrics = [m for m in re.split(r"[,\s]+", metrics) if m]
    out, unknown = [], []
    for m in metrics:
        key = METRIC_ALIASES.get(m.strip().lower(), m.strip().lower())
        (out if key in ALL_METRICS else unknown).append(key)
    if unknown:
        raise EvalError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(ALL_METRICS)}")
    if not out:  # an empty result would replace the last one in eval/<name>.json
        raise EvalError(f"no metric given; choose from {', '.join(ALL_METRICS)}")
    return list(dict.fromkeys(out))


def within_context(model, max_length: int, settings: dict[str, Any]) -> int:
    """`max_length` cut to the model's positions (scores past them mean nothing; generation stops there too,
    tunelab.infer); a cut is recorded in `settings` (max_length_asked) and said by `run_eval`."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(context, int) or max_length <= context:
        return max_length
    settings.update(max_length=context, max_length_asked=max_length)
    return context


def evaluate_records(model, tokenizer, records: Sequence[dict[str, Any]],
                     metrics: Sequence[str] = ("perplexity", "bleu"), *, max_length: int = 512,
                     train_on: str = "assistant", max_new_tokens: int = 64, max_samples: int = 32,
                     batch_size: int = 8, chunk_size: int = 1024, overflow: str = "truncate",
                     autocast: Any = None) -> EvalResult:
    """Perplexity over every record (trained tokens, training's masking); generation metrics on the first
    `max_samples` records that end in an assistant answer (the reference), generated greedily. A record that cannot
    be scored (nothing to train, a chat template that refuses it) is in settings["rejected"] with where and why."""
    from tunelab.evaluate.generation import generate_answers
    from tunelab.evaluate.metrics import score_texts
    from tunelab.evaluate.perplexity import perplexity

    metrics = normalize_metrics(metrics)
    out: dict[str, float] = {}
    settings: dict[str, Any] = {"metrics": metrics, "max_length": max_length, "train_on": train_on,
                                "overflow": overflow, "records": len(records)}
    max_length = within_context(model, max_length, settings)
    rejected: dict[int, dict[str, Any]] = {}
    if "perplexity" in metrics:
        ppl = perplexity(model, tokenizer, records, max_length=max_length, train_on=train_on, overflow=overflow,
                         batch_size=batch_size, chunk_size=chunk_size, autocast=autocast)
        out.update(ppl.as_metrics)
        settings.update(perplexity_records=ppl.records, perplexity_skipped=len(ppl.rejected))
        rejected.update((r["index"], r) for r in ppl.rejected)
    predictions: list[dict[str, Any]] = []
    gen_metrics = [m for m in metrics if m in GENERATION_METRICS]
    if gen_metrics:
        predictions = _generation_prompts(tokenizer, records, max_samples, rejected)
        texts = generate_answers(model, tokenizer, [p["messages"] for p in predictions],
                                 max_new_tokens=max_new_tokens, batch_size=batch_size)
        scores = score_texts(texts, [p["reference"] for p in predictions], gen_metrics)
        for p, text, s in zip(predictions, texts, scores.per_sample):
            p["prediction"], p["scores"] = text, s
        out.update(scores.corpus)
        settings.update(max_new_tokens=max_new_tokens, max_samples=max_samples, samples=len(predictions),
                        generation="greedy", tokenizer_choice=scores.describe())
    settings["rejected"] = [rejected[i] for i in sorted(rejected)]
    return EvalResult(out, predictions, settings)


def _generation_prompts(tokenizer, records: Sequence[dict[str, Any]], max_samples: int,
                        rejected: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """The first `max_samples` records that end in an assistant answer, as prompts with their reference; a record
    whose prompt the chat template cannot render joins `rejected` (by index), with where and why."""
    from tunelab.data.prepare import encode_or_refuse, refused
    from tunelab.data.template import RecordRejected, prompt_messages, render

    predictions: list[dict[str, Any]] = []
    for i, rec in enumerate(records):
        if len(predictions) >= max_samples:
            break
        prompt, reference = prompt_messages(rec["messages"])
        if reference is None or not prompt:
            continue
        try:
            encode_or_refuse(render, tokenizer, prompt, add_generation_prompt=True)
        except RecordRejected as e:
            rejected.setdefault(i, {"index": i, **refused(rec, e)})
            continue
        last_user = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), prompt[-1]["content"])
        predictions.append({"index": i, "prompt": last_user, "messages": prompt, "reference": reference})
    return predictions


# ---------------------------------------------------------------- the `tunelab eval` command as a function


@dataclass
class EvalData:
    records: list[dict[str, Any]]
    fingerprint: str | None
    source: str
    split: str
    rejections: dict[str, Any] = field(default_factory=dict)  # a raw file: records read / rejected and why


REJECTION_KEYS = ("records_read", "records_accepted", "records_rejected", "duplicates_removed", "rejected_by_reason",
                  "rejected_examples")  # of prepare's report, kept in the eval result (rejected_examples: first 50)


@dataclass
class EvalRun:
    name: str
    result: EvalResult
    base_result: EvalResult | None
    json_path: Path
    predictions_path: Path
    record: dict[str, Any]


def load_eval_data(data: str | os.PathLike, split: str | None = None, stage: str = "sft",
                   console: Callable[[str], None] = print) -> EvalData:
    """Records to evaluate: a prepared folder (its `split`, default val), a run folder (its prepared data/), or raw
    data, a file or a folder of files (prepared in memory: every record, no split; what prepare says of it,
    rejections too, goes to `console`)."""
    from tunelab.data.prepare import is_prepared, load_prepared

    path, trained_on = Path(data), None
    if not path.exists():
        raise EvalError(f"evaluation data not found: {path}")
    if path.is_dir() and (path / "manifest.json").is_file():  # a run folder: the data it trained and evaluated on
        manifest = json.loads((path / "manifest.json").read_text())
        folder, trained_on = (manifest.get("data") or {}).get("folder"), manifest.get("data_fingerprint")
        path = Path(folder) if folder and Path(folder).is_dir() else path / "data"
        if not is_prepared(path):
            raise EvalError(f"the run {data} holds no prepared data ({path}); pass --data")
    if not is_prepared(path):
        if split is not None:
            raise EvalError(f"--split chooses a split of a prepared folder or a run; {path} is a raw "
                            f"{'file' if path.is_file() else 'data folder'}, whose every record is evaluated")
        return _prepare_raw(path, stage, console)
    split = split or "val"
    if split not in ("train", "val"):
        raise EvalError(f"--split must be train or val, not {split!r}")
    prepared = load_prepared(path)
    if trained_on and prepared.fingerprint != trained_on:
        raise EvalError(f"{path} was prepared again after the run {data} trained on it: its data fingerprint is "
                        f"{prepared.fingerprint[:19]}…, the run's manifest records {trained_on[:19]}…, so its {split} "
                        "split may hold records the run trained on. Prepare it again as it was (the inputs and data "
                        "settings of the run's config.yaml), or pass --data to evaluate on other data")
    records, fingerprint = list(getattr(prepared, split)), prepared.fingerprint
    if not records:
        raise EvalError(f"{path} has no {split} records" + (" (use --split train)" if split == "val" else ""))
    return EvalData(records, fingerprint, str(path), split)


def _prepare_raw(path: Path, stage: str, console: Callable[[str], None]) -> EvalData:
    """Raw data, validated and normalised by the prepare pipeline (every record, no split); its report (each
    rejection with file and line, the counts) goes to `console`, less what it says of the scratch folder."""
    import tempfile

    from tunelab.data.prepare import load_prepared, prepare_dataset

    with tempfile.TemporaryDirectory(prefix="tunelab-eval-") as tmp:
        def say(line: str) -> None:
            if tmp in line:  # "wrote <scratch folder>": deleted once read
                return
            console(line.replace("listed in rejected.jsonl and report.md",
                                 "counted by reason below; the first 50 are in the eval result"))

        result = prepare_dataset([str(path)], Path(tmp) / "data", val_ratio=0.0, console=say,
                                 stage=stage if stage in RAW_STAGES else "sft")
        result.raise_if_unusable()
        prepared = load_prepared(result.output)
        records = list(prepared.train) + list(prepared.val)
        return EvalData(records, prepared.fingerprint, str(path), "all",
                        {k: result.report[k] for k in REJECTION_KEYS if k in result.report})


def run_folder_of(adapter: str | os.PathLike | None) -> Path | None:
    """The run folder an adapter path belongs to (the folder itself or the parent of a checkpoint), if any."""
    if not adapter:
        return None
    p = Path(adapter)
    for candidate in (p, p.parent):
        if (candidate / "manifest.json").is_file() and (candidate / "config.yaml").is_file():
            return candidate
    return None


# What `tunelab eval` uses for an option neither given nor set by the run (run_eval).
EVAL_DEFAULTS = {"metrics": ["perplexity", "bleu"], "max_length": 512, "train_on": "assistant", "overflow": "truncate",
                 "chunk_size": 1024, "max_new_tokens": 64, "max_samples": 32, "batch_size": 8, "dtype": "auto"}


def eval_defaults(adapter_dir: Path | None, run_dir: Path | None) -> dict[str, Any]:
    """The settings `tunelab eval --adapter` takes when given no option: the run's (its config.yaml and the
    adapter's tunelab.json) over EVAL_DEFAULTS."""
    return {**EVAL_DEFAULTS, **_defaults_from(adapter_dir, run_dir)}


def _defaults_from(adapter_dir: Path | None, run_dir: Path | None) -> dict[str, Any]:
    """Settings the run was trained with (so eval masks, truncates and computes exactly as training did)."""
    out: dict[str, Any] = {}
    if run_dir is not None:
        import yaml

        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        data, training, ev = cfg.get("data", {}), cfg.get("training", {}), cfg.get("eval", {})
        out.update({k: v for k, v in {
            "max_length": data.get("max_length"), "train_on": data.get("train_on"), "overflow": data.get("overflow"),
            "chunk_size": training.get("loss_chunk_size"), "max_new_tokens": ev.get("max_new_tokens"),
            "max_samples": ev.get("max_samples"), "batch_size": ev.get("batch_size"), "metrics": ev.get("metrics"),
            "dtype": (cfg.get("model") or {}).get("dtype"), "system_prompt": data.get("system_prompt"),
            "stage": training.get("stage"), "beta": (cfg.get("preference") or {}).get("beta")}.items()
            if v is not None})
    if adapter_dir is not None and (adapter_dir / "tunelab.json").is_file():
        meta = json.loads((adapter_dir / "tunelab.json").read_text())
        out.update({k: meta[k] for k in ("max_length", "train_on") if meta.get(k) is not None})
        if meta.get("dtype") in ("bf16", "fp16", "fp32"):  # the precision the run trained and evaluated in
            out["dtype"] = meta["dtype"]
    return out


ENCODING_KEYS = ("max_length", "train_on", "overflow", "system_prompt", "chunk_size")  # how records were scored


def _related_run(model: str, data: str) -> tuple[Path | None, str]:
    """The run whose settings fit when no adapter is given: the one a tunelab-merged model was merged from (its
    tunelab.json's merged_from, else its run_name under outputs/), else the run whose data is evaluated."""
    from tunelab.model.loading import read_tunelab_json

    meta = read_tunelab_json(Path(model)) if Path(model).is_dir() else {}
    if meta.get("merged_from"):
        found = run_folder_of(meta["merged_from"])
        if found is None and meta.get("run_name"):
            from tunelab.runs import RunError, resolve_run

            try:
                found = resolve_run(meta["run_name"])
            except RunError:
                found = None
        if found is not None:
            return found, f"the run {model} was merged from"
    found = run_folder_of(data)
    return found, "the run whose data this is"


def _defaults_of_related_run(model: str, data: str, console: Callable[[str], None]) -> dict[str, Any]:
    """A merged model, or a run's data, is scored as that run encoded its records (max_length, masking,
    truncation, system prompt): the 512-token fallback gave a merged model other numbers than its adapter."""
    run, why = _related_run(model, data)
    if run is None:
        return {}
    d = {k: v for k, v in _defaults_from(None, run).items() if k in ENCODING_KEYS}
    if d:
        console(f"info: {', '.join(f'{k} {v!r}' for k, v in d.items())} from {run}/config.yaml ({why}); "
                "flags such as --max-length take precedence")
    return d


def _evaluate_tuned_and_base(model: str, adapter_dir: Path | None, base: str | None, dtype: str,
                             records: list[dict[str, Any]], metrics: list[str],
                             opts: dict[str, Any]) -> tuple[EvalResult, EvalResult | None]:
    """The model (with its adapter) and, when `base` is given, the base model, never both in memory twice."""
    import gc

    from tunelab.model.loading import load_pretrained, read_tunelab_json
    from tunelab.model.loss import autocast_for

    full = adapter_dir is not None and not (adapter_dir / "adapter_config.json").is_file()
    # a method=full run trained fp32 master weights under bf16/fp16 autocast: evaluate it the same way
    lm, tok = load_pretrained(model, adapter_dir, dtype="fp32" if full and dtype in ("bf16", "fp16") else dtype)
    if full and dtype in ("bf16", "fp16"):
        opts = {**opts, "autocast": autocast_for(next(lm.parameters()).device.type, dtype)}
    result = evaluate_records(lm, tok, records, metrics, **opts)
    base_result = None
    if base and hasattr(lm, "disable_adapter"):  # a LoRA adapter: the base is the same weights, adapter off
        with lm.disable_adapter():
            base_result = evaluate_records(lm, tok, records, metrics, **opts)
    elif base:
        del lm
        gc.collect()
        rec = read_tunelab_json(Path(model)) if Path(model).is_dir() else {}  # a merged model's recorded base
        same = base == rec.get("base_model")
        lm, _ = load_pretrained(base, dtype=dtype, revision=rec.get("revision") if same else None,
                                trust_remote_code=bool(rec.get("trust_remote_code")) if same else None)
        opts = {k: v for k, v in opts.items() if k != "autocast"}  # the tuned model's tokenizer for both
        base_result = evaluate_records(lm, tok, records, metrics, **opts)
    return result, base_result


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "eval"


def run_eval(model: str | None = None, adapter: str | None = None, data: str | None = None, *,
             metrics: Sequence[str] | str | None = None, name: str | None = None, split: str | None = None,
             compare_base: bool = False, base: str | None = None, max_samples: int | None = None,
             max_new_tokens: int | None = None, batch_size: int | None = None, max_length: int | None = None,
             train_on: str | None = None, dtype: str | None = None, output_dir: str | os.PathLike | None = None,
             console: Callable[[str], None] = print) -> EvalRun:
    """Evaluate a base/merged model or a run's adapter and write `eval/<name>.json` + `.predictions.jsonl`; what
    prepare says of a raw data file (every rejection, with file and line) goes to `console`."""
    from tunelab.model.loading import base_model_of, resolve_adapter_dir
    from tunelab.rundir import now_iso, package_versions
    from tunelab.runs import eval_subject

    if adapter and not Path(adapter).exists():  # a run name under outputs/
        from tunelab.runs import resolve_run

        adapter = str(resolve_run(adapter))
    run_dir = run_folder_of(adapter)
    adapter_dir = resolve_adapter_dir(adapter) if adapter else None
    if model is None:
        if adapter_dir is None:
            raise EvalError("give --model (a base or merged model), --adapter (a run or checkpoint), or both")
        model = base_model_of(adapter_dir)
    if data is None:
        if run_dir is None:
            raise EvalError("give --data (a prepared folder or a raw file) to evaluate on")
        data = str(run_dir)
    d = {**EVAL_DEFAULTS,
         **(_defaults_from(adapter_dir, run_dir) if run_dir else _defaults_of_related_run(model, data, console))}
    metrics = normalize_metrics(metrics if metrics else d["metrics"])
    opts = dict(max_length=max_length or d["max_length"], train_on=train_on or d["train_on"],
                overflow=d["overflow"], chunk_size=d["chunk_size"],
                max_new_tokens=max_new_tokens or d["max_new_tokens"], max_samples=max_samples or d["max_samples"],
                batch_size=batch_size or d["batch_size"])
    dtype = dtype or d["dtype"]
    stage = d.get("stage") if d.get("stage") in RAW_STAGES else None
    ev_data = load_eval_data(data, split, stage or "sft", console=console)  # raw files read as the run's
    from tunelab.evaluate.preference import is_preference_data

    pairs = is_preference_data(ev_data.records)  # dpo/orpo/simpo pairs or kto's labelled answers
    if any("messages" not in r for r in ev_data.records):  # raw text (pt): no prompt to answer, perplexity only
        metrics = ["perplexity"]
    else:  # as training encoded them: the run's system prompt where a record has none
        from tunelab.train.inputs import with_system_prompt

        ev_data.records = with_system_prompt(ev_data.records, d.get("system_prompt"))
    subject = eval_subject(model, str(adapter_dir) if adapter_dir else None,
                           base_model_of(adapter_dir) if adapter_dir else None)
    name = _safe_name(name or _default_name(data, run_dir, ev_data.split, subject))
    out_dir = Path(output_dir) if output_dir else (run_dir / "eval" if run_dir else Path("outputs") / "eval")
    identity = {"model": model, "adapter": str(adapter_dir) if adapter_dir else None}
    _refuse_replacing(out_dir / f"{name}.json", identity, run_dir)

    if base and not compare_base:
        raise EvalError("--base names the model --compare-base evaluates beside this one: add --compare-base, or "
                        "drop --base")
    base_name = base or (base_model_of(adapter_dir) if adapter_dir else _base_of_merged(model))
    if compare_base and not base_name:
        raise EvalError(f"--compare-base: cannot tell the base model of {model}; pass --base BASE_MODEL")

    if pairs:  # held-out preference pairs: which answer the model prefers (tunelab.evaluate.preference)
        from tunelab.evaluate.preference import evaluate_pairs

        result, base_result = evaluate_pairs(model, adapter_dir, base_name if compare_base else None, dtype,
                                             ev_data.records, opts, d.get("beta", 0.1), run_dir)
    else:
        result, base_result = _evaluate_tuned_and_base(model, adapter_dir, base_name if compare_base else None,
                                                       dtype, ev_data.records, metrics, opts)
    if "max_length_asked" in result.settings:
        console(f"note: max_length {result.settings['max_length_asked']} is beyond this model's context: scored at "
                f"{result.settings['max_length']} tokens (recorded as max_length_asked in the result)")
    record = {
        "name": name, "created_at": now_iso(), "metrics": result.metrics,
        "base_metrics": base_result.metrics if base_result else None,
        "settings": {**result.settings, "dtype": dtype, "split": ev_data.split},
        "tokenizer_choice": result.settings.get("tokenizer_choice"),
        "data": {"path": str(data), "source": ev_data.source, "split": ev_data.split,
                 "records": len(ev_data.records), "fingerprint": ev_data.fingerprint, **ev_data.rejections},
        "model": {**identity, "base_model": base_name, "run": str(run_dir) if run_dir else None,
                  "subject": subject},
        "versions": package_versions(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, pred_path = out_dir / f"{name}.json", out_dir / f"{name}.predictions.jsonl"
    base_preds = {p["index"]: p for p in base_result.predictions} if base_result else {}
    _write_result(json_path, record, pred_path, (_prediction_row(p, base_preds) for p in result.predictions))
    _say_rejected(result.settings.get("rejected"), json_path, console)
    return EvalRun(name, result, base_result, json_path, pred_path, record)


def _default_name(data: str, run_dir: Path | None, split: str, subject: str | None) -> str:
    """`val` for a run's final adapter on its own data, `<data>-<split>` on other data, each led by what was
    evaluated when it is not that adapter (`checkpoint-2-val`, `m1-r1-val`): results of different models never
    share a default name."""
    own_data = run_dir is not None and Path(data).resolve() == run_dir.resolve()
    name = split if own_data else f"{Path(data).stem}-{split}"
    return f"{subject}-{name}" if subject else name


def _same_model(a: dict[str, Any], b: dict[str, Any], in_run: bool) -> bool:
    """`in_run`: the result lives in the run's own eval/, so its adapters are told apart by checkpoint name (a run
    folder copied or moved keeps its results' identity)."""
    def key(p: Any, adapter: bool) -> str | None:
        if not p:
            return None
        path = Path(str(p))
        return path.name if adapter and in_run else str(path.resolve()) if path.exists() else str(p)

    return all(key(a.get(k), k == "adapter") == key(b.get(k), k == "adapter") for k in ("model", "adapter"))


def _refuse_replacing(json_path: Path, identity: dict[str, Any], run_dir: Path | None) -> None:
    """An earlier result of this name from another model or checkpoint is refused before evaluating, not
    replaced: its numbers would be lost and the new ones read under its label (a result of the same model is
    a re-run and is replaced)."""
    from tunelab.files import read_json_object

    if not json_path.is_file():
        return
    try:
        earlier = read_json_object(json_path, EvalError).get("model")
    except EvalError:
        earlier = None
    in_run = run_dir is not None and json_path.parent.resolve() == (run_dir / "eval").resolve()
    if isinstance(earlier, dict) and _same_model(earlier, identity, in_run):
        return
    what = (", ".join(f"{k} {earlier[k]}" for k in ("model", "adapter") if earlier.get(k))
            if isinstance(earlier, dict) else "something else")
    raise EvalError(f"{json_path} already holds an evaluation of {what}; pass another --name to keep both, or "
                    f"remove {json_path} to replace it")


def _prediction_row(p: dict[str, Any], base_preds: dict[int, dict[str, Any]]) -> dict[str, Any]:
    row = {k: v for k, v in p.items() if k != "messages"}
    if p["index"] in base_preds:
        if "prediction" in p:  # pairs score the given answers: nothing generated
            row["base_prediction"] = base_preds[p["index"]]["prediction"]
        row["base_scores"] = base_preds[p["index"]]["scores"]
    return row


def _write_result(json_path: Path, record: dict[str, Any], pred_path: Path, rows) -> None:
    """The predictions, then the result, each written beside its place and renamed in: a full disk leaves the
    files of an earlier eval of that name as they were, never an empty or cut one."""
    from tunelab.data.prepare import to_json
    from tunelab.files import writing

    tmp_json, tmp_pred = (p.with_name(f".{p.name}.tmp") for p in (json_path, pred_path))
    try:
        with writing(f"the eval result {json_path}", json_path.parent, EvalError, "Nothing of it was kept"):
            with open(tmp_pred, "w", encoding="utf-8") as f:
                f.writelines(to_json(row) + "\n" for row in rows)
            tmp_json.write_text(to_json(record, indent=2), encoding="utf-8")
    except BaseException:
        for tmp in (tmp_json, tmp_pred):
            tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp_pred, pred_path)
    os.replace(tmp_json, json_path)


def _say_rejected(rejected: list[dict[str, Any]] | None, json_path: Path, console: Callable[[str], None]) -> None:
    """Records set aside at encoding (as training sets them aside), said in one line as training says it."""
    if rejected:
        r = rejected[0]
        console(f"warning: {len(rejected)} records could not be evaluated with these settings (e.g. {r['source']} "
                f"{r['location']}: {r['reason']}); listed in {json_path} under settings.rejected")


def _base_of_merged(model: str) -> str | None:
    """A merged/full model folder written by tunelab records its base in tunelab.json."""
    meta = Path(model) / "tunelab.json"
    if meta.is_file():
        return json.loads(meta.read_text()).get("base_model")
    return None
