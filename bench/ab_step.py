"""Interleaved A/B of whole tunelab training steps in one process, and a profile of one step (docs/perf-notes.md).

    python bench/ab_step.py --pairs 3                                  # defaults vs each lever off, interleaved
    python bench/ab_step.py --variants base,off:fused_lora --pairs 4   # named variants only
    python bench/ab_step.py --profile --variants base                  # torch.profiler of one step, top ops
    python bench/ab_step.py --variants base,set:training.batch_tokens=2048 --batch-size 16

A variant is `base` (tunelab's defaults), `fp32_base` (frozen weights in fp32, cast by autocast each step),
`mlp_ckpt` (only the MLPs recomputed in backward), `compile` (every decoder layer through torch.compile's CPU
inductor backend; its first steps compile),
`off:LEVER[+LEVER]`, `on:LEVER` (an opt-in lever) (levers switched off, tunelab.runtime) or
`set:KEY=VALUE[;KEY=VALUE]` (config overrides). Every variant gets its own model, loss and optimiser, built the
way the recipe builds them (`build_model`, `CausalLMLoss`, AdamW, `forward_backward`), and they take turns on
the same micro-batches (A B B A ...), so the machine's load drifts over all of them alike. Reported: the median
non-padding tokens/s of each variant and of each pair's ratio to the first variant. Why one process: separate
processes a few minutes apart differ by 20-35% on a shared machine; interleaved steps differ by a few percent.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alpaca_records, current_peak_rss_bytes  # noqa: E402


def encoded_records(tok, n: int, max_length: int) -> list[dict]:
    """The first `n` Alpaca records that fit, encoded as the recipe encodes them."""
    from tunelab.data.template import encode_record

    recs, _ = alpaca_records()
    out = []
    for r in recs:
        user = r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]
        enc = encode_record(tok, msgs, max_length=max_length, train_on="assistant")
        if len(enc.input_ids) <= max_length:
            out.append({"input_ids": enc.input_ids, "labels": enc.labels,
                        "n_targets": sum(1 for x in enc.labels[1:] if x != -100), "where": f"record {len(out)}"})
        if len(out) >= n:
            break
    return out


def compile_layers(model) -> int:
    """The CPU inductor path: every decoder layer compiled with torch.compile (inductor's C++ backend, dynamic
    shapes, so records of new lengths do not recompile); returns how many layers."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = 64
    n = 0
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            module.compile(dynamic=True)
            n += 1
    return n


def checkpoint_mlps(model) -> int:
    """MLP-only activation checkpointing: each decoder layer's MLP recomputed in backward (its gate/up/SiLU
    products are most of a layer's saved activations), attention kept."""
    from torch.utils.checkpoint import checkpoint

    n = 0
    for name, module in model.named_modules():
        if name.endswith(".mlp"):
            inner = module.forward
            module.forward = lambda x, _f=inner: checkpoint(_f, x, use_reentrant=False)
            n += 1
    return n


class Variant:
    """One model + loss + optimiser, built as the recipe builds them, under this variant's levers and settings."""

    def __init__(self, spec: str, base_overrides: list[str], accelerator):
        import torch

        from tunelab.config import load_config
        from tunelab.data.batching import collate_packed
        from tunelab.model.loss import CausalLMLoss, autocast_for
        from tunelab.runtime import levers_as_recorded
        from tunelab.train.recipe import build_model, param_groups

        self.name = spec
        off, extra, on = [], [], []
        if spec.startswith("off:"):
            off = spec[4:].split("+")
        elif spec.startswith("on:"):
            on = spec[3:].split("+")
        elif spec.startswith("set:"):
            extra = spec[4:].split(";")
        elif spec not in ("fp32_base", "mlp_ckpt", "compile", "base") and not spec.startswith("on:"):
            raise SystemExit(f"unknown variant {spec!r}: base, fp32_base, mlp_ckpt, compile, off:LEVER[+LEVER] or "
                             "set:KEY=VALUE[;...]")
        self.off, self.on = off, on
        self.cfg = load_config(None, overrides=base_overrides + extra)
        with levers_as_recorded(off, on):
            model, choice = build_model(self.cfg, accelerator, lambda *_: None)
            self.loss_fn = CausalLMLoss(model, chunk_size=self.cfg.training.loss_chunk_size)
        if spec == "fp32_base":  # frozen weights kept in fp32 and cast by autocast at every matmul (the alternative)
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    p.data = p.data.float()
        if spec == "mlp_ckpt":
            checkpoint_mlps(model)
        if spec == "compile":
            compile_layers(model)
        self.optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=self.cfg.training.learning_rate)
        self.autocast = autocast_for("cpu", choice.name)
        self.dtype = choice.name
        self.collate = collate_packed
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.times: list[float] = []
        self.tokens: list[int] = []

    def step(self, group: list[list[int]], train: list[dict], accelerator) -> float:
        from tunelab.runtime import levers_as_recorded
        from tunelab.train.recipe import forward_backward

        t0 = time.perf_counter()
        with levers_as_recorded(self.off, self.on):  # levers read at call time (e.g. the compiled path) see this variant's switches
            loss, n = forward_backward(group, train, self.collate, accelerator, self.loss_fn, self.autocast,
                                       self.scaler)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - t0)
        self.tokens.append(n)
        return loss


def step_groups(train: list[dict], cfg, steps: int) -> list[list[list[int]]]:
    """The micro-batches of `steps` optimiser steps, as the recipe draws them for this config."""
    from tunelab.data.batching import step_batches_for_epoch
    from tunelab.train.recipe import make_plan

    lengths = [len(e["input_ids"]) for e in train]
    plan = make_plan(cfg, lengths, world=1)
    micro: list[list[int]] = []
    epoch, per_step = 0, plan.group_size
    while len(micro) < steps * per_step:
        micro.extend(step_batches_for_epoch(lengths, cfg.training, epoch, plan.pass_tokens))
        epoch += 1
    return [micro[k * per_step:(k + 1) * per_step] for k in range(steps)]


def profile_one(v: Variant, group, train, accelerator, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    v.step(group, train, accelerator)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        v.step(group, train, accelerator)
        wall = time.perf_counter() - t0
    tokens = sum(len(train[i]["input_ids"]) for b in group for i in b)
    print(f"\n[{v.name}] one step: {tokens} tokens, {wall:.2f} s wall, {tokens / wall:.0f} tok/s ({v.dtype})")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="base,off:packed_attention,off:fast_dropout,off:fused_head")
    ap.add_argument("--pairs", type=int, default=3, help="rounds of A B B A over the variants")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps of each variant first")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--set", action="append", default=[], help="config override for every variant")
    ap.add_argument("--profile", action="store_true", help="profile one step of each variant instead")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 keeps A/B ratios usable on a "
                                                "machine whose other jobs leave less than two free cores")
    args = ap.parse_args(argv)
    import torch

    from tunelab.model.loading import load_tokenizer
    from tunelab.train.distributed import make_accelerator

    torch.set_flush_denormal(True)  # as the recipe does on CPU
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}", flush=True)
    acc = make_accelerator()
    base = ["training.max_steps=1000", f"training.batch_size={args.batch_size}",
            f"data.max_length={args.max_length}", *args.set]
    tok = load_tokenizer("bundled:smollm2-135m-instruct")
    train = encoded_records(tok, args.records, args.max_length)
    variants = [Variant(s, base, acc) for s in args.variants.split(",")]
    # each variant's own batching (a token budget packs other micro-batches than a record count)
    groups = {v.name: step_groups(train, v.cfg, args.warmup + 2 * args.pairs) for v in variants}
    if args.profile:
        for v in variants:
            profile_one(v, groups[v.name][1], train, acc, args.top)
        return 0
    for v in variants:  # warm-up steps each (kernel selection, first touch, compilation), not timed
        for g in groups[v.name][:args.warmup]:
            v.step(g, train, acc)
        print(f"{v.name}: {args.warmup} warm-up step(s) {sum(v.times):.1f} s", flush=True)
        v.times.clear(), v.tokens.clear()
    for k in range(args.pairs):
        for v in (variants if k % 2 == 0 else variants[::-1]):
            for g in groups[v.name][args.warmup + 2 * k:args.warmup + 2 + 2 * k]:
                v.step(g, train, acc)
    ref = variants[0]
    print(f"{'variant':40} {'tok/s':>7} {'vs first':>9}  (per-step ratios)  dtype {ref.dtype}")
    for v in variants:
        tps = [n / t for n, t in zip(v.tokens, v.times)]
        ratios = [a / b for a, b in zip(tps, [n / t for n, t in zip(ref.tokens, ref.times)])]
        print(f"{v.name:40} {statistics.median(tps):7.0f} {statistics.median(ratios):8.2f}x  "
              f"({', '.join(f'{r:.2f}' for r in ratios)})")
    # the process's high-water mark: a variant's own peak only when it ran alone
    print(f"peak RSS of this process {current_peak_rss_bytes() / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
