"""The training recipe, top to bottom: set up, train (step, evaluate, save), finish; the run's owner cleans up.

    tunelab train --config config.yaml [training.epochs=1 lora.r=8] [--resume [RUN_DIR]]
    accelerate launch -m tunelab train --config config.yaml      # several processes (DDP); or --num-processes N

One optimiser step consumes `batch_size x gradient_accumulation_steps x processes` records, or with
`training.batch_tokens` that many tokens in place of batch_size, each such micro-batch run as
`Config.token_passes()` forward/backward passes so that memory follows the pass. The loss is the
token-weighted mean over every trained token of the step, whatever the split across micro-batches and processes
(the step's token count is known before the forward pass), so packing, accumulation and DDP keep its meaning.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from tunelab.config import Config, load_run_config
from tunelab.errors import TunelabError
from tunelab.train import checkpoint as ckpt
from tunelab.data.batching import collate_packed, collate_padded, micro_batches_per_epoch, step_batches_for_epoch
from tunelab.train.distributed import (any_process, gathered_state_dict, make_accelerator, params_sharded,
                                       main_process_work, refuse_unverified_sharding,
                                       require_run_name, require_shared_run_folder)
from tunelab.train.inputs import Encoded, load_data
from tunelab.train.lifecycle import (OptionalWorkStopped, RunLife, TrainingDiverged, TrainingInterrupted, open_run,
                                    resume_command)
from tunelab.model.loss import CausalLMLoss, autocast_for, eval_loss
from tunelab.train.monitor import fmt_lr, rss_gib
from tunelab.rundir import git_commit, hardware, now_iso, package_versions
from tunelab.runtime import bound_kernel_caches, return_free_heap

__all__ = ["train", "TrainingInterrupted", "TrainingDiverged", "save_final_artifacts"]


@dataclass
class TrainState:
    """What a checkpoint records of the loop (trainer_state.json)."""

    global_step: int = 0
    best_eval: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    train_loss: float | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainState":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class Plan:
    steps_per_epoch: int
    total_steps: int
    num_epochs: int
    group_size: int  # forward passes per optimiser step, over all processes
    pass_tokens: int = 0  # most tokens in one pass under training.batch_tokens (0: record-count batches)


@dataclass
class Session:
    """Everything `setup` built for one run; the stages below read and update it."""

    cfg: Config
    life: RunLife
    accelerator: Any
    tokenizer: Any
    data: Encoded
    plan: Plan
    inner: Any  # the (peft) model, unwrapped
    loss_fn: Any  # CausalLMLoss, wrapped by accelerate
    optimizer: Any
    scheduler: Any
    scaler: Any
    autocast: Callable
    dtype: Any  # DtypeChoice
    state: TrainState
    start_step: int
    collate: Callable
    epoch_batches: dict[int, list[list[int]]] = field(default_factory=dict)
    lr: float = 0.0  # the learning rate the last optimiser step used (the scheduler already holds the next one)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def say(self, text: str = "") -> None:
        self.life.say(text)


# ---------------------------------------------------------------- the recipe


def train(cfg: Config, resume: str | bool | None = None, config_path: str | None = None,
          overrides: list[str] | None = None) -> Path:
    """Train `cfg` (or resume a run, applying the `overrides` that are safe mid-run); return the run folder."""
    # before this process's first product: it fixes their size (smaller for passes of few tokens)
    bound_kernel_caches(cfg.token_passes()[1] if cfg.training.batch_tokens else None)
    refuse_unverified_sharding()  # FSDP / DeepSpeed: before any process loads or writes anything, every stage
    accelerator = make_accelerator()
    if accelerator.device.type == "cpu":
        # denormal floats (activation tails, tiny LoRA gradients) are many times slower on x86: flush them to
        # zero, as GPUs do (measured ~10% faster per step here, losses unchanged at printed precision)
        torch.set_flush_denormal(True)
    require_run_name(cfg, resume, accelerator.num_processes)
    preference = _stage(cfg, resume) not in ("sft", "pt")
    cfg, life, resume_from = open_run(cfg, resume, accelerator.is_main_process, overrides)
    with life:
        require_shared_run_folder(accelerator, life.path)  # the other processes read the data prepared there
        if preference:  # preference stages: their own recipe (train/preference.py)
            from tunelab.train.preference import train_preference

            return train_preference(cfg, life, accelerator, resume_from, config_path)
        s = setup(cfg, life, accelerator, resume_from, config_path)
        run_loop(s)
        finish(s)
    return life.path


def _stage(cfg: Config, resume) -> str:
    """The stage of the run to train: a resumed run's own config decides (the command line may hold defaults)."""
    if not resume:
        return cfg.training.stage
    from tunelab.train.lifecycle import find_resume_run

    saved = find_resume_run(cfg, resume) / "config.yaml"
    return load_run_config(saved).training.stage if saved.is_file() else cfg.training.stage


def setup(cfg: Config, life: RunLife, accelerator, resume_from: Path | None, config_path: str | None) -> Session:
    """Tokenizer, data, model, optimiser and schedule; the checkpoint's state when resuming."""
    from tunelab.model.loading import load_tokenizer
    from tunelab.runtime import runtime_info

    t_cfg, main, world = cfg.training, accelerator.is_main_process, accelerator.num_processes
    torch.manual_seed(t_cfg.seed)
    tokenizer = load_tokenizer(cfg.model.name, revision=cfg.model.revision,
                               trust_remote_code=cfg.model.trust_remote_code, chat_template=cfg.model.chat_template)
    if not tokenizer.chat_template and t_cfg.stage == "sft":  # pt reads raw text: no template needed
        raise TunelabError(f"{cfg.model.name} has no chat template; set model.chat_template (a Jinja string or file)")
    recorded = life.run.manifest().get("data_fingerprint") if not life.fresh else None
    data = load_data(cfg, tokenizer, life.path, main, life.fresh, recorded, life.say)
    plan = make_plan(cfg, [len(e["input_ids"]) for e in data.train], world)
    life.say(f"Run: {life.path}")
    life.say(f"Data: {data.data_info['train_records']} train / {data.data_info['val_records']} eval records, "
             f"{data.data_info['train_target_tokens']:,} trained tokens per epoch (fingerprint {data.fingerprint[:12]})")
    warn_no_eval(cfg, len(data.val), life.say)
    model, choice = build_model(cfg, accelerator, life.say)
    refuse_past_positions(model, cfg, data.train + data.val)  # records kept past data.max_length
    base = same_base(cfg, life)
    refuse_short_disk(life, model, t_cfg.method)
    loss_fn = CausalLMLoss(model, chunk_size=t_cfg.loss_chunk_size)
    optimizer = torch.optim.AdamW(param_groups(model, t_cfg.weight_decay), lr=t_cfg.learning_rate,
                                  betas=(0.9, 0.999), eps=1e-8)
    scheduler = make_scheduler(optimizer, cfg, plan.total_steps)
    life.say(f"Schedule: {plan.total_steps} steps = {plan.num_epochs} epoch(s) x {plan.steps_per_epoch} steps; "
             f"{_micro_batch_words(cfg)} x {t_cfg.gradient_accumulation_steps} accumulation x {world} process(es) "
             f"per step; {t_cfg.lr_scheduler} LR {fmt_lr(t_cfg.learning_rate)}, warm-up {t_cfg.warmup_ratio:.0%}")
    _refuse_deepspeed_accumulation(accelerator, plan.group_size // world)
    loss_fn, optimizer = accelerator.prepare(loss_fn, optimizer)
    inner = accelerator.unwrap_model(loss_fn).model
    state = restore_state(cfg, life, inner, optimizer, scheduler, resume_from, plan.total_steps,
                          accelerator.process_index)
    life.run.update_manifest(
        seed=t_cfg.seed, method=t_cfg.method, stage=t_cfg.stage, model=cfg.model.name, base_model=base,
        data_fingerprint=data.fingerprint,
        data=data.data_info, dtype={"name": choice.name, "reason": choice.reason}, versions=package_versions(),
        hardware=hardware(), runtime=runtime_info(), git_commit=git_commit(), processes=world,
        config_path=str(config_path) if config_path else life.run.manifest().get("config_path"),
        total_steps=plan.total_steps, started_at=life.run.manifest().get("started_at") or now_iso(),
        resumed_at=now_iso() if not life.fresh else None, error=None)
    # fp16 (GPUs without bf16) needs loss scaling or small gradients underflow to zero
    scaler = torch.amp.GradScaler(accelerator.device.type, enabled=choice.name == "fp16")
    collate = collate_packed if t_cfg.packing else (lambda b: collate_padded(b, tokenizer.pad_token_id))
    if t_cfg.stage == "pt":  # blocks of documents: each document its own packed record (tunelab.data.text)
        from tunelab.data.text import collate_blocks as collate
    return Session(cfg, life, accelerator, tokenizer, data, plan, inner, loss_fn, optimizer, scheduler, scaler,
                   autocast_for(accelerator.device.type, choice.name), choice, state, state.global_step, collate)


def make_plan(cfg: Config, lengths: list[int] | int, world: int) -> Plan:
    """Steps per epoch and in all, from the records' token counts (a token budget packs a count of its own) or,
    for record-count batches (the preference stages), from the number of records."""
    t_cfg = cfg.training
    passes, pass_tokens = cfg.token_passes() if t_cfg.batch_tokens and not isinstance(lengths, int) else (1, 0)
    per_step = t_cfg.gradient_accumulation_steps * passes * world  # forward passes per optimiser step
    micro_per_epoch = (math.ceil(lengths / t_cfg.batch_size) if isinstance(lengths, int)
                       else micro_batches_per_epoch(lengths, t_cfg, pass_tokens))
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / per_step))
    total_steps = t_cfg.max_steps if t_cfg.max_steps > 0 else math.ceil(t_cfg.epochs * steps_per_epoch)
    return Plan(steps_per_epoch, total_steps, math.ceil(total_steps / steps_per_epoch), per_step, pass_tokens)


def _micro_batch_words(cfg: Config) -> str:
    t_cfg = cfg.training
    if not t_cfg.batch_tokens:
        return f"{t_cfg.batch_size} records"
    passes, pass_tokens = cfg.token_passes()
    return f"<= {t_cfg.batch_tokens} tokens" + (f" (passes of <= {pass_tokens})" if passes > 1 else "")


def _refuse_deepspeed_accumulation(accelerator, passes: int) -> None:
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED and passes > 1:
        raise TunelabError("DeepSpeed would step the optimiser after every forward pass with this recipe: set "
                           "training.gradient_accumulation_steps=1 (raise training.batch_size or processes instead)"
                           " and, with training.batch_tokens, training.pass_tokens to batch_tokens")


def same_base(cfg: Config, life: RunLife) -> dict[str, Any]:
    """The identity of the base weights, for the manifest (after loading: a hub model is in the cache by then). A
    resumed run refuses base weights other than those it started on: its adapter learnt a difference from them."""
    from tunelab.model.loading import base_changes, base_identity

    now = base_identity(cfg.model.name, cfg.model.revision)
    recorded = None if life.fresh else life.run.manifest().get("base_model")
    if not life.fresh and recorded is None:
        life.say("This run's manifest records no identity of its base weights (an older tunelab started it): "
                 "they are not checked on this resume, and are recorded from now on")
    changes = base_changes(recorded, now) if recorded else []
    if changes:
        raise TunelabError(f"--resume: the base model {cfg.model.name} is not the one this run started on: "
                           f"{'; '.join(changes)}. The checkpoint was trained on top of the old base weights; "
                           "continuing it on these would mix two models (the loss would jump): put the old weights "
                           "back to resume, or start a new run (without --resume) on these")
    return now


def refuse_short_disk(life: RunLife, model, method: str) -> None:
    """Before step 1: room for one checkpoint, or every step is trained and then lost for want of it (with the
    default save_steps=0 the first checkpoint written is checkpoint-final, after the last step)."""
    need = checkpoint_bytes(model, method)
    with main_process_work():  # the main process writes the checkpoints; its refusal stops the others
        if not life.main:
            return
        if life.fresh:
            then = "Nothing was trained: free some space or set output.dir to a disk with room, then start again"
        else:
            then = f"Nothing more was trained: free some space, then resume: {resume_command(life.path)}"
        ckpt.check_disk(life.path, need, then)  # the rule every checkpoint is written under


def unsaved(life: RunLife, step: int, error: TunelabError) -> TunelabError:
    """checkpoint-final could not be written: the error, saying plainly that the trained weights are lost with
    this process and where a resume starts."""
    points = ckpt.complete_checkpoints(life.path)
    where = (f"a resume continues from checkpoint-{points[-1][0]}" if points
             else "no checkpoint of this run exists, so a resume trains it again from step 0")
    why = error.reason if isinstance(error, ckpt.NotWritten) else error  # without its own "resume with: …"
    return TunelabError(f"the trained weights were NOT saved: checkpoint-final, the result of all {step} steps, "
                        f"could not be written ({why}). They are lost when this process ends; {where}: "
                        f"{resume_command(life.path)}")


def restore_state(cfg: Config, life: RunLife, inner, optimizer, scheduler, resume_from: Path | None,
                  total_steps: int, rank: int = 0) -> TrainState:
    """Weights, optimiser, schedule and step from `resume_from` (both recipes); no checkpoint: a fresh start."""
    if resume_from is not None:
        load_checkpoint_weights(inner, resume_from, cfg.training.method)
        state = TrainState.from_json(ckpt.load_training_state(resume_from, optimizer, scheduler, rank))
        life.run.truncate_metrics(state.global_step)
        life.say(f"Resuming from {resume_from.name} (step {state.global_step}/{total_steps})")
        return state
    if not life.fresh:
        life.run.truncate_metrics(0)
        life.say("No complete checkpoint in the run yet: starting it from step 0")
    return TrainState()


def run_loop(s: Session) -> None:
    """Steps until the plan is done, early stopping says stop, or a signal asks for a checkpoint and a stop."""
    t_cfg, life = s.cfg.training, s.life
    life.global_step = s.state.global_step
    life.begin_training(s.plan.total_steps, s.start_step)
    t_last, tokens_since = time.time(), 0
    while s.state.global_step < s.plan.total_steps:
        step = s.state.global_step
        epoch, pos = divmod(step, s.plan.steps_per_epoch)
        if pos == 0 or step == s.start_step:
            s.say(f"Epoch {epoch + 1}/{s.plan.num_epochs}:")
        loss_value, grad_norm, n_tokens = train_step(s, epoch, pos)
        tokens_since += n_tokens
        step = s.state.global_step
        if step % t_cfg.logging_steps == 0 or step == s.plan.total_steps or step == 1:
            tps = tokens_since * s.world / max(time.time() - t_last, 1e-9)
            t_last, tokens_since = time.time(), 0
            log_step(s, loss_value, grad_norm, tps)
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


def train_step(s: Session, epoch: int, pos: int) -> tuple[float, float, int]:
    """One optimiser step: (loss, gradient norm, non-padding tokens of this process)."""
    t_cfg = s.cfg.training
    if epoch not in s.epoch_batches:
        lengths = [len(e["input_ids"]) for e in s.data.train]
        s.epoch_batches = {epoch: step_batches_for_epoch(lengths, t_cfg, epoch, s.plan.pass_tokens)}
    group = s.epoch_batches[epoch][pos * s.plan.group_size:(pos + 1) * s.plan.group_size]
    loss_value, n_tokens = forward_backward(group, s.data.train, s.collate, s.accelerator, s.loss_fn, s.autocast,
                                            s.scaler)
    s.scaler.unscale_(s.optimizer)
    grad_norm = float(s.accelerator.clip_grad_norm_(s.inner.parameters(), t_cfg.max_grad_norm)
                      if t_cfg.max_grad_norm > 0 else _grad_norm(s.inner))
    # with fp16 loss scaling an inf gradient only means "skip this step and lower the scale"
    if t_cfg.nan_guard and not (math.isfinite(loss_value) and (math.isfinite(grad_norm) or s.scaler.is_enabled())):
        where = ", ".join(s.data.train[i]["where"] for b in group for i in b)
        raise TrainingDiverged(
            f"training diverged at step {s.state.global_step + 1}: loss={loss_value}, grad_norm={grad_norm}; the "
            f"batch held {where}. The last good checkpoint is kept; lower training.learning_rate or check those "
            "records, then resume with --resume")
    s.lr = s.scheduler.get_last_lr()[0]
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    s.state.global_step += 1
    s.state.train_loss = loss_value
    s.life.global_step = s.state.global_step
    s.life.reporter.advance(s.state.global_step, f"loss {loss_value:.3f}")
    return loss_value, grad_norm, n_tokens


def log_step(s: Session, loss_value: float, grad_norm: float, tokens_per_s: float) -> None:
    """The brief's step line, metrics.jsonl and the trackers."""
    step, reporter = s.state.global_step, s.life.reporter
    s.say(reporter.step_line(step, loss_value, s.lr, tokens_per_s, s.start_step))
    rec = {"step": step, "epoch": round(step / s.plan.steps_per_epoch, 4), "loss": loss_value, "lr": s.lr,
           "grad_norm": grad_norm, "tokens_per_s": round(tokens_per_s, 1), "rss_gib": round(rss_gib(), 3),
           "elapsed_s": round(time.time() - reporter.start, 2)}
    s.life.run.log_metrics(rec)
    s.life.trackers.log(rec, step)


def _val_loss(s: Session) -> tuple[float, int]:
    """The held-out loss and its token count, in padded batches of at most a pass's tokens under batch_tokens."""
    return eval_loss(s.loss_fn, s.data.val, s.cfg.training.batch_size, s.tokenizer.pad_token_id, s.autocast,
                     s.accelerator.device, s.plan.pass_tokens)


def warn_no_eval(cfg: Config, val_records: int, say: Callable[[str], None]) -> None:
    """Evaluation asked for with nothing held out (data.val_ratio 0, no data.eval) would silently never run."""
    t = cfg.training
    if not val_records and t.eval_steps:
        say(f"warning: no eval records are held out, so training.eval_steps {t.eval_steps}"
            f"{' and early_stopping_patience' if t.early_stopping_patience else ''} do nothing (no eval loss, no "
            "checkpoint-best); set data.val_ratio (e.g. 0.1) or data.eval to evaluate")


def evaluate(s: Session) -> bool:
    """Eval loss + perplexity; keep the best checkpoint; True when early stopping should stop."""
    step, state = s.state.global_step, s.state
    ev, n = _val_loss(s)
    ppl = math.exp(ev) if ev < 50 else float("inf")
    rec = {"step": step, "epoch": round(step / s.plan.steps_per_epoch, 4), "eval_loss": ev, "eval_perplexity": ppl,
           "eval_tokens": n}
    s.life.run.log_metrics(rec)
    s.life.trackers.log(rec, step)
    improved = ckpt.improves(ev, state.best_eval)
    s.say(f"  Eval @ step {step} | Loss: {ev:.4f} | Perplexity: {ppl:.2f}{' (best)' if improved else ''}")
    if not improved:
        state.bad_evals += 1
    else:
        state.best_eval, state.best_step, state.bad_evals = ev, step, 0
        save_artifacts(s, "checkpoint-best")
    patience = s.cfg.training.early_stopping_patience
    return bool(patience and state.bad_evals >= patience)


def save_step_checkpoint(s: Session) -> None:
    """A resumable checkpoint: weights, optimiser, schedule, RNG and the loop's state."""
    sd = gathered_state_dict(s.accelerator, s.loss_fn)  # every process takes part when weights are sharded
    rngs = ckpt.all_rng_states()
    with main_process_work():  # a full disk stops every process with the main one's reason
        if s.main:
            ckpt.save_checkpoint(s.life.path, f"checkpoint-{s.state.global_step}",
                                 lambda d: s.inner.save_pretrained(d, state_dict=sd, safe_serialization=True),
                                 optimizer=s.optimizer, scheduler=s.scheduler, trainer_state=asdict(s.state),
                                 estimate_bytes=checkpoint_bytes(s.inner, s.cfg.training.method), rng_states=rngs)
            ckpt.rotate(s.life.path, s.cfg.training.save_total_limit)


def save_artifacts(s: Session, name: str) -> None:
    """checkpoint-best / checkpoint-final: adapter (or model) from gathered weights, tokenizer, tunelab.json."""
    sd = gathered_state_dict(s.accelerator, s.loss_fn)  # every process takes part when weights are sharded
    with main_process_work():
        if s.main:
            ckpt.save_checkpoint(s.life.path, name,
                                 lambda d: save_final_artifacts(s.inner, s.tokenizer, s.cfg, d, s.life.path.name,
                                                                s.dtype.name, sd),
                                 estimate_bytes=checkpoint_bytes(s.inner, s.cfg.training.method, optimizer=False))


def finish(s: Session) -> None:
    """Final eval loss, the final artefacts, generation metrics and the brief's evaluation block."""
    s.life.end_training()
    step = s.state.global_step
    final: dict[str, Any] = {"train_loss": s.state.train_loss, "global_step": step}
    if s.data.val:
        ev, n = _val_loss(s)
        final.update(eval_loss=ev, eval_tokens=n, perplexity=math.exp(ev) if ev < 50 else float("inf"))
    if s.life.stop_signal:
        s.life.announce_stop()
    try:
        save_artifacts(s, "checkpoint-final")
    except TunelabError as e:
        raise unsaved(s.life, step, e) from None
    with main_process_work():
        # with sharded weights every forward pass needs every process: all generate (in step), the main one reports
        generated = _final_generation_metrics(s) if s.main or params_sharded(s.accelerator) else {}
        if s.main:
            ckpt.rotate(s.life.path, s.cfg.training.save_total_limit)
            final.update(generated)
            _print_eval_block(final, s.say)
            s.life.run.log_metrics({"step": step, "epoch": round(step / s.plan.steps_per_epoch, 4), "final": True,
                                    **{k: v for k, v in final.items() if k != "global_step"}})
            s.life.trackers.log({f"final/{k}": v for k, v in final.items()}, step)
            s.life.run.update_manifest(metrics={k: v for k, v in final.items() if k != "global_step"})


# ---------------------------------------------------------------- model


def build_model(cfg: Config, accelerator, say):
    """The base model (`load_base`) with the run's new adapter, or trainable weights for method=full."""
    from tunelab.model.adapters import apply_method, parameter_counts

    model, choice = load_base(cfg, accelerator, say)
    torch.manual_seed(cfg.training.seed)  # adapter initialisation
    model = ready_to_train(apply_method(model, cfg, say), accelerator, say, cfg.lora.dropout)
    trainable, total = parameter_counts(model)
    say(f"Method: {cfg.training.method} | trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.2f}%)")
    return model, choice


def _fp32_trainable(model):
    """Every trained weight in fp32, the optimiser's master copy (matmuls run in the run's dtype under autocast).
    peft makes its adapters fp32 itself, but the copies of lora.modules_to_save and the biases of lora.bias
    kept a bf16 base's dtype, where AdamW's learning-rate-sized steps round away (one 2e-4 step left 68% of
    weights of magnitude 0.15 unchanged). Tied copies (one Parameter held by two modules) stay tied."""
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()  # the same Parameter object: every module holding it sees the fp32 copy
    return model


def load_base(cfg: Config, accelerator, say):
    """The base model as training needs it: the run's dtype (QLoRA: 4-bit), no KV cache, per-record packed
    attention, gradient checkpointing when asked. Returns (model, dtype choice)."""
    from tunelab.model.adapters import bnb_config
    from tunelab.model.attention import use_packed_attention
    from tunelab.model.loading import choose_dtype, load_model
    from tunelab.runtime import lever_enabled

    choice = choose_dtype(cfg.model.dtype)
    say(f"Precision: {choice.name} ({choice.reason})")
    quant = None
    load_dtype = choice.name
    if cfg.training.method == "qlora":
        compute = choose_dtype(cfg.quantization.compute_dtype if cfg.quantization.compute_dtype != "auto"
                               else choice.name)
        quant = bnb_config(cfg, compute.torch_dtype)
        say(f"QLoRA: base weights in 4-bit {cfg.quantization.quant_type.upper()}"
            f"{' with double quantisation' if cfg.quantization.double_quant else ''}, compute in {compute.name}")
    if cfg.training.method == "full":
        load_dtype = "fp32"  # fp32 master weights; matmuls run in `choice` through autocast
    model, _ = load_model(cfg.model.name, dtype=load_dtype, revision=cfg.model.revision,
                          trust_remote_code=cfg.model.trust_remote_code,
                          attn_implementation=cfg.model.attn_implementation, quantization=quant,
                          device_map={"": accelerator.device} if quant is not None and torch.cuda.is_available() else None)
    model.config.use_cache = False
    refuse_past_positions(model, cfg)
    if cfg.training.packing and lever_enabled("packed_attention") and use_packed_attention(model):
        say("Attention: per-record causal SDPA over packed rows (no scores across records)")
    if cfg.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, choice


def refuse_past_positions(model, cfg: Config, records: Sequence[dict] = ()) -> None:
    """A record longer than the model's positions trains on positions it never had (rotary models) or fails in
    the embedding lookup (learned positions); packed rows restart positions at each record, so the record's
    length is what counts. `records` (encoded): data.overflow=keep trains records past data.max_length whole."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return
    if cfg.data.max_length > positions:
        raise TunelabError(f"data.max_length={cfg.data.max_length} is more than {cfg.model.name}'s "
                           f"max_position_embeddings ({positions}); give data.max_length at most {positions}")
    over = [e for e in records if _positions_used(e) > positions]
    if over:
        longest = max(over, key=_positions_used)
        raise TunelabError(f"{len(over)} record(s) kept whole by data.overflow={cfg.data.overflow} are longer than "
                           f"{cfg.model.name}'s max_position_embeddings ({positions}); the longest has "
                           f"{_positions_used(longest)} tokens ({longest['where']}). Set data.overflow=truncate (or "
                           "drop) to train at most data.max_length tokens of each")


def _positions_used(example: dict) -> int:
    """An encoded example's longest sequence: its tokens, or (preference stages) its prompt and longest answer."""
    if "input_ids" in example:
        return len(example["input_ids"])
    answers = [len(v) for k, v in example.items() if k.endswith("_ids") and k != "prompt_ids"]
    return len(example["prompt_ids"]) + max(answers, default=0)


def ready_to_train(model, accelerator, say, lora_dropout: float):
    """Training mode and the CPU levers on a model with its trainable weights in place."""
    from tunelab.model.fused_lora import install_fused_lora
    from tunelab.model.lean_layers import install_autocast_lora_inputs, install_lean_layers
    from tunelab.runtime import lever_enabled
    from tunelab.train.dropout import install_fast_dropout

    # from_pretrained returns the model in eval mode and peft's wrapper does not change its layers: transformers
    # checkpoints a layer only in training mode, and dropout only drops in it
    _fp32_trainable(model)  # a new adapter, or one loaded to train on (preference stages' model.adapter)
    model.train()
    if accelerator.device.type == "cpu" and lever_enabled("fast_dropout") and install_fast_dropout(model):
        say(f"LoRA dropout {lora_dropout}: masks from packed random bits on CPU (tunelab.train.dropout)")
    if accelerator.device.type == "cpu" and lever_enabled("fused_lora") and install_fused_lora(model):
        say("LoRA layers: frozen matmul, dropout and adapter in one pass (tunelab.model.fused_lora)")
    if lever_enabled("lean_layers") and install_lean_layers(model, rebuild=lever_enabled("rebuild_inputs")):
        say("RMSNorm and SwiGLU keep less for backward (tunelab.model.lean_layers)")
    if lever_enabled("autocast_lora_inputs"):
        install_autocast_lora_inputs(model)
    return model


def param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_scheduler(optimizer, cfg: Config, total_steps: int):
    from transformers import get_scheduler

    warmup = math.ceil(cfg.training.warmup_ratio * total_steps)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.training.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


# ---------------------------------------------------------------- saving


def save_final_artifacts(model, tokenizer, cfg: Config, folder: Path, run_name: str, dtype: str,
                         state_dict: dict | None = None) -> None:
    """The adapter (or full model) plus tokenizer, chat template and tunelab.json: loadable by plain peft."""
    model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    meta = {"base_model": cfg.model.name, "revision": cfg.model.revision,
            "trust_remote_code": cfg.model.trust_remote_code, "method": cfg.training.method, "dtype": dtype,
            "run_name": run_name, "max_length": cfg.data.max_length, "train_on": cfg.data.train_on,
            "system_prompt": cfg.data.system_prompt, **({"stage": "pt"} if cfg.training.stage == "pt" else {})}
    (folder / "tunelab.json").write_text(json.dumps(meta, indent=2))


def checkpoint_bytes(model, method: str, optimizer: bool = True) -> int:
    """The size of a checkpoint, for the disk check: a step checkpoint holds the optimiser's state, checkpoint-best
    and checkpoint-final do not (asking room for it there could refuse a run's only save for space it never uses)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable * 4 * (3 if optimizer else 1) + 20 * 2**20  # weights (+ two Adam moments), fp32; tokenizer


def load_checkpoint_weights(inner, folder: Path, method: str) -> None:
    """Put a step checkpoint's weights (adapter, or the whole model for method=full) back into `inner`."""
    from safetensors.torch import load_file

    if method != "full":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(inner, load_file(folder / "adapter_model.safetensors"))
        return
    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(f))
    res = inner.load_state_dict(sd, strict=False)
    tied = {"lm_head.weight"} if getattr(inner.config, "tie_word_embeddings", False) else set()
    if res.unexpected_keys or set(res.missing_keys) - tied:
        raise TunelabError(f"--resume: {folder} does not match the model "
                           f"(missing {res.missing_keys[:3]}, unexpected {res.unexpected_keys[:3]})")


# ---------------------------------------------------------------- evaluation and helpers


def forward_backward(group: list[list[int]], train: list[dict], collate, accelerator, loss_fn, autocast,
                     scaler) -> tuple[float, int]:
    """Backward over this process's micro-batches of one optimiser step; (step loss, non-padding tokens here)."""
    world = accelerator.num_processes
    step_tokens = max(sum(train[i]["n_targets"] for b in group for i in b), 1)
    mine = group[accelerator.process_index::world]
    # The last step of an epoch may hold fewer micro-batches than processes: a process left without one still
    # runs a zero-weighted pass so that it joins the gradient all-reduce (or the others hang).
    weight = 1.0
    if not mine:
        mine, weight = group[:1], 0.0
    step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    tokens = 0
    for k, idx in enumerate(mine):
        batch = {key: v.to(accelerator.device) for key, v in collate([train[i] for i in idx]).items()}
        sync = k == len(mine) - 1
        with (nullcontext() if sync else accelerator.no_sync(loss_fn)), autocast():
            loss_sum, _ = loss_fn(**batch)
        # token-weighted mean over the whole step; DDP averages over processes, hence x world
        accelerator.backward(scaler.scale(loss_sum / step_tokens * world * weight))
        step_loss += loss_sum.detach().double() * weight
        if not sync and accelerator.device.type == "cpu":
            return_free_heap()  # the pass's freed activations: their pages are not resident for the next pass
        if weight:
            tokens += int(batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel())
    if world > 1:
        step_loss = accelerator.reduce(step_loss, reduction="sum")
    return float(step_loss) / step_tokens, tokens


def _grad_norm(model) -> torch.Tensor:
    norms = [p.grad.detach().norm(2) for p in model.parameters() if p.grad is not None]
    return torch.norm(torch.stack(norms), 2) if norms else torch.tensor(0.0)


def _final_generation_metrics(s: Session) -> dict[str, float]:
    """BLEU (and the other generation metrics asked for in eval.metrics) on the records perplexity used."""
    cfg = s.cfg
    wanted = [m for m in cfg.eval.metrics if m != "perplexity"]
    if not wanted or not s.data.val_records:
        return {}
    from tunelab.evaluate import evaluate_records

    # one process: a signal (now, or already during the final eval loss) skips them; checkpoint-final is saved
    one = s.accelerator.num_processes == 1
    skipped = f"generation metrics ({', '.join(wanted)}) skipped: {{}} received; checkpoint-final is saved"
    if one and s.life.stop_signal:
        s.say(skipped.format(s.life.stop_signal))
        return {}
    s.inner.eval()
    try:
        with s.life.optional_work() if one else nullcontext():
            res = evaluate_records(s.inner, s.tokenizer, s.data.val_records[: cfg.eval.max_samples], wanted,
                                   max_length=cfg.data.max_length, train_on=cfg.data.train_on,
                                   max_new_tokens=cfg.eval.max_new_tokens, max_samples=cfg.eval.max_samples,
                                   batch_size=cfg.eval.batch_size)
    except OptionalWorkStopped:
        s.say("\n" + skipped.format(s.life.stop_signal))
        return {}
    finally:
        s.inner.train()
    return {k: v for k, v in res.metrics.items() if k in ("bleu", "chrf", "rouge_l", "exact_match")}


def _print_eval_block(final: dict[str, Any], say) -> None:
    say("")
    say("评估结果:")  # the brief's block, as it prints it: the held-out split's scores
    if "perplexity" in final:
        say(f"  Perplexity: {final['perplexity']:.2f}")
        say(f"  Eval loss: {final['eval_loss']:.4f} over {final['eval_tokens']:,} held-out tokens")
    for key, label in (("bleu", "BLEU"), ("chrf", "chrF"), ("rouge_l", "ROUGE-L"), ("exact_match", "Exact match")):
        if key in final:
            say(f"  {label}: {final[key]:.1f}")
    say(f"  Final train loss: {final['train_loss']:.4f} after {final['global_step']} steps")
