"""Training benchmark: tunelab vs a plain TRL SFTTrainer + PEFT baseline, and each tunelab lever on its own.

    python bench/train.py --quick                     # 6 steps per row, 24 held-out records (minutes on 2 cores)
    python bench/train.py --json bench-train.json     # 30 steps per row, 100 held-out records
    python bench/train.py --quick --only trl,tunelab  # some rows only (see --list)
    python bench/train.py --dtype bf16 --steps 4 --only tunelab-tokens,llamafactory  # bf16 memory on any CPU

The workload of every row: the bundled SmolLM2-135M-Instruct, LoRA r=16 / alpha 32 / dropout 0.05 on all linear
layers (except the output head), Alpaca records of at most 512 tokens (`../shared/data/llamafactory/
alpaca_en_demo.json` when present, else generated), batch 4, AdamW lr 2e-4 with tunelab's default cosine schedule
and warm-up, max grad norm 1.0, seed 42, the same number of optimiser steps, and the same records in the same order
(the baseline reads them in tunelab's epoch order with a sequential sampler; only the group_by_length row orders
them differently, by design).

Rows:
- `trl`: baseline. TRL `SFTTrainer` + PEFT with TRL's defaults (which include gradient checkpointing and TRL's own
  fused LM-head loss) except fp32 (`bf16=False`) and no packing. The data is TRL's conversational
  prompt-completion form ({"prompt": [user], "completion": [assistant]}), so `completion_only_loss` (its default
  for such data) trains exactly the tokens tunelab trains (the answer, `<|im_end|>` and the newline after it; the
  SmolLM2 ChatML template has no `{% generation %}` markers, so `assistant_only_loss` is not available for it).
- `trl-nogc`: the same with `gradient_checkpointing=False` (TRL's default turns it on; HF Trainer's does not).
- `tunelab`: `tunelab.train.recipe.train(cfg)` with its defaults: auto dtype, packing with per-record attention,
  chunked loss with the frozen-head gradient made in forward, cheap CPU LoRA dropout masks, and the process started
  as `tunelab train` starts itself (glibc tcache off, see `tunelab.runtime`).
- one lever switched off at a time (`TUNELAB_PERF_OFF`): `masked_attention` (packed rows through SDPA with
  transformers' block-diagonal mask), `torch_dropout` (`torch.bernoulli_` masks), `recomputed_head` (each head
  chunk recomputed in backward), `system_malloc` (glibc defaults).
- one setting at a time: `padded` (packing off), `group_by_length` (padded, length-grouped batches), `fp32`,
  `bf16`, `grad_ckpt`, `lean` (gradient checkpointing and 256-token loss chunks: the least memory),
  `full_logits` (loss_chunk_size huge: the logits of all trained tokens at once), and the methods `qlora`
  (4-bit NF4 base, bitsandbytes) and `full` (every weight trained).

Every row runs in its own process, so its peak RSS (the child's own high-water mark from `os.wait4`) is clean.
Measured per row: non-padding tokens/s and the median seconds per step after `--warmup` steps (timed around each
optimiser step: data collation, forward, backward, clipping, optimiser, logging), peak RSS, the last step's train
loss, and the eval loss on the same held-out records, computed afterwards for every row by one function: each
row's saved adapter (or full model) on the fp32 base, `tunelab.data.template.encode_record` masking and
`tunelab.model.loss.CausalLMLoss` (so the baseline is measured exactly like tunelab). Model-FLOPs utilisation
uses training FLOPs = 6 x N x non-padding tokens (N = every parameter of the base model, the tied embedding/output
head counted once; attention-score FLOPs ignored), against the fp32 or bf16 matmul peak measured in the same run
(the one of the row's compute dtype; the higher of two measurements, before and after the rows).
6N is the usual convention; LoRA skips the frozen weights' gradients (about 4N of real work) and tunelab skips the
output head for untrained tokens, so MFU by this formula is "useful work per second", comparable across rows.
The machine is shared in most places: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (GIB, alpaca_records, fmt, machine_summary, matmul_peak, median_after_warmup,  # noqa: E402
                    model_params, run_child, step_timer, text_table)

BUNDLED = "bundled:smollm2-135m-instruct"

# key, label, kind, tunelab overrides (or trl options)
VARIANTS: list[tuple[str, str, str, Any]] = [
    ("trl", "baseline: TRL SFTTrainer + PEFT (fp32, padded)", "trl", {}),
    ("trl-nogc", "baseline, gradient_checkpointing off", "trl", {"gradient_checkpointing": False}),
    ("tunelab", "tunelab defaults (auto dtype, packing, chunked loss)", "tunelab", []),
    ("tunelab-tokens", "tunelab defaults, training.batch_tokens = batch x max_length (the peer's tokens per step; "
     "by default run as passes of <= 512 tokens)", "tunelab", ["training.batch_tokens=@tokens"]),
    ("tokens-grad_ckpt", "tunelab-tokens + gradient_checkpointing", "tunelab",
     ["training.batch_tokens=@tokens", "training.gradient_checkpointing=true"]),
    ("tokens-one_pass", "tunelab-tokens in one pass per step (training.pass_tokens = batch_tokens)", "tunelab",
     ["training.batch_tokens=@tokens", "training.pass_tokens=@tokens"]),
    ("tokens-pass1024", "tunelab-tokens in passes of <= half the step (training.pass_tokens = batch_tokens / 2)",
     "tunelab", ["training.batch_tokens=@tokens", "training.pass_tokens=@tokens/2"]),
    ("tokens-sdpa_attention", "tunelab-tokens with SDPA's flash kernel for every record (lever bmm_attention off)",
     "tunelab", ["training.batch_tokens=@tokens"]),
    ("tokens-unfused_lora", "tunelab-tokens with peft's LoRA forward (lever fused_lora off)", "tunelab",
     ["training.batch_tokens=@tokens"]),
    ("tokens-draw_per_mask", "tunelab-tokens, each LoRA mask drawn on its own (lever layer_masks off)", "tunelab",
     ["training.batch_tokens=@tokens"]),
    ("tokens-keep_inputs", "tunelab-tokens, LoRA layers keep the norm and SwiGLU outputs they read (lever "
     "rebuild_inputs off)", "tunelab", ["training.batch_tokens=@tokens"]),
    ("tokens-trim_heap", "tunelab-tokens + free heap pages returned between the passes (opt-in lever trim_heap)",
     "tunelab", ["training.batch_tokens=@tokens"]),
    ("llamafactory", "LLaMA-Factory 0.9.5, neat_packing, bf16 where the CPU has fast bf16 (else fp32)",
     "llamafactory", {}),
    ("llamafactory-fp32", "LLaMA-Factory 0.9.5, neat_packing, fp32", "llamafactory", {"bf16": False}),
    ("llamafactory-tcache_off", "LLaMA-Factory as the llamafactory row, with tunelab's allocator setting (glibc's "
     "tcache off)", "llamafactory", {}),
    ("unsloth", "Unsloth 2026.10.9 on CPU, its defaults (bf16 where fast, else fp32; packing is off on CPU)", "unsloth",
     {}),
    ("padded", "tunelab, packing off (padded)", "tunelab", ["training.packing=false"]),
    ("group_by_length", "tunelab, padded + group_by_length", "tunelab",
     ["training.packing=false", "training.group_by_length=true"]),
    ("fp32", "tunelab, model.dtype=fp32", "tunelab", ["model.dtype=fp32"]),
    ("bf16", "tunelab, model.dtype=bf16", "tunelab", ["model.dtype=bf16"]),
    ("grad_ckpt", "tunelab, gradient_checkpointing", "tunelab", ["training.gradient_checkpointing=true"]),
    ("lean", "tunelab, gradient_checkpointing + loss_chunk_size=256", "tunelab",
     ["training.gradient_checkpointing=true", "training.loss_chunk_size=256"]),
    ("masked_attention", "tunelab, packed rows through SDPA with a block mask", "tunelab", []),
    ("torch_dropout", "tunelab, LoRA dropout masks from torch.bernoulli_", "tunelab", []),
    ("recomputed_head", "tunelab, head + CE recomputed in backward", "tunelab", []),
    ("no_logit_buffers", "tunelab, loss-head logits in fresh tensors each chunk", "tunelab", []),
    ("unfused_lora", "tunelab with peft's LoRA forward (lever fused_lora off)", "tunelab", []),
    ("system_malloc", "tunelab, glibc allocator defaults (tcache on)", "tunelab", []),
    ("full_logits", "tunelab, loss_chunk_size=1e6 (all logits)", "tunelab", ["training.loss_chunk_size=1000000"]),
    ("qlora", "tunelab, method=qlora (4-bit NF4)", "tunelab", ["training.method=qlora"]),
    ("full", "tunelab, method=full", "tunelab", ["training.method=full"]),
]
KEYS = [v[0] for v in VARIANTS]
# levers switched off through the environment (tunelab.runtime): same config, one lever off
LEVER_OFF = {"tokens-sdpa_attention": "bmm_attention", "tokens-unfused_lora": "fused_lora",
             "tokens-draw_per_mask": "layer_masks", "tokens-keep_inputs": "rebuild_inputs",
             "unfused_lora": "fused_lora", "masked_attention": "packed_attention", "torch_dropout": "fast_dropout",
             "recomputed_head": "fused_head", "no_logit_buffers": "logit_buffers"}
LEVER_ON = {"tokens-trim_heap": "trim_heap"}  # opt-in levers (tunelab.runtime.OPT_IN)
PEERS = {"llamafactory", "unsloth"}  # row kinds that are other trainers at the peer's own batching (the "x peer" column)
# peer rows run in an environment the peer does not ship with: measured and shown, never the "x peer" reference
PEER_ENV_VARIANTS = {"llamafactory-tcache_off"}
PEER_DIR = Path(os.environ.get("TUNELAB_PEERS_DIR", Path.home() / ".cache" / "tunelab-peers"))


# ================================================================ children (each in its own process)


def _write(path: str, obj: dict) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, default=str))


def child_peak(spec: dict) -> None:
    import torch

    out = {"machine": machine_summary(), "params": model_params(spec["model_dir"]),
           "peaks": {d: matmul_peak(d) for d in ("fp32", "bf16")}}
    if torch.cuda.is_available():
        out["note"] = "CUDA present: the peaks above are the CPU's; the rows train on the GPU"
    _write(spec["result"], out)


def child_tunelab(spec: dict) -> None:
    from tunelab.config import load_config
    from tunelab.train.recipe import train

    t0 = time.perf_counter()
    cfg = load_config(None, overrides=spec["overrides"])
    run = train(cfg)
    total_s = time.perf_counter() - t0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [m for m in lines if "loss" in m and not m.get("final")]
    elapsed = [m["elapsed_s"] for m in steps]
    times = [b - a for a, b in zip([0.0] + elapsed[:-1], elapsed)]
    manifest = json.loads((run / "manifest.json").read_text())
    metrics = manifest.get("metrics") or {}
    _write(spec["result"], {
        "step_times": times, "losses": [m["loss"] for m in steps], "reported_tokens_per_s": [m["tokens_per_s"] for m in steps],
        "final_train_loss": metrics.get("train_loss", steps[-1]["loss"] if steps else None),
        "own_eval_loss": metrics.get("eval_loss"), "dtype": manifest.get("dtype"), "run_dir": str(run),
        "checkpoint": str(run / "checkpoint-final"), "method": manifest.get("method"), "total_s": total_s,
        "torch_threads": _threads()})


def child_trl(spec: dict) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    t0 = time.perf_counter()
    records = [json.loads(x) for x in Path(spec["train_file"]).read_text(encoding="utf-8").splitlines() if x.strip()]
    rows = []
    for i in spec["order"]:
        msgs = records[i]["messages"]
        assert msgs[-1]["role"] == "assistant", "the baseline expects single-answer records"
        rows.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
    ds = Dataset.from_list(rows)
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    opts = spec.get("trl_options", {})
    args = SFTConfig(
        output_dir=spec["out_dir"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"],
        learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=spec["warmup_steps"], weight_decay=0.0,
        max_grad_norm=1.0, seed=spec["seed"], bf16=False, fp16=False, max_length=spec["max_length"], packing=False,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        train_sampling_strategy="sequential", dataloader_num_workers=0, **opts)
    times: list[float] = []
    torch.manual_seed(spec["seed"])  # LoRA initialisation, as tunelab seeds it just before get_peft_model
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[step_timer(times)],
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    # the tokens TRL trains on must be the ones tunelab trains on (same template, same completion mask)
    n_trained = sum(sum(1 for x in lab if x != -100) for lab in
                    (trainer.data_collator([trainer.train_dataset[i]])["labels"][0].tolist()
                     for i in range(min(8, len(trainer.train_dataset)))))
    trainer.train()
    adapter = Path(spec["out_dir"]) / "adapter"
    trainer.save_model(str(adapter))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    _write(spec["result"], {
        "step_times": times, "losses": losses, "final_train_loss": losses[-1] if losses else None,
        "dtype": {"name": "fp32", "reason": "SFTConfig(bf16=False)"}, "checkpoint": str(adapter),
        "gradient_checkpointing": args.gradient_checkpointing, "loss_type": args.loss_type,
        "completion_only_loss": args.completion_only_loss, "trained_tokens_first8": n_trained,
        "total_s": time.perf_counter() - t0, "torch_threads": _threads()})


def child_eval(spec: dict) -> None:
    """Eval loss of every row's checkpoint on the same records, one function: fp32, training's masking and loss."""
    import gc

    import torch

    from tunelab.data.prepare import load_prepared
    from tunelab.evaluate.perplexity import perplexity
    from tunelab.model.loading import load_model, load_tokenizer

    prepared = load_prepared(spec["eval_dir"])
    records = list(prepared.val) or list(prepared.train)
    tok = load_tokenizer(spec["model_dir"])
    out = {}
    for key, path in spec["items"].items():
        t0 = time.perf_counter()
        p = Path(path)
        if (p / "adapter_config.json").is_file():
            from peft import PeftModel

            base, _ = load_model(spec["model_dir"], dtype="fp32")
            model = PeftModel.from_pretrained(base, str(p))
        else:  # method=full: the checkpoint is a whole model
            model, _ = load_model(str(p), dtype="fp32")
        model.eval()
        res = perplexity(model, tok, records, max_length=spec["max_length"], train_on="assistant", batch_size=8)
        out[key] = {"eval_loss": res.loss, "eval_tokens": res.tokens, "records": res.records, "skipped": res.skipped,
                    "seconds": time.perf_counter() - t0}
        del model
        gc.collect()
        torch.manual_seed(0)
    _write(spec["result"], out)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


CHILDREN = {"peak": child_peak, "tunelab": child_tunelab, "trl": child_trl, "eval": child_eval}


# ================================================================ the parent


def prepare_data(work: Path, model_dir: Path, n_eval: int, max_length: int, seed: int, data: str | None,
                 reuse: bool = False) -> dict:
    """Two prepared folders: train (records ≤ max_length tokens) and the held-out eval records."""
    from tunelab.data.prepare import load_prepared, prepare_dataset
    from tunelab.model.loading import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    all_dir, eval_dir = work / "prepared-all", work / "prepared-eval"
    if reuse and (all_dir / "report.json").is_file() and (eval_dir / "report.json").is_file():
        return _data_info(tok, all_dir, eval_dir, max_length, "reused " + str(all_dir))
    if data:
        raw, source = Path(data), data
    else:
        recs, source = alpaca_records()
        raw = work / "alpaca.json"
        raw.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    quiet = lambda *_: None  # noqa: E731
    prepare_dataset([str(raw)], all_dir, tokenizer=tok, max_length=max_length, overflow="drop",
                    val_ratio=0.1, seed=seed, console=quiet).raise_if_unusable()
    prepared = load_prepared(all_dir)
    held_out = prepared.val[:n_eval]
    if not held_out:
        raise SystemExit("no held-out records: the 10% validation split is empty")
    if len(held_out) < n_eval:  # every row is evaluated on the same records, so fewer only widen the error bars
        print(f"held-out: the 10% validation split has {len(held_out)} records of <= {max_length} tokens "
              f"({n_eval} asked); evaluating on those", flush=True)
    # the held-out records as their own prepared folder (recipe: data.eval), the train split as the training data
    eval_raw = work / "heldout.jsonl"
    eval_raw.write_text("".join(json.dumps({"messages": r["messages"]}, ensure_ascii=False) + "\n" for r in held_out))
    prepare_dataset([str(eval_raw)], eval_dir, tokenizer=tok, max_length=max_length, overflow="drop", val_ratio=0.0,
                    seed=seed, console=quiet).raise_if_unusable()
    return _data_info(tok, all_dir, eval_dir, max_length, source)


def _data_info(tok, all_dir: Path, eval_dir: Path, max_length: int, source: str) -> dict:
    from tunelab.data.prepare import load_prepared
    from tunelab.data.template import encode_record

    lengths = [len(encode_record(tok, r["messages"], max_length=max_length, train_on="assistant").input_ids)
               for r in load_prepared(all_dir).train]
    assert max(lengths) <= max_length
    return {"source": source, "train_dir": str(all_dir), "train_file": str(all_dir / "train.jsonl"),
            "eval_dir": str(eval_dir), "lengths": lengths, "train_records": len(lengths),
            "eval_records": len(load_prepared(eval_dir).train)}


def step_batches(lengths: list[int], batch_size: int, seed: int, steps: int, group_by_length: bool) -> list[list[int]]:
    """The records of each optimiser step, exactly as tunelab's recipe draws them (epoch after epoch)."""
    from tunelab.data.batching import batches_for_epoch

    out: list[list[int]] = []
    epoch = 0
    while len(out) < steps:
        out.extend(batches_for_epoch(lengths, batch_size, seed, epoch, group_by_length))
        epoch += 1
    return out[:steps]


def token_step_batches(lengths: list[int], budget: int, seed: int, steps: int, per_step: int = 1) -> list[list[int]]:
    """The records of each step under `training.batch_tokens=budget` and `per_step` micro-batches per step
    (gradient accumulation), as the recipe draws them."""
    from tunelab.data.batching import token_batches_for_epoch

    micro: list[list[int]] = []
    epoch = 0
    while len(micro) < steps * per_step:
        micro.extend(token_batches_for_epoch(lengths, budget, seed, epoch))
        epoch += 1
    return [[i for b in micro[k * per_step:(k + 1) * per_step] for i in b] for k in range(steps)]


def _tokens_option(option: str, budget: int) -> str:
    """`training.batch_tokens=@tokens[/k]` with the peer's tokens per step (divided by k) filled in."""
    if "@tokens" not in option:
        return option
    key, _, value = option.partition("=")
    div = int(value.split("/")[1]) if "/" in value else 1
    return f"{key}={budget // div}"


def row_env(key: str, kind: str) -> dict[str, str]:
    """A tunelab row's process starts as `tunelab train` starts itself (tunelab.runtime: glibc's tcache off), except
    `system_malloc`; every other trainer (the peers, TRL) with glibc as it comes, even if this benchmark was started
    with tunelab's setting in its environment, except `llamafactory-tcache_off` (the peer given tunelab's setting,
    to show how much of the memory gap is the allocator); a LEVER_OFF row switches its one lever off."""
    from tunelab.runtime import allocator_env

    if (kind == "tunelab") != (key in {"system_malloc"} | PEER_ENV_VARIANTS):
        env = {"GLIBC_TUNABLES": allocator_env()["GLIBC_TUNABLES"]}
    else:
        env = {"GLIBC_TUNABLES": ":".join(x for x in os.environ.get("GLIBC_TUNABLES", "").split(":")
                                          if x and "tcache_count" not in x)}
    if key in LEVER_OFF:
        env["TUNELAB_PERF_OFF"] = LEVER_OFF[key]
    if key in LEVER_ON:
        env["TUNELAB_PERF_ON"] = LEVER_ON[key]
    return env


def summarise(key: str, res: dict, tokens: list[int], warmup: int, peaks: dict, params: int) -> dict:
    times = res.get("step_times") or []
    n = min(len(times), len(tokens))
    kept = range(warmup, n) if n > warmup else range(n)
    secs = sum(times[i] for i in kept)
    tps = sum(tokens[i] for i in kept) / secs if secs > 0 else None
    flops = 6 * params * tps if tps else None
    return {"tokens_per_s": tps, "s_per_step": median_after_warmup(times[:n], warmup),
            "tokens_per_step": sum(tokens[i] for i in kept) / len(kept) if len(kept) else None,
            "steps_timed": len(kept), "train_flops_per_s": flops,
            "mfu_bf16": flops / (peaks["bf16"]["gflops"] * 1e9) if flops else None,
            "mfu_fp32": flops / (peaks["fp32"]["gflops"] * 1e9) if flops else None}


def _mfu_columns(row: dict) -> tuple[str, str]:
    """The row's MFU against the peak of its own compute dtype ("" for the other column: an fp32 row against the bf16
    peak of a CPU without bf16 instructions reads as several hundred per cent)."""
    dtype = (row.get("dtype") or {}).get("name")
    return ("" if dtype == "fp32" else "mfu_bf16", "" if dtype == "bf16" else "mfu_fp32")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="6 steps (2 warm-up) and 24 held-out records per row")
    ap.add_argument("--steps", type=int, help="optimiser steps per row (default 30; --quick 6)")
    ap.add_argument("--warmup", type=int, help="steps left out of the timing (default 5; --quick 2)")
    ap.add_argument("--eval-records", type=int, help="held-out records for the eval loss (default 100; --quick 24)")
    ap.add_argument("--only", help=f"comma-separated rows to run, of: {','.join(KEYS)}")
    ap.add_argument("--skip", help="comma-separated rows to leave out")
    ap.add_argument("--list", action="store_true", help="list the rows and exit")
    ap.add_argument("--model", default=BUNDLED, help="model (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--data", help="raw Alpaca/ShareGPT file (default: the shared Alpaca demo, else generated)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                    help="compute dtype of tunelab's rows and the peers' (default auto: what `auto` picks on this "
                         "CPU); rows named for a dtype keep theirs, TRL's baseline stays fp32. bf16 on a CPU without "
                         "fast bf16 runs at a fraction of the speed: for its memory only")
    ap.add_argument("--json", help="write every measurement to this JSON file")
    ap.add_argument("--workdir", help="keep runs, logs and data here (default: a temporary folder, removed)")
    ap.add_argument("--resume", action="store_true",
                    help="with --workdir: reuse the rows an earlier run of the same settings finished there")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds allowed per row (default 3600)")
    ap.add_argument("--verbose", action="store_true", help="echo every child's output")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        CHILDREN[args.child](json.loads(Path(args.spec).read_text()))
        return 0
    if args.list:
        for key, label, _, _ in VARIANTS:
            print(f"{key:16} {label}")
        return 0
    steps = args.steps or (6 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    n_eval = args.eval_records or (24 if args.quick else 100)
    wanted = [k.strip() for k in args.only.split(",")] if args.only else list(KEYS)
    skip = {k.strip() for k in args.skip.split(",")} if args.skip else set()
    bad = [k for k in wanted + list(skip) if k not in KEYS]
    if bad:
        ap.error(f"unknown row(s) {', '.join(bad)}; choose from {', '.join(KEYS)}")
    wanted = [k for k in KEYS if k in wanted and k not in skip]

    if args.workdir:
        work = Path(args.workdir).resolve()
        work.mkdir(parents=True, exist_ok=True)
        tmp = None
    else:
        tmp = tempfile.TemporaryDirectory(prefix="tunelab-bench-train-")
        work = Path(tmp.name)
    try:
        return _run(args, work, wanted, steps, warmup, n_eval)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _run(args, work: Path, wanted: list[str], steps: int, warmup: int, n_eval: int) -> int:
    from tunelab.model.loading import choose_dtype, resolve_model_path

    model_dir = Path(resolve_model_path(args.model))
    say = lambda s: print(s, flush=True)  # noqa: E731
    say(f"bench/train.py: {len(wanted)} rows x {steps} steps (timing after {warmup}), {n_eval} held-out records; "
        f"work folder {work}")
    data = prepare_data(work, model_dir, n_eval, args.max_length, args.seed, args.data, reuse=args.resume)
    say(f"data: {data['source']} -> {data['train_records']} train records <= {args.max_length} tokens, "
        f"{data['eval_records']} held-out")
    picked = choose_dtype("auto").name
    auto = picked if args.dtype == "auto" else args.dtype  # the rows' dtype

    def child(kind: str, spec: dict, name: str, extra_env: dict | None = None):
        spec_path = work / f"{name}.spec.json"
        spec["result"] = str(work / f"{name}.result.json")
        spec_path.write_text(json.dumps(spec))
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--spec", str(spec_path)]
        if kind in PEERS:  # its own venv and driver (bench/peers/), measured like every other row
            argv = [str(PEER_DIR / kind / "bin" / "python"),
                    str(Path(__file__).resolve().parent / "peers" / f"{kind}_child.py"), str(spec_path)]
        res = run_child(argv,
                        env={"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1",
                             "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), **(extra_env or {})},
                        log_path=work / f"{name}.log", timeout_s=args.timeout, echo=args.verbose)
        out = json.loads(Path(spec["result"]).read_text()) if res.returncode == 0 and Path(spec["result"]).is_file() \
            else None
        return res, out

    res, peak = child("peak", {"model_dir": str(model_dir)}, "peak")
    if peak is None:
        print(res.output_tail, file=sys.stderr)
        raise SystemExit("the matmul-peak child failed")
    params, peaks = peak["params"], peak["peaks"]
    forced = "" if auto == picked else f", rows in {auto} (--dtype)"
    say(f"machine: {peak['machine']['cpu']} ({peak['machine']['cpu_kind']}), {peak['machine']['torch_threads']} torch threads; auto dtype "
        f"{picked} ({peak['machine']['auto_dtype_reason']}){forced}; matmul peak fp32 {peaks['fp32']['gflops']:.0f} GFLOP/s, "
        f"bf16 {peaks['bf16']['gflops']:.0f} GFLOP/s; model {params / 1e6:.1f} M parameters")

    common = [f"model.name={model_dir}", f"data.train={data['train_dir']}", f"data.eval={data['eval_dir']}",
              f"data.max_length={args.max_length}", f"training.max_steps={steps}",
              f"training.batch_size={args.batch_size}", f"training.learning_rate={args.lr}",
              f"training.seed={args.seed}", "training.logging_steps=1", "training.eval_steps=0",
              "training.save_steps=0", "eval.metrics=[perplexity]", "tracking.report_to=[none]",
              f"output.dir={work / 'runs'}"] + ([f"model.dtype={args.dtype}"] if args.dtype != "auto" else [])
    warmup_steps = math.ceil(0.03 * steps)  # tunelab's default warmup_ratio, the same for the baseline
    rows: dict[str, dict] = {}
    for key, label, kind, opts in VARIANTS:
        if key not in wanted:
            continue
        grouped = "training.group_by_length=true" in opts if kind == "tunelab" else False
        batches = step_batches(data["lengths"], args.batch_size, args.seed, steps, grouped)
        tokens = [sum(data["lengths"][i] for i in b) for b in batches]
        row: dict[str, Any] = {"key": key, "label": label, "kind": kind}
        if key in ("fp32", "bf16") and key == auto and "tunelab" in rows and rows["tunelab"].get("ok"):
            rows[key] = {**rows["tunelab"], "key": key, "label": label, "same_as": "tunelab"}
            say(f"[{key}] = the tunelab row (auto picks {auto} here)")
            continue
        if kind in PEERS:
            spec = {"model_dir": str(model_dir), "train_file": data["train_file"], "out_dir": str(work / key),
                    "steps": steps, "rows": args.batch_size, "cutoff": args.max_length, "lr": args.lr,
                    "seed": args.seed, "warmup_steps": warmup_steps, "bf16": opts.get("bf16", auto == "bf16")}
            if not (PEER_DIR / kind / "bin" / "python").is_file():
                rows[key] = {**row, "ok": False, "peak_rss_bytes": 0,
                             "error": f"no {kind} venv: run bash bench/peers/setup_{kind}.sh"}
                say(f"[{key}] skipped: {rows[key]['error']}")
                continue
        elif kind == "trl":
            spec = {"model_dir": str(model_dir), "train_file": data["train_file"], "out_dir": str(work / key),
                    "order": [i for b in batches for i in b], "steps": steps, "batch_size": args.batch_size,
                    "lr": args.lr, "seed": args.seed, "max_length": args.max_length, "warmup_steps": warmup_steps,
                    "trl_options": opts}
        else:
            budget = args.batch_size * args.max_length  # the peer's rows x cutoff: equal tokens per step
            filled = [_tokens_option(o, budget) for o in opts]
            spec = {"overrides": common + [f"output.run_name={key}"] + filled}
            per_step = next((int(o.split("=")[1]) for o in filled if o.startswith("training.gradient_accumulation")), 1)
            if any(o.startswith("training.batch_tokens") for o in filled):
                from tunelab.config import load_config

                passes, pass_tokens = load_config(None, [f"data.max_length={args.max_length}", *filled]).token_passes()
                batches = token_step_batches(data["lengths"], pass_tokens, args.seed, steps, per_step * passes)
                tokens = [sum(data["lengths"][i] for i in b) for b in batches]
        saved = work / f"{key}.row.json"
        if args.resume and saved.is_file():
            rows[key] = row = json.loads(saved.read_text())
            row.update(summarise(key, row, row["step_tokens"], warmup, peaks, params))  # this run's peaks
            say(f"[{key}] reused from {saved}")
            continue
        stale = work / "runs" / key if kind == "tunelab" else work / key
        if stale.exists():  # a killed or failed earlier attempt of this row
            shutil.rmtree(stale)
        say(f"[{key}] {label} ...")
        res, out = child(kind, spec, key, row_env(key, kind))
        row.update(peak_rss_bytes=res.peak_rss_bytes, polled_peak_rss_bytes=res.polled_peak_rss_bytes,
                   wall_s=res.wall_s, step_tokens=tokens, ok=out is not None)
        if out is None:
            tail = [x for x in res.output_tail.strip().splitlines() if x.strip()]
            row["error"] = tail[-1][:300] if tail else f"exit {res.returncode}"
            say(f"[{key}] FAILED (exit {res.returncode}): {row['error']}  (log: {work / (key + '.log')})")
            rows[key] = row
            continue
        row.update(out)
        if out.get("step_tokens"):  # a peer counts its own (its packing decides what a step holds)
            row["step_tokens"] = tokens = out["step_tokens"]
        row.update(summarise(key, out, tokens, warmup, peaks, params))
        saved.write_text(json.dumps(row, default=str))
        say(f"[{key}] {fmt(row['tokens_per_s'], '.0f')} tok/s, {fmt(row['s_per_step'], '.2f')} s/step, peak RSS "
            f"{row['peak_rss_bytes'] / GIB:.2f} GiB, train loss {fmt(row['final_train_loss'], '.4f')}, "
            f"dtype {(row.get('dtype') or {}).get('name')}, {res.wall_s:.0f} s")
        rows[key] = row

    res, again = child("peak", {"model_dir": str(model_dir)}, "peak-end")
    if again is not None:  # a shared machine's speed drifts: MFU against the higher of the two measurements
        peaks = {d: max(peaks[d], again["peaks"][d], key=lambda p: p["gflops"]) for d in peaks}
        say(f"matmul peak again after the rows: fp32 {again['peaks']['fp32']['gflops']:.0f} GFLOP/s, bf16 "
            f"{again['peaks']['bf16']['gflops']:.0f} GFLOP/s; MFU against the higher of the two")
        for key, r in rows.items():
            if r.get("ok"):
                r.update(summarise(key, r, r["step_tokens"], warmup, peaks, params))
    else:
        say("matmul peak after the rows: FAILED; MFU against the first measurement")
    items = {k: r["checkpoint"] for k, r in rows.items() if r.get("ok") and not r.get("same_as")}
    if items:
        say(f"eval loss of {len(items)} checkpoints on the {data['eval_records']} held-out records (fp32, CausalLMLoss) ...")
        res, ev = child("eval", {"model_dir": str(model_dir), "eval_dir": data["eval_dir"], "items": items,
                                 "max_length": args.max_length}, "eval")
        if ev is None:
            say(f"eval FAILED: {res.output_tail[-500:]}")
            ev = {}
        for k, r in rows.items():
            src = r.get("same_as") or k
            if src in ev:
                r.update(eval_loss=ev[src]["eval_loss"], eval_tokens=ev[src]["eval_tokens"])

    report = {"settings": {"model": args.model, "model_dir": str(model_dir), "steps": steps, "warmup": warmup,
                           "batch_size": args.batch_size, "lr": args.lr, "max_length": args.max_length,
                           "seed": args.seed, "dtype": args.dtype, "eval_records": data["eval_records"],
                           "data": data["source"],
                           "train_records": data["train_records"], "lora": "r=16 alpha=32 dropout=0.05 all-linear",
                           "flops_formula": "6 x N x non-padding tokens, N = all base-model parameters "
                                            f"({params:,}); attention-score FLOPs ignored"},
              "machine": peak["machine"], "matmul_peak": peaks, "params": params, "rows": list(rows.values())}
    print()
    print(render_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        say(f"\nJSON: {args.json}")
    return 0 if all(r.get("ok") for r in rows.values()) else 1


def render_table(report: dict) -> str:
    rows = report["rows"]
    base = next((r for r in rows if r["key"] == "trl" and r.get("ok")), None)
    peers = [r for r in rows if r.get("kind") in PEERS and r.get("ok") and r.get("tokens_per_s")
             and r["key"] not in PEER_ENV_VARIANTS]
    peer = max(peers, key=lambda r: r["tokens_per_s"]) if peers else None
    headers = ["row", "dtype", "tok/step", "tok/s", "x base", "x peer", "s/step", "peak RSS GiB", "RSS / base",
               "RSS / peer", "train loss", "eval loss", "eval vs base", "eval vs peer", "MFU bf16", "MFU fp32"]
    out = []
    for r in rows:
        if not r.get("ok"):
            out.append([r["key"], "—", "", "failed", "", "", "", fmt(r.get("peak_rss_bytes", 0) / GIB, ".2f"), "",
                        "", "", "", "", "", "", (r.get("error") or "")[:60]])
            continue
        speed = r["tokens_per_s"] / base["tokens_per_s"] if base and r.get("tokens_per_s") else None
        vs_peer = r["tokens_per_s"] / peer["tokens_per_s"] if peer and r.get("tokens_per_s") else None
        mem_peer = r["peak_rss_bytes"] / peer["peak_rss_bytes"] if peer else None
        dev_peer = (r["eval_loss"] / peer["eval_loss"] - 1) * 100 if peer and r.get("eval_loss") \
            and peer.get("eval_loss") else None
        mem = r["peak_rss_bytes"] / base["peak_rss_bytes"] if base else None
        dev = (r["eval_loss"] / base["eval_loss"] - 1) * 100 if base and r.get("eval_loss") and base.get("eval_loss") \
            else None
        out.append([r["key"] + (" (=tunelab)" if r.get("same_as") else ""), (r.get("dtype") or {}).get("name", "?"),
                    fmt(r.get("tokens_per_step"), ".0f"),
                    fmt(r.get("tokens_per_s"), ".0f"), fmt(speed, ".2f") + ("×" if speed else ""),
                    fmt(vs_peer, ".2f") + ("×" if vs_peer else ""),
                    fmt(r.get("s_per_step"), ".2f"), fmt(r["peak_rss_bytes"] / GIB, ".2f"),
                    fmt(mem, ".2f"), fmt(mem_peer, ".2f"), fmt(r.get("final_train_loss"), ".4f"),
                    fmt(r.get("eval_loss"), ".4f"),
                    (fmt(dev, "+.2f") + "%") if dev is not None else "—",
                    (fmt(dev_peer, "+.2f") + "%") if dev_peer is not None else "—",
                    *(fmt(100 * r[k], ".1f") + "%" if r.get(k) else "—" for k in _mfu_columns(r))])
    s = report["settings"]
    m = report["machine"]
    p = report["matmul_peak"]
    head = (f"{s['steps']} steps x batch {s['batch_size']} per row, timing after {s['warmup']} warm-up steps; "
            f"x peer / RSS / peer / eval vs peer: against {peer['key'] if peer else 'no peer row'}; "
            f"eval loss on {s['eval_records']} held-out records (fp32, tunelab masking + CausalLMLoss)\n"
            f"{m['cpu']}, {m['torch_threads']} threads, auto dtype {m['auto_dtype']}"
            f"{'' if s.get('dtype', 'auto') == 'auto' else '; rows in ' + s['dtype'] + ' (--dtype)'}; matmul peak fp32 "
            f"{p['fp32']['gflops']:.0f} GFLOP/s, bf16 {p['bf16']['gflops']:.0f} GFLOP/s; "
            f"MFU = {s['flops_formula']}\n")
    return head + text_table(headers, out)


if __name__ == "__main__":
    sys.exit(main())
