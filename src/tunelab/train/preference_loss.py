"""Preference objectives (DPO sigmoid / IPO / hinge, ORPO, SimPO, KTO) over one packed, padding-free forward.

    batch = collate_pairs(examples)            # [{"prompt_ids", "chosen_ids", "rejected_ids"}, ...]
    out = pair_loss(model, batch, pcfg, stage, ref=ref_logps_or_None, chunk_size=1024)
    out.loss_sum.backward()                    # sum over the pairs: divide by the pairs of the step
    out.metrics                                # rewards/chosen, rewards/rejected, rewards/accuracy, rewards/margin

The answers of a micro-batch are packed into one row (chosen 0..B-1, then rejected 0..B-1, each prompt + answer,
positions restarting at 0, per-record attention; or, where the model's attention reads branches, each pair as
prompt + chosen + rejected with the prompt once), and `tunelab.model.loss.sequence_logps` sums the answer tokens'
log-probabilities chunk by chunk: no padding, no full-vocabulary logits. Each formula is TRL's (1.x) and a test
compares loss and gradients with TRL's trainers on the same model and batch (tests/test_preference_loss.py):

- dpo: reward r = beta * (log pi(y|x) - log ref(y|x)); sigmoid -(1-eps) log s(r_c - r_r) - eps log s(r_r - r_c)
  (eps = label smoothing, conservative DPO; TRL's DPOTrainer sigmoid is eps = 0), hinge relu(1 - (r_c - r_r)),
  ipo ((l_c / n_c - l_r / n_r) - 1 / (2 beta))^2 on log-ratios l averaged per answer token, as TRL does.
- orpo: NLL of prompt + chosen (token mean, as TRL's ORPOTrainer) - beta * log s(log-odds(chosen) -
  log-odds(rejected)), with log-odds from the mean token log-prob of each answer. No reference model.
- simpo: -log s(beta * (mean logp_c - mean logp_r) - gamma) (TRL's CPOTrainer loss_type=simpo, cpo_alpha=0).
- kto: desirable 1 - s(beta (l - z)), undesirable 1 - s(beta (z - l)), weighted, mean over the examples; z =
  max(0, mean KL estimate) from mismatched (prompt i, answer i-1) pairs of the same micro-batch, no gradient
  (a micro-batch of one example pairs its prompt with another example's answer, `spare`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from tunelab.model.loss import sequence_logps

PAIRED = ("dpo", "orpo", "simpo")
NEEDS_REFERENCE = ("dpo", "kto")


# ---------------------------------------------------------------- packing


def _pack(seqs: Sequence[tuple[list[int], list[int], int, int]]) -> dict[str, torch.Tensor]:
    """(prompt, answer, group of the answer, group of the prompt or -1) per record → one packed row."""
    ids, pos, groups = [], [], []
    for prompt, answer, g, pg in seqs:
        ids += prompt + answer
        pos += range(len(prompt) + len(answer))
        groups += [pg] * len(prompt) + [g] * len(answer)
    t = lambda x: torch.tensor([x], dtype=torch.long)  # noqa: E731
    return {"input_ids": t(ids), "position_ids": t(pos), "groups": t(groups)}


def collate_pairs(examples: Sequence[dict], with_prompt_nll: bool = False, share_prompt: bool = False,
                  ) -> dict[str, Any]:
    """Pairs → one packed row: group i is chosen i, group B + i is rejected i; with `with_prompt_nll` (ORPO, whose
    NLL covers the prompt as in TRL's ORPOTrainer) group 2B + i is the prompt of chosen i.

    With `share_prompt` (for a model whose attention reads branches, `tunelab.model.attention`), each pair is
    prompt, chosen, rejected once, the rejected answer a branch of the prompt (its positions continue the
    prompt's): the prompt goes through the model once for both answers instead of twice, with the same
    log-probabilities. Otherwise each answer is packed with its own copy of the prompt."""
    n = len(examples)
    if not share_prompt:
        seqs = [(e["prompt_ids"], e["chosen_ids"], i, 2 * n + i if with_prompt_nll else -1)
                for i, e in enumerate(examples)]
        seqs += [(e["prompt_ids"], e["rejected_ids"], n + i, -1) for i, e in enumerate(examples)]
        return {**_pack(seqs), "n": n}
    ids, pos, groups = [], [], []
    for i, e in enumerate(examples):
        prompt, chosen, rejected = e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]
        ids += prompt + chosen + rejected
        pos += [*range(len(prompt) + len(chosen)), *range(len(prompt), len(prompt) + len(rejected))]
        groups += [2 * n + i if with_prompt_nll else -1] * len(prompt) + [i] * len(chosen) + [n + i] * len(rejected)
    t = lambda x: torch.tensor([x], dtype=torch.long)  # noqa: E731
    return {"input_ids": t(ids), "position_ids": t(pos), "groups": t(groups), "n": n}


def shares_prompts(model) -> bool:
    """Whether pairs for `model` are collated with their prompt once (`collate_pairs(share_prompt=True)`)."""
    from tunelab.model.attention import branches_supported
    from tunelab.model.loss import _base, _own_head
    from tunelab.runtime import lever_enabled

    return lever_enabled("shared_prompt") and branches_supported(model) and not _own_head(_base(model).config)


def collate_kto(examples: Sequence[dict], spare: dict | None = None) -> dict[str, Any]:
    """Unpaired examples → one row with the matched answers (groups 0..B-1) and a second row with the mismatched
    (prompt i, answer i-1) pairs that estimate the KL term (TRL rotates the answers of each batch the same way).
    Rotating one example gives back its own answer, whose "KL" is its reward: a single example (an epoch's last
    micro-batch) is paired with the answer of `spare`, another example of the set."""
    from tunelab.errors import TunelabError

    n = len(examples)
    row = _pack([(e["prompt_ids"], e["completion_ids"], i, -1) for i, e in enumerate(examples)])
    if n == 1 and spare is None:
        raise TunelabError("kto estimates its KL term from a prompt paired with another example's answer: "
                           "it needs at least 2 examples")
    others = [spare] if n == 1 else [examples[i - 1] for i in range(n)]
    kl = _pack([(e["prompt_ids"], o["completion_ids"], i, -1) for i, (e, o) in enumerate(zip(examples, others))])
    return {**row, "kl": kl, "label": torch.tensor([bool(e["label"]) for e in examples]), "n": n}


# ---------------------------------------------------------------- the objectives


def dpo_losses(chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected, beta: float, loss_type: str,
               label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the rewards beta * (log pi - log ref) of each side."""
    chosen_lr, rejected_lr = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_lr - rejected_lr
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * delta) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * delta) * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":  # per-token average log-ratios: the squared loss does not grow with answer length
        ipo = chosen_lr / n_chosen.clamp(min=1) - rejected_lr / n_rejected.clamp(min=1)
        losses = (ipo - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}")
    return losses, beta * chosen_lr.detach(), beta * rejected_lr.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (TRL's log1mexp)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_losses(chosen_avg, rejected_avg, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair ORPO odds-ratio terms (to subtract from the NLL), rewards beta * mean log-prob."""
    log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
    return -beta * F.logsigmoid(log_odds), beta * chosen_avg.detach(), beta * rejected_avg.detach()


def simpo_losses(chosen_avg, rejected_avg, beta: float, gamma: float,
                 label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = beta * (chosen_avg - rejected_avg) - gamma
    losses = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()


def kto_losses(logps, ref_logps, label, kl, beta: float, desirable_weight: float,
               undesirable_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example weighted KTO losses and rewards beta * (log pi - log ref)."""
    lr = logps - ref_logps
    losses = torch.where(label, desirable_weight * (1 - torch.sigmoid(beta * (lr - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - lr))))
    return losses, beta * lr.detach()


# ---------------------------------------------------------------- one micro-batch


@dataclass
class PreferenceOutput:
    loss_sum: torch.Tensor  # summed over the examples of the micro-batch (ORPO: its NLL already token-averaged)
    n: int  # examples (pairs, or unpaired KTO examples)
    sums: dict[str, float] = field(default_factory=dict)  # metric sums over the examples, for logging


def _to(batch: dict, device) -> dict:
    return {k: (_to(v, device) if isinstance(v, dict) else v.to(device) if torch.is_tensor(v) else v)
            for k, v in batch.items()}


def policy_logps(model, batch: dict, n_groups: int, chunk_size: int):
    return sequence_logps(model, batch["input_ids"], batch["groups"], n_groups, batch["position_ids"],
                          chunk_size=chunk_size)


def reference_logps(reference: Callable, batch: dict, stage: str, chunk_size: int) -> dict[str, torch.Tensor]:
    """Log-probs under the reference policy: `reference()` is a context that yields the model to use (the policy
    with its adapter disabled or switched to the frozen starting adapter, or a frozen copy for full training)."""
    n = batch["n"]
    with torch.no_grad(), reference() as model:
        if stage == "kto":
            return {"logps": policy_logps(model, batch, n, chunk_size)[0],
                    "kl": policy_logps(model, batch["kl"], n, chunk_size)[0]}
        return {"logps": policy_logps(model, batch, 2 * n, chunk_size)[0]}


def preference_step(model, batch: dict, pcfg, stage: str, ref: dict | None, chunk_size: int = 1024,
                    ) -> PreferenceOutput:
    """Loss (summed over the micro-batch's examples) and metric sums; `ref` from `reference_logps` (dpo, kto)."""
    n = batch["n"]
    if stage == "kto":
        return _kto_step(model, batch, pcfg, ref, chunk_size)
    sums, counts = policy_logps(model, batch, 3 * n if stage == "orpo" else 2 * n, chunk_size)
    chosen, rejected, n_c, n_r = sums[:n], sums[n:2 * n], counts[:n], counts[n:2 * n]
    extra = {}
    if stage == "dpo":
        losses, r_c, r_r = dpo_losses(chosen, rejected, ref["logps"][:n], ref["logps"][n:], n_c, n_r, pcfg.beta,
                                      pcfg.loss_type, pcfg.label_smoothing)
        if pcfg.sft_weight:  # RPO: the chosen answers' NLL, a token mean over the micro-batch, added to each pair
            nll = -chosen.sum() / n_c.sum().clamp(min=1)
            losses = losses + pcfg.sft_weight * nll
            extra = {"nll_loss": float(nll.detach()) * n}
    elif stage == "simpo":
        losses, r_c, r_r = simpo_losses(chosen / n_c.clamp(min=1), rejected / n_r.clamp(min=1), pcfg.beta,
                                        pcfg.gamma, pcfg.label_smoothing)
    elif stage == "orpo":
        # NLL of prompt + chosen: a token mean over the micro-batch (as TRL), added to each pair's term
        nll_sum, nll_n = -(sums[:n].sum() + sums[2 * n:].sum()), counts[:n].sum() + counts[2 * n:].sum()
        losses, r_c, r_r = orpo_losses(chosen / n_c.clamp(min=1), rejected / n_r.clamp(min=1), pcfg.beta)
        losses = losses + nll_sum / nll_n.clamp(min=1)
        extra = {"nll_loss": float(nll_sum.detach() / nll_n.clamp(min=1)) * n}
    else:
        raise ValueError(f"unknown preference stage {stage!r}")
    metrics = {"rewards/chosen": float(r_c.sum()), "rewards/rejected": float(r_r.sum()),
               "rewards/accuracy": float((r_c > r_r).float().sum()), "rewards/margin": float((r_c - r_r).sum()),
               "logps/chosen": float(chosen.detach().sum()), "logps/rejected": float(rejected.detach().sum()), **extra}
    return PreferenceOutput(losses.sum(), n, metrics)


def _kto_step(model, batch, pcfg, ref, chunk_size) -> PreferenceOutput:
    n, label = batch["n"], batch["label"]
    logps, _ = policy_logps(model, batch, n, chunk_size)
    with torch.no_grad():
        kl_logps, _ = policy_logps(model, batch["kl"], n, chunk_size)
    kl = (kl_logps - ref["kl"]).mean().clamp(min=0)
    losses, rewards = kto_losses(logps, ref["logps"], label, kl, pcfg.beta, pcfg.desirable_weight,
                                 pcfg.undesirable_weight)
    metrics = {"rewards/chosen": float(rewards[label].sum()), "rewards/rejected": float(rewards[~label].sum()),
               "count/chosen": float(label.sum()), "count/rejected": float((~label).sum()), "kl": float(kl) * n}
    return PreferenceOutput(losses.sum(), n, metrics)
