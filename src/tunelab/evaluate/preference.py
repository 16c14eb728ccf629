"""Preference metrics of a model on held-out pairs: which answer does it prefer, and by how much.

    res = preference_metrics(model, tokenizer, pairs, max_length=512, beta=0.1, reference=ctx)
    res.metrics["pref_accuracy"], res.metrics["rewards/accuracy"], res.predictions[0]["scores"]

Two views, both over the answer tokens only (the prompt is context), encoded exactly as training encodes pairs
(`tunelab.data.preference.encode_preference`, same max_length and overflow):

- The model's own preference, comparable between any two models (base, SFT, DPO): `pref_accuracy` is the share of
  pairs whose chosen answer has the higher mean log-probability per token (a mean, so that a short rude answer
  and a long rambling one are compared fairly); `pref_margin` is the mean difference (nats per token).
- The DPO implicit reward against a reference, as training logs it (TRL's definitions: reward = beta x
  (log pi(answer) - log ref(answer)) summed over the answer; accuracy counts chosen > rejected, a tie is not a
  hit): `rewards/chosen`, `rewards/rejected`, `rewards/accuracy`, `rewards/margin`. Only with a `reference`: the
  run's own (its starting SFT adapter, or the base with the adapter disabled). An orpo / simpo run has none: its
  training rewards are beta x mean log-prob, whose accuracy is `pref_accuracy` and margin beta x `pref_margin`.

KTO's labelled answers (no pairs) get TRL's KTO view instead: `logps/chosen` / `logps/rejected` (mean log-prob per
token of the desirable / undesirable answers) and, against the reference, `rewards/chosen` and `rewards/rejected`
(the mean reward of each kind, as training logs them), `rewards/margin`, `rewards/accuracy` (the share whose reward
has the label's sign) and `kl` (training's estimate: each prompt with the previous answer of its batch).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from tunelab.evaluate.runner import EvalResult


def encode_pairs(tokenizer, records: Sequence[dict[str, Any]], max_length: int, overflow: str):
    """(encoded pairs, their record indices, the records that cannot be scored: index, source, location, reason)."""
    from tunelab.data.preference import encode_preference
    from tunelab.data.prepare import encode_or_refuse, refused
    from tunelab.data.template import RecordRejected

    out, index, rejected = [], [], []
    for i, rec in enumerate(records):
        try:
            out.append(encode_or_refuse(encode_preference, tokenizer, rec, max_length, overflow))
            index.append(i)
        except RecordRejected as e:
            rejected.append({"index": i, **refused(rec, e)})
    return out, index, rejected


def preference_metrics(model, tokenizer, records: Sequence[dict[str, Any]], *, max_length: int = 512,
                       overflow: str = "truncate", beta: float = 0.1, reference: Callable | None = None,
                       batch_size: int = 8, chunk_size: int = 1024) -> EvalResult:
    """Held-out pairs, or kto's labelled answers (prepared preference records) → preference metrics and one scored
    row per record."""
    import torch

    from tunelab.evaluate.perplexity import compute_dtype_name
    from tunelab.evaluate.runner import within_context
    from tunelab.model.loss import autocast_for

    cut: dict[str, Any] = {}
    max_length = within_context(model, max_length, cut)
    encoded, index, rejected = encode_pairs(tokenizer, records, max_length, overflow)
    kto = is_kto_data(records)
    score = _score_kto if kto else _score_pairs
    device = next(model.parameters()).device
    autocast = autocast_for(device.type, compute_dtype_name(model))
    rows: list[dict[str, Any]] = []
    for k in range(0, len(encoded), batch_size):
        with torch.no_grad(), autocast():
            rows += score(model, encoded[k:k + batch_size], device, reference, beta, chunk_size,
                          encoded[k - 1] if k else None)
    metrics = _kto_summary(rows) if kto else _summary(rows)
    predictions = [_prediction(records[i], i, row) for i, row in zip(index, rows)]
    settings = {"metrics": ["preference"], ("examples" if kto else "pairs"): len(rows), "skipped": len(rejected),
                "rejected": rejected,
                "max_length": max_length, "overflow": overflow, "beta": beta, "reference": bool(reference), **cut}
    return EvalResult(metrics, predictions, settings)


def _score_pairs(model, part: list[dict], device, reference, beta: float, chunk_size: int,
                 _spare: dict | None = None) -> list[dict[str, float]]:
    """One batch of pairs: each answer's summed and per-token log-probability, and its reward when `reference`."""
    from tunelab.train.preference_loss import _to, collate_pairs, policy_logps, reference_logps, shares_prompts

    batch = _to(collate_pairs(part, share_prompt=shares_prompts(model)), device)
    n = len(part)
    sums, counts = policy_logps(model, batch, 2 * n, chunk_size)
    ref = reference_logps(reference, batch, "dpo", chunk_size)["logps"] if reference else None
    rows = []
    for j in range(n):
        c, r = float(sums[j]), float(sums[n + j])
        row = {"logp_chosen": c, "logp_rejected": r, "mean_logp_chosen": c / max(int(counts[j]), 1),
               "mean_logp_rejected": r / max(int(counts[n + j]), 1)}
        if ref is not None:
            row["reward_chosen"] = beta * (c - float(ref[j]))
            row["reward_rejected"] = beta * (r - float(ref[n + j]))
        rows.append(row)
    return rows


def _score_kto(model, part: list[dict], device, reference, beta: float, chunk_size: int,
               spare: dict | None = None) -> list[dict[str, float]]:
    """One batch of kto's labelled answers: log-probabilities and, when `reference`, the reward beta x (log pi -
    log ref) and the batch's KL estimate as training computes it (each prompt with the previous answer; a lone
    last example with `spare`'s)."""
    from tunelab.train.preference_loss import _to, collate_kto, policy_logps, reference_logps

    batch = _to(collate_kto(part, spare or (None if reference else part[0])), device)  # KL: with a reference only
    n = len(part)
    sums, counts = policy_logps(model, batch, n, chunk_size)
    rows = [{"label": bool(e["label"]), "logp": float(sums[j]), "mean_logp": float(sums[j]) / max(int(counts[j]), 1)}
            for j, e in enumerate(part)]
    if reference:
        ref = reference_logps(reference, batch, "kto", chunk_size)
        kl = float((policy_logps(model, batch["kl"], n, chunk_size)[0] - ref["kl"]).mean().clamp(min=0))
        for j, row in enumerate(rows):
            row.update(reward=beta * (row["logp"] - float(ref["logps"][j])), kl=kl)
    return rows


def _summary(rows: list[dict[str, float]]) -> dict[str, float]:
    n = max(len(rows), 1)
    diff = [r["mean_logp_chosen"] - r["mean_logp_rejected"] for r in rows]
    out = {"pref_accuracy": sum(d > 0 for d in diff) / n, "pref_margin": sum(diff) / n, "pairs": len(rows)}
    if rows and "reward_chosen" in rows[0]:
        rc, rr = [r["reward_chosen"] for r in rows], [r["reward_rejected"] for r in rows]
        out.update({"rewards/chosen": sum(rc) / n, "rewards/rejected": sum(rr) / n,
                    "rewards/accuracy": sum(c > r for c, r in zip(rc, rr)) / n,
                    "rewards/margin": sum(c - r for c, r in zip(rc, rr)) / n})
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def _kto_summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """kto (TRL's KTO metric names; `rewards/margin` as training logs it): the desirable (`chosen`) and undesirable
    (`rejected`) answers each averaged over their own examples; `rewards/accuracy` is the share whose reward has
    the label's sign (a zero reward is not a hit)."""
    good, bad = [r for r in rows if r["label"]], [r for r in rows if not r["label"]]
    out: dict[str, float] = {"examples": len(rows), "desirable": len(good), "undesirable": len(bad)}
    rewards = bool(rows) and "reward" in rows[0]
    for side, part in (("chosen", good), ("rejected", bad)):  # a kind with no example has no mean (not 0)
        if part:
            out[f"logps/{side}"] = _mean([r["mean_logp"] for r in part])
            if rewards:
                out[f"rewards/{side}"] = _mean([r["reward"] for r in part])
    if rewards:
        if good and bad:
            out["rewards/margin"] = out["rewards/chosen"] - out["rewards/rejected"]
        out.update({"rewards/accuracy": _mean([r["reward"] != 0 and (r["reward"] > 0) == r["label"] for r in rows]),
                    "kl": _mean([r["kl"] for r in rows])})
    return out


def _text(turns) -> str:
    return "\n".join(t["content"] for t in turns or [])


def _prediction(rec: dict[str, Any], i: int, scores: dict[str, Any]) -> dict[str, Any]:
    prompt = next((m["content"] for m in reversed(rec["prompt"]) if m["role"] == "user"), "")
    answers = ({"completion": _text(rec.get("completion")), "label": rec["label"]} if "label" in rec else
               {"chosen": _text(rec.get("chosen")), "rejected": _text(rec.get("rejected"))})
    return {"index": i, "prompt": prompt, **answers,
            "scores": {k: round(v, 6) if isinstance(v, float) else v for k, v in scores.items() if k != "label"}}


def is_kto_data(records: Sequence[dict[str, Any]]) -> bool:
    """kto's prepared records: a prompt, one labelled answer (`completion`) and no rejected answer."""
    return bool(records) and "label" in records[0] and "completion" in records[0]


def is_preference_data(records: Sequence[dict[str, Any]]) -> bool:
    return bool(records) and ("chosen" in records[0] and "rejected" in records[0] or is_kto_data(records))


def evaluate_pairs(model: str, adapter_dir, base: str | None, dtype: str, records: list[dict[str, Any]],
                   opts: dict[str, Any], beta: float, run_dir) -> tuple[EvalResult, EvalResult | None]:
    """`tunelab eval` on pairs: the model (rewards against the run's reference) and, when `base` is given, the
    base model's own preference (the same weights with the adapter disabled, or the base loaded alone)."""
    import gc

    from tunelab.model.loading import load_pretrained

    recorded = recorded_reference(run_dir)  # before loading anything: a reference gone or changed is an error
    lm, tok = load_pretrained(model, adapter_dir, dtype=dtype)
    kw = dict(max_length=opts["max_length"], overflow=opts["overflow"], beta=beta, batch_size=opts["batch_size"],
              chunk_size=opts["chunk_size"])
    reference, described = _reference(lm, recorded)
    result = preference_metrics(lm, tok, records, reference=reference, **kw)
    result.settings["reference_model"] = described
    base_result = None
    if base and hasattr(lm, "disable_adapter"):
        with lm.disable_adapter():
            base_result = preference_metrics(lm, tok, records, **kw)
    elif base:
        del lm
        gc.collect()
        lm, _ = load_pretrained(base, dtype=dtype)
        base_result = preference_metrics(lm, tok, records, **kw)
    return result, base_result


def recorded_reference(run_dir) -> dict[str, Any]:
    """The reference the run's manifest records (kind, adapter, fingerprint). A starting adapter that is gone, or
    whose weights differ from the sha256 recorded at training, is an EvalError: never another model in its place."""
    import json
    from pathlib import Path

    from tunelab.evaluate.runner import EvalError

    manifest = Path(run_dir) / "manifest.json" if run_dir else None
    ref = (json.loads(manifest.read_text()).get("reference") or {}) if manifest and manifest.is_file() else {}
    if ref.get("kind") != "adapter":
        return ref
    from tunelab.train.preference import adapter_fingerprint

    folder, want = Path(ref.get("adapter", "")), ref.get("fingerprint")
    if not folder.is_dir():
        problem = "is missing"
    elif want and adapter_fingerprint(folder) != want:
        problem = "has changed since training (its weights' sha256 differs from the recorded one)"
    else:
        return ref
    raise EvalError(f"the reference of run {run_dir}, the adapter it started from ({folder}, {want}), {problem}: "
                    f"its rewards would be measured against another model; put the adapter it trained from back at {folder}")


def _reference(lm, ref: dict[str, Any]) -> tuple[Callable | None, str | None]:
    """(the reference a run's rewards are measured against, in words): its starting adapter `ref` (checked by
    `recorded_reference`) loaded beside the trained one, else the base (the adapter disabled); None for a model
    without an adapter."""
    from tunelab.train.preference import REF_ADAPTER, _switched, adapter_disabled

    if not hasattr(lm, "disable_adapter"):
        return None, None
    if ref.get("kind") == "none":  # orpo / simpo: their rewards are beta x mean log-prob, pref_accuracy / pref_margin
        return None, f"none ({ref.get('why', 'the run trained without a reference model')})"
    if ref.get("kind") == "adapter":
        lm.load_adapter(ref["adapter"], adapter_name=REF_ADAPTER, is_trainable=False)
        lm.set_adapter("default")
        return (lambda: _switched(lm, REF_ADAPTER)), f"adapter {ref['adapter']} ({ref.get('fingerprint')})"
    return (lambda: adapter_disabled(lm)), "the base model (the adapter disabled)"
