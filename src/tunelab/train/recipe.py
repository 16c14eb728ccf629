"""The training recipe, top to bottom: set up, train, save.

    tunelab train --config config.yaml [training.epochs=1 lora.r=8] [--resume [RUN_DIR]]
    accelerate launch -m tunelab train --config config.yaml      # several processes (DDP); or --num-processes N

One optimiser step consumes `batch_size x gradient_accumulation_steps x processes` records. The loss is the
token-weighted mean over every trained token of the step, whatever the split across micro-batches and processes
(the step's token count is known before the forward pass), so packing, accumulation and DDP keep its meaning.
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.config import Config, load_config
from tunelab.errors import TunelabError
from tunelab.train import checkpoint as ckpt
from tunelab.train.batching import batches_for_epoch, collate_packed, collate_padded
from tunelab.train.loss import CausalLMLoss
from tunelab.train.monitor import Reporter, Trackers, fmt_lr, hms
from tunelab.train.rundir import RunDir, git_commit, hardware, now_iso, package_versions, read_metrics


class TrainingInterrupted(TunelabError):
    exit_code = 130


class TrainingDiverged(TunelabError):
    exit_code = 3


@dataclass
class Encoded:
    train: list[dict]
    val: list[dict]
    fingerprint: str
    data_info: dict[str, Any]


# ---------------------------------------------------------------- data


def load_data(cfg: Config, tokenizer, run: RunDir, main: bool) -> Encoded:
    """Prepare raw files into `<run>/data` (or read a prepared folder), then encode with the chat template."""
    from tunelab.data.prepare import load_prepared, prepare_dataset
    from tunelab.data.template import RecordRejected, encode_record

    src = Path(cfg.data.train)
    if src.is_dir() and (src / "train.jsonl").is_file():
        folder = src
    else:
        folder = run.path / "data"
        if main and not (folder / "train.jsonl").is_file():
            result = prepare_dataset([str(src)], folder, format=cfg.data.format, column_map=cfg.data.map or None,
                                     tokenizer=tokenizer, max_length=cfg.data.max_length, overflow=cfg.data.overflow,
                                     train_on=cfg.data.train_on, val_ratio=cfg.data.val_ratio,
                                     eval_inputs=[cfg.data.eval] if cfg.data.eval else None, seed=cfg.training.seed,
                                     system_prompt=cfg.data.system_prompt, name=run.path.name)
            if not result.usable:
                raise TunelabError(f"no usable training data in {src}; see {folder / 'report.md'}")
        _barrier()
    prepared = load_prepared(folder)
    val_records = prepared.val
    if cfg.data.eval and folder == src:  # a prepared train folder plus a separate eval source
        ev = Path(cfg.data.eval)
        val_records = load_prepared(ev).val or load_prepared(ev).train

    def encode(records: list[dict], split: str) -> list[dict]:
        out, rejected = [], []
        for rec in records:
            msgs = rec["messages"]
            if cfg.data.system_prompt and msgs[0]["role"] != "system":
                msgs = [{"role": "system", "content": cfg.data.system_prompt}] + msgs
            try:
                enc = encode_record(tokenizer, msgs, tools=rec.get("tools"), max_length=cfg.data.max_length,
                                    train_on=cfg.data.train_on, overflow=cfg.data.overflow)
            except RecordRejected as e:
                rejected.append({"source": rec.get("source"), "location": rec.get("location"), "reason": str(e)})
                continue
            n_targets = sum(1 for x in enc.labels[1:] if x != -100)
            out.append({"input_ids": enc.input_ids, "labels": enc.labels, "n_targets": n_targets,
                        "where": f"{rec.get('source')}:{rec.get('location')}"})
        if rejected and main:
            with open(run.path / f"rejected_at_encode.{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected)
        if rejected:
            print(f"warning: {len(rejected)} {split} records could not be trained with these settings "
                  f"(e.g. {rejected[0]['location']}: {rejected[0]['reason']}); listed in "
                  f"{run.path / f'rejected_at_encode.{split}.jsonl'}")
        return out

    train, val = encode(prepared.train, "train"), encode(val_records, "val")
    if not train:
        raise TunelabError(f"no trainable records in {folder}: every record was rejected (see its report.md)")
    info = {"folder": str(folder), "source": cfg.data.train, "train_records": len(train), "val_records": len(val),
            "train_tokens": sum(len(e["input_ids"]) for e in train),
            "train_target_tokens": sum(e["n_targets"] for e in train)}
    return Encoded(train, val, prepared.fingerprint, info)


# ---------------------------------------------------------------- distributed helpers


def _accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# ---------------------------------------------------------------- model


def build_model(cfg: Config, accelerator, say):
    from tunelab.model.adapters import apply_method, bnb_config, parameter_counts
    from tunelab.model.loading import choose_dtype, load_model
    from tunelab.runtime import lever_enabled
    from tunelab.train.attention import use_packed_attention
    from tunelab.train.dropout import install_fast_dropout

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
    if cfg.training.packing and lever_enabled("packed_attention") and use_packed_attention(model):
        say("Attention: per-record causal SDPA over packed rows (no scores across records)")
    if cfg.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(cfg.training.seed)  # adapter initialisation
    model = apply_method(model, cfg)
    if accelerator.device.type == "cpu" and lever_enabled("fast_dropout") and install_fast_dropout(model):
        say(f"LoRA dropout {cfg.lora.dropout}: masks from packed random bits on CPU (tunelab.train.dropout)")
    trainable, total = parameter_counts(model)
    say(f"Method: {cfg.training.method} | trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.2f}%)")
    return model, choice


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
    meta = {"base_model": cfg.model.name, "method": cfg.training.method, "dtype": dtype, "run_name": run_name,
            "max_length": cfg.data.max_length, "train_on": cfg.data.train_on}
    (folder / "tunelab.json").write_text(json.dumps(meta, indent=2))


def checkpoint_bytes(model, method: str) -> int:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable * 4 * 3 + 20 * 2**20  # weights + two Adam moments (fp32) + tokenizer


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


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def eval_loss(loss_fn: CausalLMLoss, examples: list[dict], batch_size: int, pad_id: int, autocast,
              device: torch.device | str = "cpu") -> tuple[float, int]:
    """Token-weighted mean loss over `examples` (padded batches; identical masking to training)."""
    was_training = loss_fn.training
    loss_fn.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for k in range(0, len(order), batch_size):
        batch = {key: v.to(device) for key, v in
                 collate_padded([examples[i] for i in order[k:k + batch_size]], pad_id).items()}
        with autocast():
            s, n = loss_fn(**batch)
        total += float(s)
        count += int(n)
    loss_fn.train(was_training)
    return (total / count if count else float("nan")), count


# ---------------------------------------------------------------- the recipe


def open_run(cfg: Config, resume: str | bool | None, main: bool) -> tuple[Config, RunDir, Path | None]:
    """(config, run folder, checkpoint to resume from): a new run, or an unfinished one with its own config."""
    if not resume:
        run = RunDir.create(cfg, main) if main else None
        _barrier()
        return cfg, run or RunDir(Path(cfg.output.dir) / (cfg.output.run_name or ""), main), None
    run_path = find_resume_run(cfg, resume)
    if not (run_path / "config.yaml").is_file():
        raise TunelabError(f"--resume: {run_path} is not a tunelab run folder (no config.yaml)")
    run = RunDir(run_path, main)
    if run.manifest().get("status") == "completed":
        raise TunelabError(f"--resume: {run_path} already completed; start a new run instead")
    points = ckpt.complete_checkpoints(run_path)
    # the run's own resolved config, not the one on the command line
    return load_config(run_path / "config.yaml"), run, points[-1][1] if points else None


def find_resume_run(cfg: Config, resume: str | bool) -> Path:
    if isinstance(resume, str) and resume not in ("", "latest"):
        return Path(resume)
    if cfg.output.run_name:
        return Path(cfg.output.dir) / cfg.output.run_name
    runs = sorted((p for p in Path(cfg.output.dir).glob("*/manifest.json")), key=lambda p: p.stat().st_mtime)
    unfinished = [p.parent for p in runs if json.loads(p.read_text()).get("status") != "completed"]
    if not unfinished:
        raise TunelabError(f"--resume: no unfinished run in {cfg.output.dir}; pass --resume RUN_DIR")
    return unfinished[-1]


def train(cfg: Config, resume: str | bool | None = None, config_path: str | None = None) -> Path:
    accelerator = _accelerator()
    if accelerator.device.type == "cpu":
        # denormal floats (activation tails, tiny LoRA gradients) are many times slower on x86: flush them to
        # zero, as GPUs do (measured ~10% faster per step here, losses unchanged at printed precision)
        torch.set_flush_denormal(True)
    main = accelerator.is_main_process
    world = accelerator.num_processes

    if world > 1 and not cfg.output.run_name and not resume:
        raise TunelabError("with several processes set output.run_name so every process writes the same run")

    cfg, run, resume_from = open_run(cfg, resume, main)
    t_cfg = cfg.training
    torch.manual_seed(t_cfg.seed)
    from tunelab.model.loading import load_tokenizer
    from tunelab.runtime import runtime_info

    tokenizer = load_tokenizer(cfg.model.name, revision=cfg.model.revision,
                               trust_remote_code=cfg.model.trust_remote_code, chat_template=cfg.model.chat_template)
    if not tokenizer.chat_template:
        raise TunelabError(f"{cfg.model.name} has no chat template; set model.chat_template (a Jinja string or file)")

    data = load_data(cfg, tokenizer, run, main)
    lengths = [len(e["input_ids"]) for e in data.train]
    micro_per_epoch = math.ceil(len(data.train) / t_cfg.batch_size)
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / (t_cfg.gradient_accumulation_steps * world)))
    total_steps = t_cfg.max_steps if t_cfg.max_steps > 0 else math.ceil(t_cfg.epochs * steps_per_epoch)
    num_epochs = math.ceil(total_steps / steps_per_epoch)

    reporter = Reporter(run.path / "train.log", total_steps, enabled=main)
    say = reporter.line
    say(f"Run: {run.path}")
    say(f"Data: {data.data_info['train_records']} train / {data.data_info['val_records']} eval records, "
        f"{data.data_info['train_target_tokens']:,} trained tokens per epoch (fingerprint {data.fingerprint[:12]})")
    model, choice = build_model(cfg, accelerator, say)
    loss_fn = CausalLMLoss(model, chunk_size=t_cfg.loss_chunk_size)
    optimizer = torch.optim.AdamW(param_groups(model, t_cfg.weight_decay), lr=t_cfg.learning_rate,
                                  betas=(0.9, 0.999), eps=1e-8)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    say(f"Schedule: {total_steps} steps = {num_epochs} epoch(s) x {steps_per_epoch} steps; "
        f"{t_cfg.batch_size} records x {t_cfg.gradient_accumulation_steps} accumulation x {world} process(es) "
        f"per step; {t_cfg.lr_scheduler} LR {fmt_lr(t_cfg.learning_rate)}, warm-up {t_cfg.warmup_ratio:.0%}")
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED and t_cfg.gradient_accumulation_steps > 1:
        raise TunelabError("DeepSpeed would step the optimiser after every micro-batch with this recipe: set "
                           "training.gradient_accumulation_steps=1 (raise training.batch_size or processes instead)")
    loss_fn, optimizer = accelerator.prepare(loss_fn, optimizer)
    inner = accelerator.unwrap_model(loss_fn).model
    # fp16 (GPUs without bf16) needs loss scaling or small gradients underflow to zero
    scaler = torch.amp.GradScaler(accelerator.device.type, enabled=choice.name == "fp16")
    autocast = ((lambda: torch.autocast(accelerator.device.type, dtype=choice.torch_dtype))
                if choice.name != "fp32" else nullcontext)

    state = {"global_step": 0, "best_eval": None, "best_step": None, "bad_evals": 0, "train_loss": None}
    if resume_from is not None:
        load_checkpoint_weights(inner, resume_from, cfg.training.method)
        state = ckpt.load_training_state(resume_from, optimizer, scheduler)
        run.truncate_metrics(state["global_step"])
        say(f"Resuming from {resume_from.name} (step {state['global_step']}/{total_steps})")
    elif resume:
        run.truncate_metrics(0)
        say("No complete checkpoint in the run yet: starting it from step 0")
        torch.manual_seed(t_cfg.seed)

    run.update_manifest(
        run_name=run.path.name, status="running", seed=t_cfg.seed, method=t_cfg.method, model=cfg.model.name,
        data_fingerprint=data.fingerprint, data=data.data_info, dtype={"name": choice.name, "reason": choice.reason},
        versions=package_versions(), hardware=hardware(), runtime=runtime_info(), git_commit=git_commit(),
        processes=world,
        config_path=str(config_path) if config_path else None, total_steps=total_steps,
        started_at=run.manifest().get("started_at") or now_iso(), resumed_at=now_iso() if resume_from else None)
    trackers = None

    # ---- Ctrl-C / SIGTERM: finish the step, checkpoint, say how to resume
    stop = {"signal": None}

    def _on_signal(signum, _frame):
        if stop["signal"] is not None:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name
        say(f"\n{stop['signal']} received: finishing the current step, then writing a checkpoint (Ctrl-C again to abort)")

    old_handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def save_step_checkpoint(step: int) -> None:
        sd = _gathered_state_dict(accelerator, loss_fn)  # every process takes part when weights are sharded
        if main:
            ckpt.save_checkpoint(run.path, f"checkpoint-{step}",
                                 lambda d: inner.save_pretrained(d, state_dict=sd, safe_serialization=True),
                                 optimizer=optimizer, scheduler=scheduler, trainer_state=state,
                                 estimate_bytes=checkpoint_bytes(inner, t_cfg.method))
            ckpt.rotate(run.path, t_cfg.save_total_limit)
        _barrier()

    collate = collate_packed if t_cfg.packing else (lambda b: collate_padded(b, tokenizer.pad_token_id))
    loss_fn.train()
    status, t_last, tokens_since = "running", time.time(), 0
    step = start_step = state["global_step"]
    epoch_batches: dict[int, list[list[int]]] = {}
    try:
        trackers = Trackers(cfg.tracking.report_to, run.path, run.path.name, cfg.tracking.project, cfg.to_dict(),
                            cfg.tracking.mlflow_tracking_uri, enabled=main,
                            run_ids=run.manifest().get("tracking") if resume_from is not None else None)
        run.update_manifest(tracking=trackers.run_ids)
        with reporter:
            reporter.start = t_last = time.time()  # the clock starts with the first step, not with loading
            while step < total_steps:
                epoch, pos = divmod(step, steps_per_epoch)
                if pos == 0 or step == start_step:
                    say(f"Epoch {epoch + 1}/{num_epochs}:")
                if epoch not in epoch_batches:
                    epoch_batches = {epoch: batches_for_epoch(lengths, t_cfg.batch_size, t_cfg.seed, epoch,
                                                              t_cfg.group_by_length)}
                group_size = t_cfg.gradient_accumulation_steps * world
                group = epoch_batches[epoch][pos * group_size:(pos + 1) * group_size]
                loss_value, n_tokens = forward_backward(group, data.train, collate, accelerator, loss_fn, autocast,
                                                        scaler)
                tokens_since += n_tokens
                scaler.unscale_(optimizer)
                grad_norm = (accelerator.clip_grad_norm_(inner.parameters(), t_cfg.max_grad_norm)
                             if t_cfg.max_grad_norm > 0 else _grad_norm(inner))
                grad_norm = float(grad_norm)
                # with fp16 loss scaling an inf gradient only means "skip this step and lower the scale"
                if t_cfg.nan_guard and not (math.isfinite(loss_value)
                                            and (math.isfinite(grad_norm) or scaler.is_enabled())):
                    where = ", ".join(data.train[i]["where"] for b in group for i in b)
                    raise TrainingDiverged(
                        f"training diverged at step {step + 1}: loss={loss_value}, grad_norm={grad_norm}; the batch "
                        f"held {where}. The last good checkpoint is kept; lower training.learning_rate or check "
                        "those records, then resume with --resume")
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                state["global_step"] = step
                state["train_loss"] = loss_value
                lr = scheduler.get_last_lr()[0]
                reporter.advance(step, f"loss {loss_value:.3f}")
                if step % t_cfg.logging_steps == 0 or step == total_steps or step == 1:
                    dt_s = max(time.time() - t_last, 1e-9)
                    tps = tokens_since * (world if world > 1 else 1) / dt_s
                    t_last, tokens_since = time.time(), 0
                    say(reporter.step_line(step, loss_value, lr, tps, start_step))
                    rec = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": loss_value, "lr": lr,
                           "grad_norm": grad_norm, "tokens_per_s": round(tps, 1),
                           "elapsed_s": round(time.time() - reporter.start, 2)}
                    run.log_metrics(rec)
                    trackers.log(rec, step)
                if t_cfg.eval_steps and step % t_cfg.eval_steps == 0 and data.val and step < total_steps:
                    if _evaluate_and_track(loss_fn, data, cfg, tokenizer, autocast, run, trackers, state, step,
                                           steps_per_epoch, inner, say, main, choice.name):
                        say(f"Early stopping: no eval improvement in {t_cfg.early_stopping_patience} evaluations")
                        total_steps = step
                        break
                stop_now = stop["signal"] is not None
                if world > 1:  # the signal reaches processes at different times: stop together or hang
                    flag = torch.tensor(float(stop_now), device=accelerator.device)
                    stop_now = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
                if (t_cfg.save_steps and step % t_cfg.save_steps == 0 and step < total_steps) or stop_now:
                    save_step_checkpoint(step)
                if stop_now:
                    status = "interrupted"
                    raise TrainingInterrupted(
                        f"stopped by {stop['signal'] or 'a signal'} after step {step}/{total_steps}; checkpoint written.\n"
                        f"Resume with: tunelab train --resume {run.path}")
            # ---- end of training: final eval, final artefacts
            final: dict[str, Any] = {"train_loss": state["train_loss"], "global_step": step}
            if data.val:
                ev, n = eval_loss(loss_fn, data.val, t_cfg.batch_size, tokenizer.pad_token_id, autocast,
                                  accelerator.device)
                final.update(eval_loss=ev, eval_tokens=n, perplexity=math.exp(ev) if ev < 50 else float("inf"))
            sd = _gathered_state_dict(accelerator, loss_fn)
            if main:
                ckpt.save_checkpoint(run.path, "checkpoint-final",
                                     lambda d: save_final_artifacts(inner, tokenizer, cfg, d, run.path.name,
                                                                    choice.name, sd),
                                     estimate_bytes=checkpoint_bytes(inner, t_cfg.method))
                ckpt.rotate(run.path, t_cfg.save_total_limit)
                final.update(_final_generation_metrics(inner, tokenizer, cfg, data, say))
                _print_eval_block(final, say)
                run.log_metrics({"step": step, "epoch": round(step / steps_per_epoch, 4), "final": True,
                                 **{k: v for k, v in final.items() if k != "global_step"}})
                trackers.log({f"final/{k}": v for k, v in final.items()}, step)
            status = "completed"
            _barrier()
            return run.path
    except TrainingInterrupted:
        raise
    except TrainingDiverged:
        status = "diverged"
        raise
    except KeyboardInterrupt:
        status = "interrupted"
        raise TrainingInterrupted(f"aborted; resume from the last checkpoint with: tunelab train --resume {run.path}") from None
    except BaseException:
        status = "failed"
        raise
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if trackers is not None:
            trackers.close("FINISHED" if status == "completed" else "FAILED" if status != "interrupted" else "KILLED")
        started = run.manifest().get("started_at")
        summary = {}
        if status == "completed":
            last = [m for m in read_metrics(run.path) if m.get("final")] if main else []
            summary = {k: v for k, v in (last[-1] if last else {}).items() if k not in ("step", "epoch", "final")}
        run.update_manifest(status=status, ended_at=now_iso(), global_step=state["global_step"],
                            duration_s=_duration(started), metrics=summary or run.manifest().get("metrics", {}))
        reporter.close()


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
        if weight:
            tokens += int(batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel())
    if world > 1:
        step_loss = accelerator.reduce(step_loss, reduction="sum")
    return float(step_loss) / step_tokens, tokens


def _gathered_state_dict(accelerator, wrapped) -> dict | None:
    """Full weights gathered from every process under FSDP / DeepSpeed (None when each process holds them all)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return None
    sd = accelerator.get_state_dict(wrapped)
    return {k.removeprefix("model."): v for k, v in sd.items()} if sd is not None else None


def _grad_norm(model) -> torch.Tensor:
    norms = [p.grad.detach().norm(2) for p in model.parameters() if p.grad is not None]
    return torch.norm(torch.stack(norms), 2) if norms else torch.tensor(0.0)


def _duration(started: str | None) -> float | None:
    if not started:
        return None
    import datetime as dt

    return round((dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(started)).total_seconds(), 1)


def _evaluate_and_track(loss_fn, data, cfg, tokenizer, autocast, run, trackers, state, step, steps_per_epoch,
                        inner, say, main, dtype_name) -> bool:
    """Eval loss + perplexity; keep the best checkpoint; return True when early stopping should stop."""
    ev, n = eval_loss(loss_fn, data.val, cfg.training.batch_size, tokenizer.pad_token_id, autocast,
                      next(loss_fn.parameters()).device)
    ppl = math.exp(ev) if ev < 50 else float("inf")
    rec = {"step": step, "epoch": round(step / steps_per_epoch, 4), "eval_loss": ev, "eval_perplexity": ppl,
           "eval_tokens": n}
    run.log_metrics(rec)
    trackers.log(rec, step)
    improved = state["best_eval"] is None or ev < state["best_eval"]
    say(f"  Eval @ step {step} | Loss: {ev:.4f} | Perplexity: {ppl:.2f}{' (best)' if improved else ''}")
    if improved:
        state.update(best_eval=ev, best_step=step, bad_evals=0)
        if main:
            ckpt.save_checkpoint(run.path, "checkpoint-best",
                                 lambda d: save_final_artifacts(inner, tokenizer, cfg, d, run.path.name, dtype_name),
                                 estimate_bytes=checkpoint_bytes(inner, cfg.training.method))
    else:
        state["bad_evals"] += 1
    patience = cfg.training.early_stopping_patience
    return bool(patience and state["bad_evals"] >= patience)


def _final_generation_metrics(model, tokenizer, cfg: Config, data: Encoded, say) -> dict[str, float]:
    """BLEU (and the other generation metrics asked for in eval.metrics) on held-out records."""
    wanted = [m for m in cfg.eval.metrics if m != "perplexity"]
    if not wanted or not data.val:
        return {}
    from tunelab.data.prepare import load_prepared
    from tunelab.evaluate import evaluate_records

    records = load_prepared(data.data_info["folder"]).val[: cfg.eval.max_samples]
    model.eval()
    res = evaluate_records(model, tokenizer, records, wanted, max_length=cfg.data.max_length,
                           train_on=cfg.data.train_on, max_new_tokens=cfg.eval.max_new_tokens,
                           max_samples=cfg.eval.max_samples, batch_size=cfg.eval.batch_size)
    model.train()
    return {k: v for k, v in res.metrics.items() if k in ("bleu", "chrf", "rouge_l", "exact_match")}


def _print_eval_block(final: dict[str, Any], say) -> None:
    say("")
    say("评估结果 (evaluation on the held-out split):")
    if "perplexity" in final:
        say(f"  Perplexity: {final['perplexity']:.2f}   (eval loss {final['eval_loss']:.4f} over "
            f"{final['eval_tokens']} tokens)")
    for key, label in (("bleu", "BLEU"), ("chrf", "chrF"), ("rouge_l", "ROUGE-L"), ("exact_match", "Exact match")):
        if key in final:
            say(f"  {label}: {final[key]:.1f}")
    say(f"  Final train loss: {final['train_loss']:.4f} after {final['global_step']} steps")
