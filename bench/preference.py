"""Preference benchmark: TRL's DPOTrainer / ORPOTrainer / KTOTrainer + PEFT vs tunelab's preference recipe.

    python bench/preference.py --quick                    # 4 steps per row (1 warm-up)
    python bench/preference.py --json bench-pref.json     # 8 steps per row (2 warm-up): the reference measurement
    python bench/preference.py --only trl-dpo,tunelab-dpo # some rows only (see --list)

The workload of every row: the bundled SmolLM2-135M-Instruct, LoRA r=16 / alpha 32 on every linear layer but the
output head, dropout 0 (TRL's `disable_dropout=True` default zeroes every dropout, LoRA's included, so 0 is what
its rows train with; tunelab is given the same), AdamW lr 5e-5, cosine schedule with tunelab's 3% warm-up, max grad
norm 1, seed 42, beta 0.1, batch 4 pairs (kto: 4 labelled answers), the same number of optimiser steps and **the
same pairs in the same order**: LLaMA-Factory's `dpo_en_demo.json` (kto: `kto_en_demo.json`) from
`../shared/data/llamafactory/` when present, else generated ones, prepared by `tunelab prepare` with
`overflow=drop` (pairs longer than `--max-length` are left out, so neither side truncates anything), and handed
to TRL in tunelab's epoch order through a sequential sampler.

Rows (`--list`): for each of dpo / orpo / kto a TRL row with TRL's defaults (the speed baseline: bf16 autocast
over fp32 weights, gradient checkpointing, padded batches, the reference = the adapter disabled) and a tunelab
row with tunelab's defaults (auto dtype, padding-free packed pairs, chunked log-probs); and the equality rows
`trl-*-fp32` / `tunelab-*-fp32`: both in fp32, where the final losses are compared (to 1e-3).

Every row runs in its own process (peak RSS = that process's own high-water mark, `os.wait4`). Measured: pairs/s
and non-padding tokens/s over the steps after `--warmup` (tokens = prompt + chosen + prompt + rejected per pair,
prompt + answer per kto example), the median seconds per step, peak RSS, the last step's train loss and its
distance to the matching TRL row's (same stage, same precision).
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
from common import (GIB, fmt, machine_summary, median_after_warmup, preference_records, run_child,  # noqa: E402
                    step_timer, text_table)
from train import BUNDLED, child_tunelab, row_env  # noqa: E402  (bench/train.py's tunelab child, reused)

# key, label, kind, stage, precision ("default": the trainer's own default; "fp32": forced)
VARIANTS: list[tuple[str, str, str, str, str]] = [
    ("trl-dpo", "baseline: TRL DPOTrainer + PEFT, its defaults (bf16 autocast, gradient checkpointing)", "trl", "dpo",
     "default"),
    ("tunelab-dpo", "tunelab dpo, its defaults (auto dtype, packed pairs)", "tunelab", "dpo", "default"),
    ("trl-dpo-fp32", "TRL DPOTrainer in fp32 (bf16=False): the equality row", "trl", "dpo", "fp32"),
    ("tunelab-dpo-fp32", "tunelab dpo, model.dtype=fp32: the equality row", "tunelab", "dpo", "fp32"),
    ("tunelab-dpo-gc", "tunelab dpo + training.gradient_checkpointing (on in TRL's defaults)", "tunelab", "dpo",
     "default"),
    ("tunelab-dpo-mb2", "tunelab dpo, each step's pairs as 2 forwards of 2 (batch_size 2, accumulation 2)",
     "tunelab", "dpo", "default"),
    ("trl-orpo", "TRL ORPOTrainer (trl.experimental.orpo) + PEFT, its defaults", "trl", "orpo", "default"),
    ("tunelab-orpo", "tunelab orpo, its defaults", "tunelab", "orpo", "default"),
    ("trl-orpo-fp32", "TRL ORPOTrainer in fp32", "trl", "orpo", "fp32"),
    ("tunelab-orpo-fp32", "tunelab orpo, model.dtype=fp32", "tunelab", "orpo", "fp32"),
    ("trl-kto", "TRL KTOTrainer + PEFT, its defaults", "trl", "kto", "default"),
    ("tunelab-kto", "tunelab kto, its defaults", "tunelab", "kto", "default"),
    ("trl-kto-fp32", "TRL KTOTrainer in fp32", "trl", "kto", "fp32"),
    ("tunelab-kto-fp32", "tunelab kto, model.dtype=fp32", "tunelab", "kto", "fp32"),
]
KEYS = [v[0] for v in VARIANTS]
EXTRA = {"tunelab-dpo-gc": ["training.gradient_checkpointing=true"],
         # the same pairs per step (the sampler's order is the same at any batch size), half of them per forward
         "tunelab-dpo-mb2": ["training.batch_size=2", "training.gradient_accumulation_steps=2"]}  # tunelab rows' own settings
DEFAULT_ROWS = ["trl-dpo", "tunelab-dpo", "trl-dpo-fp32", "tunelab-dpo-fp32", "trl-orpo", "tunelab-orpo", "trl-kto",
                "tunelab-kto"]


# ================================================================ children (each in its own process)


def _write(path: str, obj: dict) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, default=str))


def child_trl(spec: dict) -> None:
    """One TRL trainer at its defaults, except what both sides must share (see the module docstring)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, set_seed

    t0 = time.perf_counter()
    stage = spec["stage"]
    rows = [json.loads(x) for x in Path(spec["train_file"]).read_text(encoding="utf-8").splitlines() if x.strip()]
    keys = ("prompt", "completion", "label") if stage == "kto" else ("prompt", "chosen", "rejected")
    ds = Dataset.from_list([{k: rows[i][k] for k in keys} for i in spec["order"]])  # TRL's conversational forms
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    common = dict(output_dir=spec["out_dir"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"],
                  learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=spec["warmup_steps"],
                  weight_decay=0.0, max_grad_norm=1.0, seed=spec["seed"], max_length=spec["max_length"],
                  beta=spec["beta"], logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
                  disable_tqdm=True, train_sampling_strategy="sequential", dataloader_num_workers=0)
    if spec["precision"] == "fp32":
        common.update(bf16=False, fp16=False)
    if not torch.cuda.is_available():  # HF Trainer refuses TRL's default bf16=True on CPU without use_cpu=True
        common["use_cpu"] = True
    if stage == "dpo":
        from trl import DPOConfig as Config, DPOTrainer as Trainer
    elif stage == "kto":
        from trl import KTOConfig as Config, KTOTrainer as Trainer
    else:  # TRL 1.x moved ORPO to trl.experimental
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer
    args = Config(**common)
    times: list[float] = []
    set_seed(spec["seed"])  # the LoRA initialisation, as tunelab seeds it just before get_peft_model
    lora = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = Trainer(model=spec["model_dir"], args=args, train_dataset=ds, processing_class=tok, peft_config=lora,
                      callbacks=[step_timer(times)])
    n_train = len(trainer.train_dataset)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    weights = next(p for n, p in trainer.model.named_parameters() if "lora_" not in n)
    _write(spec["result"], {
        "step_times": times, "losses": losses, "final_train_loss": losses[-1] if losses else None,
        "dtype": {"name": "bf16" if args.bf16 else "fp32",
                  "reason": (f"{Config.__name__}(bf16={args.bf16}): "
                             + ("its default, autocast" if args.bf16 else "forced") + f" over {weights.dtype} weights")},
        "gradient_checkpointing": args.gradient_checkpointing, "disable_dropout": args.disable_dropout,
        "trainer": f"{Trainer.__module__}.{Trainer.__name__}", "examples_after_trl_filters": n_train,
        "total_s": time.perf_counter() - t0, "torch_threads": torch.get_num_threads()})


CHILDREN = {"tunelab": child_tunelab, "trl": child_trl}


# ================================================================ the parent


def prepare_stage(work: Path, model_dir: Path, stage: str, max_length: int, seed: int, data: str | None) -> dict:
    """A prepared folder for `stage` (pairs dropped when longer than max_length) and its examples as tunelab's
    recipe encodes them: token counts per example, in the prepared order."""
    from tunelab.data.prepare import load_prepared, prepare_dataset
    from tunelab.data.preference import encode_preference
    from tunelab.model.loading import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    kind = "kto" if stage == "kto" else "pairs"
    if data:
        raw, source = Path(data), data
    else:
        recs, source = preference_records(kind)
        raw = work / f"{kind}.json"
        raw.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    folder = work / f"prepared-{stage}"
    prepare_dataset([str(raw)], folder, tokenizer=tok, max_length=max_length, overflow="drop", val_ratio=0.0,
                    seed=seed, stage=stage, console=lambda *_: None).raise_if_unusable()
    rows = list(load_prepared(folder).train)
    tokens = []
    for r in rows:
        enc = encode_preference(tok, r, max_length, "drop")
        answers = [len(v) for k, v in enc.items() if k.endswith("_ids") and k != "prompt_ids"]
        tokens.append(len(enc["prompt_ids"]) * len(answers) + sum(answers))  # what the recipe counts (n_tokens)
    report = json.loads((folder / "report.json").read_text())
    return {"source": source, "dir": str(folder), "train_file": str(folder / "train.jsonl"), "tokens": tokens,
            "examples": len(rows), "records_read": report.get("records_read"),
            "rejected": report.get("records_rejected")}


def step_batches(n: int, batch_size: int, seed: int, steps: int) -> list[list[int]]:
    """The examples of each optimiser step, exactly as tunelab's preference recipe draws them."""
    from tunelab.data.batching import batches_for_epoch

    out: list[list[int]] = []
    epoch = 0
    while len(out) < steps:
        out.extend(batches_for_epoch([0] * n, batch_size, seed, epoch))
        epoch += 1
    return out[:steps]


def summarise(res: dict, batches: list[list[int]], tokens: list[int], warmup: int) -> dict:
    times = res.get("step_times") or []
    n = min(len(times), len(batches))
    kept = range(warmup, n) if n > warmup else range(n)
    secs = sum(times[i] for i in kept)
    pairs = sum(len(batches[i]) for i in kept)
    toks = sum(tokens[j] for i in kept for j in batches[i])
    return {"pairs_per_s": pairs / secs if secs > 0 else None, "tokens_per_s": toks / secs if secs > 0 else None,
            "s_per_step": median_after_warmup(times[:n], warmup), "steps_timed": len(kept),
            "tokens_per_step": toks / len(kept) if len(kept) else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 steps per row (1 warm-up)")
    ap.add_argument("--steps", type=int, help="optimiser steps per row (default 8; --quick 4)")
    ap.add_argument("--warmup", type=int, help="steps left out of the timing (default 2; --quick 1)")
    ap.add_argument("--only", help=f"comma-separated rows, of: {','.join(KEYS)} (default: {','.join(DEFAULT_ROWS)})")
    ap.add_argument("--list", action="store_true", help="list the rows and exit")
    ap.add_argument("--model", default=BUNDLED, help="model (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--data", help="a raw pair file (dpo / orpo rows; default: the shared dpo_en_demo.json)")
    ap.add_argument("--kto-data", help="a raw labelled-answer file (kto rows; default: the shared kto_en_demo.json)")
    ap.add_argument("--batch-size", type=int, default=4, help="pairs (kto: examples) per step")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=384, help="pairs longer than this are left out (both sides)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--tolerance", type=float, default=1e-3, help="final-loss equality target of the fp32 rows")
    ap.add_argument("--json", help="write every measurement to this JSON file")
    ap.add_argument("--workdir", help="keep runs, logs and data here (default: a temporary folder, removed)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds allowed per row")
    ap.add_argument("--verbose", action="store_true", help="echo every child's output")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        CHILDREN[args.child](json.loads(Path(args.spec).read_text()))
        return 0
    if args.list:
        for key, label, *_ in VARIANTS:
            print(f"{key:18} {'*' if key in DEFAULT_ROWS else ' '} {label}")
        print("(* = run by default)")
        return 0
    steps = args.steps or (4 if args.quick else 8)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    wanted = [k.strip() for k in args.only.split(",")] if args.only else DEFAULT_ROWS
    bad = [k for k in wanted if k not in KEYS]
    if bad:
        ap.error(f"unknown row(s) {', '.join(bad)}; choose from {', '.join(KEYS)}")
    if args.workdir:
        work = Path(args.workdir).resolve()
        work.mkdir(parents=True, exist_ok=True)
        tmp = None
    else:
        tmp = tempfile.TemporaryDirectory(prefix="tunelab-bench-pref-")
        work = Path(tmp.name)
    try:
        return _run(args, work, [k for k in KEYS if k in wanted], steps, warmup)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _run(args, work: Path, wanted: list[str], steps: int, warmup: int) -> int:
    from tunelab.model.loading import resolve_model_path

    say = lambda s: print(s, flush=True)  # noqa: E731
    model_dir = Path(resolve_model_path(args.model))
    machine = machine_summary()
    say(f"bench/preference.py: {len(wanted)} rows x {steps} steps (timing after {warmup}), batch {args.batch_size}; "
        f"work folder {work}")
    say(f"machine: {machine['cpu']} ({machine['cpu_kind']}), {machine['torch_threads']} torch threads; auto dtype "
        f"{machine['auto_dtype']} ({machine['auto_dtype_reason']}); load average {_load()}")
    stages = {v[3] for v in VARIANTS if v[0] in wanted}
    data = {}
    for stage in sorted(stages):
        data[stage] = prepare_stage(work, model_dir, stage, args.max_length, args.seed,
                                    args.kto_data if stage == "kto" else args.data)
        d = data[stage]
        say(f"data ({stage}): {d['source']} -> {d['examples']} examples <= {args.max_length} tokens "
            f"({d['rejected']} of {d['records_read']} records left out)")
    warmup_steps = math.ceil(0.03 * steps)  # tunelab's default warmup_ratio, the same for TRL

    def child(kind: str, spec: dict, name: str, extra_env: dict | None = None):
        spec_path = work / f"{name}.spec.json"
        spec["result"] = str(work / f"{name}.result.json")
        spec_path.write_text(json.dumps(spec))
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--spec", str(spec_path)]
        res = run_child(argv, env={"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
                                   "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                                   **(extra_env or {})},
                        log_path=work / f"{name}.log", timeout_s=args.timeout, echo=args.verbose)
        ok = res.returncode == 0 and Path(spec["result"]).is_file()
        return res, json.loads(Path(spec["result"]).read_text()) if ok else None

    rows: dict[str, dict] = {}
    for key, label, kind, stage, precision in VARIANTS:
        if key not in wanted:
            continue
        d = data[stage]
        batches = step_batches(d["examples"], args.batch_size, args.seed, steps)
        row: dict[str, Any] = {"key": key, "label": label, "kind": kind, "stage": stage, "precision": precision}
        if kind == "trl":
            spec = {"model_dir": str(model_dir), "train_file": d["train_file"], "out_dir": str(work / key),
                    "stage": stage, "precision": precision, "order": [i for b in batches for i in b],
                    "steps": steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                    "max_length": args.max_length, "warmup_steps": warmup_steps, "beta": args.beta,
                    "lora_r": args.lora_r, "lora_alpha": args.lora_alpha}
        else:
            spec = {"overrides": [
                f"model.name={model_dir}", f"data.train={d['dir']}", f"data.max_length={args.max_length}",
                "data.overflow=drop", "data.val_ratio=0", f"training.stage={stage}", f"training.max_steps={steps}",
                f"training.batch_size={args.batch_size}", f"training.learning_rate={args.lr}",
                f"training.seed={args.seed}", "training.logging_steps=1", "training.save_steps=0",
                f"preference.beta={args.beta}", f"lora.r={args.lora_r}", f"lora.alpha={args.lora_alpha}",
                "lora.dropout=0", "tracking.report_to=[none]", f"output.dir={work / 'runs'}",
                f"output.run_name={key}"] + (["model.dtype=fp32"] if precision == "fp32" else []) + EXTRA.get(key, [])}
        stale = work / "runs" / key if kind == "tunelab" else work / key
        if stale.exists():
            shutil.rmtree(stale)
        say(f"[{key}] {label} ... (load average {_load()})")
        res, out = child(kind, spec, key, row_env(key, kind))
        row.update(peak_rss_bytes=res.peak_rss_bytes, wall_s=res.wall_s, ok=out is not None,
                   step_pairs=[len(b) for b in batches], load_avg=os.getloadavg())
        if out is None:
            tail = [x for x in res.output_tail.strip().splitlines() if x.strip()]
            row["error"] = tail[-1][:300] if tail else f"exit {res.returncode}"
            say(f"[{key}] FAILED (exit {res.returncode}): {row['error']}  (log: {work / (key + '.log')})")
            rows[key] = row
            continue
        row.update(out)
        row.update(summarise(out, batches, d["tokens"], warmup))
        say(f"[{key}] {fmt(row['pairs_per_s'], '.3f')} pairs/s, {fmt(row['tokens_per_s'], '.0f')} tok/s, "
            f"{fmt(row['s_per_step'], '.2f')} s/step, peak RSS {row['peak_rss_bytes'] / GIB:.2f} GiB, final loss "
            f"{fmt(row['final_train_loss'], '.4f')}, dtype {(row.get('dtype') or {}).get('name')}, {res.wall_s:.0f} s")
        rows[key] = row

    report = {"settings": {"model": args.model, "model_dir": str(model_dir), "steps": steps, "warmup": warmup,
                           "batch_size": args.batch_size, "lr": args.lr, "beta": args.beta,
                           "max_length": args.max_length, "seed": args.seed, "tolerance": args.tolerance,
                           "lora": f"r={args.lora_r} alpha={args.lora_alpha} dropout=0 all-linear",
                           "data": {s: {k: v for k, v in d.items() if k != "tokens"} for s, d in data.items()}},
              "machine": machine, "load_avg_end": os.getloadavg(), "rows": list(rows.values())}
    print()
    print(render_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        say(f"\nJSON: {args.json}")
    return 0 if all(r.get("ok") for r in rows.values()) else 1


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _match(rows: dict, stage: str, precision: str) -> dict | None:
    r = rows.get(f"trl-{stage}" + ("-fp32" if precision == "fp32" else ""))
    return r if r and r.get("ok") else None


def render_table(report: dict) -> str:
    """pairs/s, tokens/s, x base, RSS / base against the TRL row of the same stage at TRL's defaults (or, when that
    row was not run, its fp32 row); |d loss| against the TRL row of the same stage and precision."""
    rows = {r["key"]: r for r in report["rows"]}
    headers = ["row", "dtype", "pairs/s", "tok/s", "x base", "s/step", "peak RSS GiB", "RSS / base", "final loss",
               "|d loss| vs TRL"]
    out = []
    for r in report["rows"]:
        if not r.get("ok"):
            out.append([r["key"], "—", "failed", "", "", "", fmt(r.get("peak_rss_bytes", 0) / GIB, ".2f"), "", "",
                        (r.get("error") or "")[:60]])
            continue
        base = _match(rows, r["stage"], "default") or _match(rows, r["stage"], "fp32")
        same = _match(rows, r["stage"], r["precision"])
        speed = r["pairs_per_s"] / base["pairs_per_s"] if base and base is not r and r.get("pairs_per_s") else None
        mem = r["peak_rss_bytes"] / base["peak_rss_bytes"] if base and base is not r else None
        delta = (abs(r["final_train_loss"] - same["final_train_loss"]) if same and same is not r
                 and r.get("final_train_loss") is not None and same.get("final_train_loss") is not None else None)
        mark = "" if delta is None or r["precision"] != "fp32" else (
            " ok" if delta <= report["settings"]["tolerance"] else " > tol")
        out.append([r["key"], (r.get("dtype") or {}).get("name", "?"), fmt(r.get("pairs_per_s"), ".3f"),
                    fmt(r.get("tokens_per_s"), ".0f"), (fmt(speed, ".2f") + "×") if speed else "—",
                    fmt(r.get("s_per_step"), ".2f"), fmt(r["peak_rss_bytes"] / GIB, ".2f"),
                    fmt(mem, ".2f"), fmt(r.get("final_train_loss"), ".4f"),
                    (fmt(delta, ".1e") + mark) if delta is not None else "—"])
    s, m = report["settings"], report["machine"]
    la = ", ".join(f"{x:.2f}" for x in m["load_avg"])
    lb = ", ".join(f"{x:.2f}" for x in report["load_avg_end"])
    head = (f"{s['steps']} steps x {s['batch_size']} pairs (kto: examples) per row, timing after {s['warmup']} "
            f"warm-up steps; LoRA {s['lora']}, lr {s['lr']}, beta {s['beta']}, pairs <= {s['max_length']} tokens\n"
            f"{m['cpu']} ({m['cpu_kind']}), {m['torch_threads']} threads; auto dtype {m['auto_dtype']} "
            f"({m['auto_dtype_reason']}); load average {la} at the start, {lb} at the end\n"
            "x base / RSS / base: against the stage's TRL row at its defaults; |d loss|: against the TRL row of the "
            f"same stage and precision (fp32 rows: target <= {s['tolerance']:g})\n")
    return head + text_table(headers, out)


if __name__ == "__main__":
    sys.exit(main())
