"""The preference recipe (dpo, orpo, simpo, kto), top to bottom: set up, train (step, evaluate, save), finish.

    tunelab train --config examples/dpo.yaml            # training.stage: dpo (recipe.train dispatches here)
    tunelab train --config examples/dpo.yaml --resume   # resumes exactly like SFT

A copy of the SFT recipe's shape (`tunelab.train.recipe`), not a subclass: the run folder's owner, data
preparation, checkpoints, schedule and trackers are the same functions, imported. What differs: the examples are
pairs (or labelled answers, kto), the loss is `tunelab.train.preference_loss`, and there is a reference policy:

- LoRA / DoRA / QLoRA with a new adapter: the reference is the model with the adapter disabled (no extra memory).
- `model.adapter` (start from an SFT run): the SFT adapter is loaded twice, trained as `default` and frozen as
  `ref`; the reference switches to `ref` (an adapter's worth of extra memory).
- method=full: a frozen copy of the starting model.
- `preference.precompute_ref_logps` (dpo): the reference log-probs of every pair are computed once before the first
  step and kept in `ref_logps.pt` in the run folder (a resumed run reads them back).

One optimiser step consumes `batch_size x gradient_accumulation_steps x processes` examples; the loss is the mean
over the step's examples (TRL's mean over a batch when the step is one micro-batch).
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from tunelab.config import Config
from tunelab.data.batching import batches_for_epoch
from tunelab.runtime import return_free_heap
from tunelab.errors import TunelabError
from tunelab.model.loss import autocast_for
from tunelab.rundir import git_commit, hardware, now_iso, package_versions
from tunelab.train import checkpoint as ckpt
from tunelab.train.distributed import any_process, main_process_work
from tunelab.train.inputs import load_data
from tunelab.train.lifecycle import RunLife, TrainingDiverged, TrainingInterrupted, resume_command
from tunelab.train.monitor import fmt_lr
from tunelab.train.preference_loss import (collate_kto, collate_pairs, preference_step, reference_logps,
                                           shares_prompts)
from tunelab.train.recipe import (Plan, TrainState, make_plan, make_scheduler, param_groups, refuse_past_positions,
                                  refuse_short_disk, restore_state, same_base, unsaved, warn_no_eval)

REF_ADAPTER = "ref"


@contextmanager
def _eval_mode(model):
    """The reference is deterministic: no dropout while it runs (TRL disables dropout for the same reason)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def adapter_disabled(model):
    with model.disable_adapter(), _eval_mode(model):
        yield model


@contextmanager
def _switched(model, name: str):
    model.set_adapter(name)
    try:
        with _eval_mode(model):
            yield model
    finally:
        model.set_adapter("default")
        for n, p in model.named_parameters():  # set_adapter re-enables gradients per adapter: keep ref frozen
            if f".{REF_ADAPTER}." in n:
                p.requires_grad_(False)


class _Policy(torch.nn.Module):
    """Holds the (peft) model so accelerate / DDP wrap one module, as the SFT recipe's CausalLMLoss does. Training
    steps go through its forward: DDP all-reduces gradients only for a forward it ran."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, pcfg, stage: str, ref: dict | None, chunk_size: int):
        return preference_step(self.model, batch, pcfg, stage, ref, chunk_size)


@dataclass
class PrefSession:
    cfg: Config
    life: RunLife
    accelerator: Any
    tokenizer: Any
    data: Any  # inputs.Encoded, its examples hold prompt_ids / chosen_ids / rejected_ids (kto: completion_ids)
    plan: Plan
    inner: Any
    policy: Any
    optimizer: Any
    scheduler: Any
    autocast: Callable
    dtype: Any
    reference: Callable | None
    state: TrainState
    start_step: int
    epoch_batches: dict[int, list[list[int]]] = field(default_factory=dict)
    lr: float = 0.0  # the learning rate the last optimiser step used (the scheduler already holds the next one)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, text: str = "") -> None:
        self.life.say(text)


def train_preference(cfg: Config, life: RunLife, accelerator, resume_from: Path | None,
                     config_path: str | None) -> Path:
    """The run opened by `recipe.train` (processes started, run folder checked): set up, train, finish."""
    s = setup(cfg, life, accelerator, resume_from, config_path)
    run_loop(s)
    finish(s)
    return life.path


def setup(cfg: Config, life: RunLife, accelerator, resume_from: Path | None, config_path: str | None) -> PrefSession:
    from tunelab.model.loading import load_tokenizer
    from tunelab.runtime import runtime_info

    t_cfg, stage = cfg.training, cfg.training.stage
    torch.manual_seed(t_cfg.seed)
    tokenizer = load_tokenizer(cfg.model.name, revision=cfg.model.revision,
                               trust_remote_code=cfg.model.trust_remote_code, chat_template=cfg.model.chat_template)
    recorded = life.run.manifest().get("data_fingerprint") if not life.fresh else None
    data = load_data(cfg, tokenizer, life.path, accelerator.is_main_process, life.fresh, recorded, life.say)
    if stage == "kto" and len(data.train) < 2:  # its KL term pairs a prompt with another example's answer
        raise TunelabError(f"kto needs at least 2 training examples; the data has {len(data.train)}")
    if stage == "kto":
        life.say(kto_balance([e["label"] for e in data.train], cfg.preference))
    plan = make_plan(cfg, len(data.train), accelerator.num_processes)
    life.say(f"Run: {life.path}")
    life.say(f"Data ({stage}): {len(data.train)} train / {len(data.val)} eval examples (fingerprint "
             f"{data.fingerprint[:12]})")
    warn_no_eval(cfg, len(data.val), life.say)
    model, choice, reference, ref_info = build_policy(cfg, accelerator, life.say)
    refuse_past_positions(model, cfg, data.train + data.val)  # pairs kept past data.max_length
    base = same_base(cfg, life)
    refuse_short_disk(life, model, t_cfg.method)
    if not life.fresh:
        _same_reference(life.run.manifest().get("reference") or {}, ref_info)
    optimizer = torch.optim.AdamW(param_groups(model, t_cfg.weight_decay), lr=t_cfg.learning_rate,
                                  betas=(0.9, 0.999), eps=1e-8)
    scheduler = make_scheduler(optimizer, cfg, plan.total_steps)
    life.say(f"Schedule: {plan.total_steps} steps = {plan.num_epochs} epoch(s) x {plan.steps_per_epoch} steps; "
             f"{t_cfg.batch_size} examples x {t_cfg.gradient_accumulation_steps} accumulation per step; "
             f"{t_cfg.lr_scheduler} LR {fmt_lr(t_cfg.learning_rate)}; {stage} beta {cfg.preference.beta}")
    policy, optimizer = accelerator.prepare(_Policy(model), optimizer)
    inner = accelerator.unwrap_model(policy).model
    state = restore_state(cfg, life, inner, optimizer, scheduler, resume_from, plan.total_steps,
                          accelerator.process_index)
    life.run.update_manifest(
        seed=t_cfg.seed, method=t_cfg.method, stage=stage, reference=ref_info, model=cfg.model.name, base_model=base,
        data_fingerprint=data.fingerprint, data=data.data_info, dtype={"name": choice.name, "reason": choice.reason},
        versions=package_versions(), hardware=hardware(), runtime=runtime_info(), git_commit=git_commit(),
        processes=accelerator.num_processes, total_steps=plan.total_steps,
        config_path=str(config_path) if config_path else life.run.manifest().get("config_path"),
        started_at=life.run.manifest().get("started_at") or now_iso(),
        resumed_at=now_iso() if not life.fresh else None, error=None)
    s = PrefSession(cfg, life, accelerator, tokenizer, data, plan, inner, policy, optimizer, scheduler,
                    autocast_for(accelerator.device.type, choice.name), choice, reference, state, state.global_step)
    if reference is not None and cfg.preference.precompute_ref_logps:
        precompute_reference(s)
    return s


def kto_balance(labels: list[bool], pcfg) -> str:
    """The desirable / undesirable counts, with TRL's advice when the weighted ratio desirable_weight x desirable :
    undesirable_weight x undesirable leaves [1, 4/3] (the KTO paper's range), or a warning when one kind is absent."""
    good, bad = sum(labels), len(labels) - sum(labels)
    line = f"KTO labels: {good} desirable / {bad} undesirable"
    if not good or not bad:
        return (f"warning: {line}: every answer is {'desirable' if good else 'undesirable'}; kto then only moves "
                "each answer against the KL baseline, with no contrast to learn from: check the labels")
    ratio = pcfg.desirable_weight * good / (pcfg.undesirable_weight * bad)
    if 1 <= ratio <= 4 / 3:
        return line
    low, high = bad / good * pcfg.undesirable_weight, 4 / 3 * bad / good * pcfg.undesirable_weight
    return (f"warning: {line}, weighted {ratio:.2f} : 1 (outside the recommended 1 to 4/3); set "
            f"preference.desirable_weight between {low:.2f} and {high:.2f} (with undesirable_weight "
            f"{pcfg.undesirable_weight:g})")


def _same_reference(recorded: dict, now: dict) -> None:
    """A resumed run keeps the reference it started with: the adapter it started from must not have changed."""
    if recorded.get("fingerprint") and recorded["fingerprint"] != now.get("fingerprint"):
        raise TunelabError(f"--resume: the adapter this run started from ({recorded.get('adapter')}) has changed since "
                           f"(sha256 {recorded['fingerprint'][7:19]}… recorded, {str(now.get('fingerprint'))[7:19]}… "
                           "now): its rewards would be measured against another reference; put that adapter back, or "
                           "start a new run")


def build_policy(cfg: Config, accelerator, say):
    """(model to train, dtype choice, reference context or None, what the manifest records of the reference)."""
    from tunelab.train.recipe import build_model

    stage, method = cfg.training.stage, cfg.training.method
    if cfg.model.adapter:
        if method == "full":
            raise TunelabError("model.adapter starts a LoRA run from an adapter; for method=full give a merged model "
                               "as model.name (tunelab merge)")
        model, choice = _from_adapter(cfg, accelerator, say)
    else:
        model, choice = build_model(cfg, accelerator, say)
    if cfg.preference.disable_dropout:
        dropped = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        for m in dropped:
            m.p = 0.0
        if dropped:
            say(f"Dropout off in {len(dropped)} layers (preference.disable_dropout, as TRL)")
    if stage not in ("dpo", "kto"):
        return model, choice, None, {"kind": "none", "why": f"{stage} needs no reference model"}
    if cfg.model.adapter:
        from tunelab.model.loading import resolve_adapter_dir

        ref_dir = resolve_adapter_dir(cfg.model.adapter)
        info = {"kind": "adapter", "model": cfg.model.name, "adapter": str(ref_dir),
                "fingerprint": adapter_fingerprint(ref_dir)}
        return model, choice, lambda: _switched(model, REF_ADAPTER), info
    if method == "full":
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
        say("Reference: a frozen copy of the starting model (method=full)")
        return model, choice, lambda: nullcontext(frozen), {"kind": "frozen_copy", "model": cfg.model.name}
    say("Reference: the starting model, by disabling the adapter (no extra memory)")
    return model, choice, lambda: adapter_disabled(model), {"kind": "adapter_disabled", "model": cfg.model.name}


def _from_adapter(cfg: Config, accelerator, say):
    """The base with the SFT adapter trainable (`default`) and a frozen copy of it (`ref`)."""
    from tunelab.model.adapters import parameter_counts, peft_calls
    from tunelab.model.loading import resolve_adapter_dir
    from tunelab.train.recipe import load_base, ready_to_train

    folder = resolve_adapter_dir(cfg.model.adapter)
    base, choice = load_base(cfg, accelerator, say)
    with peft_calls():
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, str(folder), is_trainable=True)
        if cfg.training.stage in ("dpo", "kto"):
            model.load_adapter(str(folder), adapter_name=REF_ADAPTER, is_trainable=False)
            model.set_adapter("default")
    model = ready_to_train(model, accelerator, say, model.peft_config["default"].lora_dropout)
    trainable, total = parameter_counts(model)
    say(f"Starting from adapter {folder} | trainable params: {trainable:,} / {total:,}")
    return model, choice


def adapter_fingerprint(folder: Path) -> str:
    """sha256 of an adapter's weights: what a run records of the adapter it started from (its reference)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(folder.glob("adapter_model.*")):
        h.update(f.read_bytes())
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------- the loop


def collate(s: PrefSession, examples: list[dict], spare: dict | None = None) -> dict:
    stage = s.cfg.training.stage
    if stage == "kto":
        return collate_kto(examples, spare)
    batch = collate_pairs(examples, with_prompt_nll=stage == "orpo", share_prompt=shares_prompts(s.inner))
    if "ref_chosen" in examples[0]:  # precomputed reference log-probs
        batch["ref"] = {"logps": torch.tensor([e["ref_chosen"] for e in examples]
                                              + [e["ref_rejected"] for e in examples])}
    return batch


def micro_step(s: PrefSession, examples: list[dict], grad: bool = True, spare: dict | None = None):
    """One micro-batch's loss (kto: `spare`, another example, gives a lone example its KL pair)."""
    from tunelab.train.preference_loss import _to

    batch = _to(collate(s, examples, spare), s.accelerator.device)
    chunk, stage = s.cfg.training.loss_chunk_size, s.cfg.training.stage
    with s.autocast():
        ref = batch.get("ref")
        if ref is None and s.reference is not None:
            ref = reference_logps(s.reference, batch, stage, chunk)
        if not grad:
            with torch.no_grad():
                return preference_step(s.inner, batch, s.cfg.preference, stage, ref, chunk)
        return s.policy(batch, s.cfg.preference, stage, ref, chunk)


def run_loop(s: PrefSession) -> None:
    t_cfg, life = s.cfg.training, s.life
    life.global_step = s.state.global_step
    life.begin_training(s.plan.total_steps, s.start_step)
    t_last, tokens_since = time.time(), 0
    while s.state.global_step < s.plan.total_steps:
        step = s.state.global_step
        epoch, pos = divmod(step, s.plan.steps_per_epoch)
        if pos == 0 or step == s.start_step:
            s.say(f"Epoch {epoch + 1}/{s.plan.num_epochs}:")
        loss, grad_norm, metrics, n_tokens = train_step(s, epoch, pos)
        tokens_since += n_tokens
        step = s.state.global_step
        if step % t_cfg.logging_steps == 0 or step == s.plan.total_steps or step == 1:
            tps = tokens_since / max(time.time() - t_last, 1e-9)
            t_last, tokens_since = time.time(), 0
            log_step(s, loss, grad_norm, metrics, tps)
        if t_cfg.eval_steps and step % t_cfg.eval_steps == 0 and s.data.val and step < s.plan.total_steps:
            if evaluate(s):
                s.say(f"Early stopping: no eval improvement in {t_cfg.early_stopping_patience} evaluations")
                s.plan.total_steps = step
                break
        stop_now = any_process(s.accelerator, life.stop_signal is not None)
        if stop_now and life.stop_signal:
            life.announce_stop()
        if (t_cfg.save_steps and step % t_cfg.save_steps == 0 and step < s.plan.total_steps) or stop_now:
            save_step_checkpoint(s)
        if stop_now:
            raise TrainingInterrupted(
                f"stopped by {life.stop_signal or 'a signal'} after step {step}/{s.plan.total_steps}; checkpoint "
                f"written.\nResume with: {resume_command(life.path)}")


def train_step(s: PrefSession, epoch: int, pos: int):
    t_cfg, acc = s.cfg.training, s.accelerator
    if epoch not in s.epoch_batches:
        lengths = [e["n_tokens"] for e in s.data.train]
        s.epoch_batches = {epoch: batches_for_epoch(lengths, t_cfg.batch_size, t_cfg.seed, epoch)}
    group = s.epoch_batches[epoch][pos * s.plan.group_size:(pos + 1) * s.plan.group_size]
    world = acc.num_processes
    n_step = sum(len(b) for b in group)
    mine = group[acc.process_index::world] or group[:1]
    weight = 1.0 if group[acc.process_index::world] else 0.0  # a process without a micro-batch still all-reduces
    loss_sum, sums, tokens = 0.0, {}, 0
    for k, idx in enumerate(mine):
        examples = [s.data.train[i] for i in idx]
        with nullcontext() if k == len(mine) - 1 else acc.no_sync(s.policy):
            out = micro_step(s, examples, spare=s.data.train[idx[0] - 1])
            acc.backward(out.loss_sum / n_step * world * weight)
        if k < len(mine) - 1 and acc.device.type == "cpu":
            return_free_heap()  # as in recipe.forward_backward
        loss_sum += float(out.loss_sum.detach()) * weight
        for key, v in out.sums.items():
            sums[key] = sums.get(key, 0.0) + v * weight
        tokens += sum(e["n_tokens"] for e in examples)
    if world > 1:
        packed = acc.reduce(torch.tensor([loss_sum] + list(sums.values()), device=acc.device), reduction="sum")
        loss_sum, sums = float(packed[0]), dict(zip(sums, packed[1:].tolist()))
    loss = loss_sum / n_step
    grad_norm = float(acc.clip_grad_norm_(s.inner.parameters(), t_cfg.max_grad_norm) if t_cfg.max_grad_norm > 0
                      else torch.norm(torch.stack([p.grad.norm() for p in s.inner.parameters()
                                                   if p.grad is not None])))
    if t_cfg.nan_guard and not (math.isfinite(loss) and math.isfinite(grad_norm)):
        where = ", ".join(s.data.train[i]["where"] for b in group for i in b)
        raise TrainingDiverged(
            f"training diverged at step {s.state.global_step + 1}: loss={loss}, grad_norm={grad_norm}; the batch "
            f"held {where}. The last good checkpoint is kept; lower training.learning_rate or check those records, "
            "then resume with --resume")
    s.lr = s.scheduler.get_last_lr()[0]
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    s.state.global_step += 1
    s.state.train_loss = loss
    s.life.global_step = s.state.global_step
    s.life.reporter.advance(s.state.global_step, f"loss {loss:.3f}")
    return loss, grad_norm, reward_metrics(sums, n_step), tokens


def reward_metrics(sums: dict[str, float], n: int) -> dict[str, float]:
    """Means over the examples: rewards/chosen, rewards/rejected, rewards/accuracy, rewards/margin (kto: kl)."""
    if "count/chosen" in sums:  # kto: each side averaged over its own examples; a side absent is not logged (TRL)
        out = {f"rewards/{side}": sums[f"rewards/{side}"] / sums[f"count/{side}"] for side in ("chosen", "rejected")
               if sums[f"count/{side}"]}
        if len(out) == 2:
            out["rewards/margin"] = out["rewards/chosen"] - out["rewards/rejected"]
        return {**out, "kl": sums["kl"] / n}
    return {k: v / n for k, v in sums.items()}


def log_step(s: PrefSession, loss: float, grad_norm: float, metrics: dict, tokens_per_s: float) -> None:
    step, reporter = s.state.global_step, s.life.reporter
    lr = s.lr
    extra = "".join(f" | {label}: {metrics[k]:.3f}" for k, label in
                    (("rewards/accuracy", "Acc"), ("rewards/margin", "Margin"), ("kl", "KL")) if k in metrics)
    s.say(reporter.step_line(step, loss, lr, tokens_per_s, s.start_step) + extra)
    rec = {"step": step, "epoch": round(step / s.plan.steps_per_epoch, 4), "loss": loss, "lr": lr,
           "grad_norm": grad_norm, "tokens_per_s": round(tokens_per_s, 1),
           "elapsed_s": round(time.time() - reporter.start, 2), **metrics}
    s.life.run.log_metrics(rec)
    s.life.trackers.log(rec, step)


@torch.no_grad()
def preference_eval(s: PrefSession, examples: list[dict]) -> dict[str, float]:
    """Mean loss and reward metrics over held-out examples (the policy in eval mode)."""
    s.inner.eval()
    total, sums, bs = 0.0, {}, s.cfg.training.batch_size
    for k in range(0, len(examples), bs):
        out = micro_step(s, examples[k:k + bs], grad=False, spare=examples[k - 1] if k else s.data.train[0])
        total += float(out.loss_sum)
        for key, v in out.sums.items():
            sums[key] = sums.get(key, 0.0) + v
    s.inner.train()
    return {"eval_loss": total / len(examples), **{f"eval_{k}": v for k, v in reward_metrics(sums, len(examples)).items()}}


def evaluate(s: PrefSession) -> bool:
    """Eval loss and reward metrics; keep the best checkpoint; True when early stopping should stop (as SFT)."""
    step, state = s.state.global_step, s.state
    res = preference_eval(s, s.data.val)
    rec = {"step": step, "epoch": round(step / s.plan.steps_per_epoch, 4), **res}
    s.life.run.log_metrics(rec)
    s.life.trackers.log(rec, step)
    acc = res.get("eval_rewards/accuracy")
    improved = ckpt.improves(res["eval_loss"], state.best_eval)
    s.say(f"  Eval @ step {step} | Loss: {res['eval_loss']:.4f}"
          + (f" | Reward accuracy: {acc:.1%} | Margin: {res['eval_rewards/margin']:.3f}" if acc is not None else "")
          + (" (best)" if improved else ""))
    if not improved:
        state.bad_evals += 1
    else:
        state.best_eval, state.best_step, state.bad_evals = res["eval_loss"], step, 0
        save_artifacts(s, "checkpoint-best")
    patience = s.cfg.training.early_stopping_patience
    return bool(patience and state.bad_evals >= patience)


# ---------------------------------------------------------------- saving


def _save_model(s: PrefSession):
    """The trained weights only: the `ref` adapter is the starting point, not part of the result."""
    if s.cfg.training.method == "full":
        return lambda d: s.inner.save_pretrained(d, safe_serialization=True)
    return lambda d: s.inner.save_pretrained(d, selected_adapters=["default"], safe_serialization=True)


def save_step_checkpoint(s: PrefSession) -> None:
    from tunelab.train.recipe import checkpoint_bytes

    rngs = ckpt.all_rng_states()
    with main_process_work():  # a full disk stops every process with the main one's reason
        if s.main:
            ckpt.save_checkpoint(s.life.path, f"checkpoint-{s.state.global_step}", _save_model(s),
                                 optimizer=s.optimizer, scheduler=s.scheduler, trainer_state=asdict(s.state),
                                 estimate_bytes=checkpoint_bytes(s.inner, s.cfg.training.method), rng_states=rngs)
            ckpt.rotate(s.life.path, s.cfg.training.save_total_limit)


def save_artifacts(s: PrefSession, name: str) -> None:
    """checkpoint-best / checkpoint-final: the trained adapter (or model), tokenizer, tunelab.json."""
    import json

    from tunelab.train.recipe import checkpoint_bytes

    def write(d: Path) -> None:
        _save_model(s)(d)
        s.tokenizer.save_pretrained(d)
        c = s.cfg
        meta = {"base_model": c.model.name, "revision": c.model.revision, "trust_remote_code": c.model.trust_remote_code,
                "method": c.training.method, "dtype": s.dtype.name, "run_name": s.life.path.name,
                "max_length": c.data.max_length, "train_on": c.data.train_on, "system_prompt": c.data.system_prompt,
                "stage": c.training.stage, "reference": s.life.run.manifest().get("reference")}
        (d / "tunelab.json").write_text(json.dumps(meta, indent=2))

    with main_process_work():
        if s.main:
            ckpt.save_checkpoint(s.life.path, name, write,
                                 estimate_bytes=checkpoint_bytes(s.inner, s.cfg.training.method, optimizer=False))


def finish(s: PrefSession) -> None:
    if hasattr(s.life, "end_training"):
        s.life.end_training()
    step = s.state.global_step
    final: dict[str, Any] = {"train_loss": s.state.train_loss, "global_step": step}
    if s.data.val:
        final.update(preference_eval(s, s.data.val))
    try:
        save_artifacts(s, "checkpoint-final")
    except TunelabError as e:
        raise unsaved(s.life, step, e) from None
    with main_process_work():
        if s.main:
            ckpt.rotate(s.life.path, s.cfg.training.save_total_limit)
            s.say("")
            s.say("评估结果:")
            for k, v in final.items():
                if k != "global_step" and v is not None:
                    s.say(f"  {k}: {v:.4f}")
            s.say(f"  Final train loss: {final['train_loss']:.4f} after {step} steps")
            s.life.run.log_metrics({"step": step, "epoch": round(step / s.plan.steps_per_epoch, 4), "final": True,
                                    **{k: v for k, v in final.items() if k != "global_step"}})
            s.life.trackers.log({f"final/{k}": v for k, v in final.items()}, step)
            s.life.run.update_manifest(metrics={k: v for k, v in final.items() if k != "global_step"})


@torch.no_grad()
def precompute_reference(s: PrefSession) -> None:
    """dpo (the config refuses it elsewhere): reference log-probs of every pair, once (cached in the run folder for
    a resumed run; written beside it and renamed into place, so a kill never leaves half a cache)."""
    import os

    path = s.life.path / "ref_logps.pt"
    cache = _cached_reference(s, path)
    if cache is None:
        cache = {"fingerprint": s.data.fingerprint,
                 **{split: _reference_pairs(s, getattr(s.data, split)) for split in ("train", "val")}}
        if s.main:
            tmp = path.with_name(f".{path.name}.tmp")
            torch.save(cache, tmp)
            os.replace(tmp, path)
    for split in ("train", "val"):
        for e, (c, r) in zip(getattr(s.data, split), cache[split]):
            e["ref_chosen"], e["ref_rejected"] = c, r
    s.say(f"Reference log-probs precomputed for {len(s.data.train)} + {len(s.data.val)} pairs ({path.name})")


def _cached_reference(s: PrefSession, path: Path) -> dict | None:
    """The cache of an earlier start of this run, when it is whole and of this data; else None (computed again)."""
    if not path.is_file():
        return None
    try:
        cache = torch.load(path)
        ok = cache.get("fingerprint") == s.data.fingerprint and all(
            len(cache[split]) == len(getattr(s.data, split)) for split in ("train", "val"))
    except Exception as e:  # a file cut short by a full disk, or not a cache at all
        s.say(f"warning: {path.name} cannot be read ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__}): "
              "the reference log-probs are computed again")
        return None
    return cache if ok else None


def _reference_pairs(s: PrefSession, examples: list[dict]) -> list[tuple[float, float]]:
    """(chosen, rejected) reference log-probs of each pair, `training.batch_size` pairs per forward."""
    from tunelab.train.preference_loss import _to

    values, bs = [], s.cfg.training.batch_size
    for k in range(0, len(examples), bs):
        batch = _to(collate_pairs(examples[k:k + bs], share_prompt=shares_prompts(s.inner)), s.accelerator.device)
        with s.autocast():
            logps = reference_logps(s.reference, batch, "dpo", s.cfg.training.loss_chunk_size)["logps"]
        values += [tuple(v) for v in logps.view(2, -1).t().tolist()]
    return values
