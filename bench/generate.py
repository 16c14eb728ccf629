"""Generation and evaluation speed: one prompt at a time vs batches of 16, in one process, side by side.

    python bench/generate.py --quick                 # 8 prompts x 32 new tokens; eval over 32 records
    python bench/generate.py --json bench-gen.json   # 16 prompts x 128 new tokens; eval over 200 records

Part 1, generation: `tunelab.infer.generate` on the same Alpaca instructions, greedy, `--max-new-tokens`, with
batch_size=1 (each prompt alone) and batch_size=16. tokens/s counts the tokens each answer really has (its
re-tokenised text plus the end-of-turn token where it stopped before the limit), not the padding a finished row
of a batch keeps computing.

Part 2, evaluation: the `tunelab eval` command's function (`tunelab.evaluate.runner.run_eval`: model loading,
perplexity over every record with training's masking, greedy generation + BLEU on up to `--eval-records`
records) over the same records with `--batch-size 16` and with `--batch-size 1` (one prompt at a time). Reported:
wall seconds, records/s, BLEU, and how many predictions are identical between the two (fp32: all, or nearly; in
bf16 left padding changes rounding and a near-tie can flip a token).

The machine is usually shared: compare the rows of one run only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alpaca_records, fmt, machine_summary, text_table  # noqa: E402

BUNDLED = "bundled:smollm2-135m-instruct"


def answer_tokens(tok, answers: list[str], limit: int) -> int:
    return sum(min(len(tok(a, add_special_tokens=False)["input_ids"]) + 1, limit) for a in answers)


def bench_generation(model, tok, prompts: list[str], max_new_tokens: int, batch_sizes: list[int], say) -> list[dict]:
    from tunelab.infer import as_conversation, generate

    convos = [as_conversation(p) for p in prompts]
    generate(model, tok, convos[:2], max_new_tokens=4, batch_size=2)  # warm-up: allocations, kernel choice
    rows, reference = [], None
    for bs in batch_sizes:
        t0 = time.perf_counter()
        answers = generate(model, tok, convos, max_new_tokens=max_new_tokens, batch_size=bs)
        secs = time.perf_counter() - t0
        tokens = answer_tokens(tok, answers, max_new_tokens)
        reference = reference or answers
        same = sum(a == b for a, b in zip(answers, reference))
        rows.append({"batch_size": bs, "prompts": len(convos), "seconds": secs, "tokens": tokens,
                     "tokens_per_s": tokens / secs, "same_as_first": same})
        say(f"  generate batch {bs}: {tokens} tokens in {secs:.1f} s = {tokens / secs:.1f} tok/s")
    return rows


def bench_eval(model_name: str, data_dir: Path, n: int, max_new_tokens: int, batch_sizes: list[int], dtype: str,
               out_dir: Path, say) -> list[dict]:
    from tunelab.evaluate.runner import run_eval

    rows, reference = [], None
    for bs in batch_sizes:
        t0 = time.perf_counter()
        run = run_eval(model_name, None, str(data_dir), metrics="perplexity,bleu", name=f"bench-bs{bs}",
                       split="train", max_samples=n, max_new_tokens=max_new_tokens, batch_size=bs, dtype=dtype,
                       output_dir=out_dir)
        secs = time.perf_counter() - t0
        preds = [p["prediction"] for p in run.result.predictions]
        reference = reference or preds
        rows.append({"batch_size": bs, "records": run.record["data"]["records"], "generated": len(preds),
                     "seconds": secs, "records_per_s": len(preds) / secs, "bleu": run.result.metrics.get("bleu"),
                     "perplexity": run.result.metrics.get("perplexity"),
                     "same_predictions": sum(a == b for a, b in zip(preds, reference))})
        say(f"  eval batch {bs}: {len(preds)} records in {secs:.1f} s, BLEU {fmt(rows[-1]['bleu'], '.2f')}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 prompts x 32 tokens; eval over 32 records x 32 tokens")
    ap.add_argument("--model", default=BUNDLED)
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--prompts", type=int, help="prompts for the generation part (default 16; --quick 8)")
    ap.add_argument("--max-new-tokens", type=int, help="new tokens per answer (default 128; --quick 32)")
    ap.add_argument("--eval-records", type=int, help="records for the eval part (default 200; --quick 32)")
    ap.add_argument("--eval-new-tokens", type=int, help="new tokens per eval answer (default 64; --quick 32)")
    ap.add_argument("--skip-eval", action="store_true", help="only the generation part")
    ap.add_argument("--json", help="write the measurements to this JSON file")
    args = ap.parse_args(argv)
    n_prompts = args.prompts or (8 if args.quick else 16)
    new_tokens = args.max_new_tokens or (32 if args.quick else 128)
    n_eval = args.eval_records or (32 if args.quick else 200)
    eval_tokens = args.eval_new_tokens or (32 if args.quick else 64)
    say = lambda s: print(s, flush=True)  # noqa: E731

    from tunelab.data.prepare import prepare_dataset
    from tunelab.infer import load
    from tunelab.model.loading import choose_dtype

    recs, source = alpaca_records()
    prompts = [r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "") for r in recs[-n_prompts:]]
    machine = machine_summary()
    choice = choose_dtype(args.dtype)
    dtype = choice.name
    say(f"bench/generate.py: {args.model}, {dtype} ({choice.reason}), {machine['cpu']} ({machine['cpu_kind']}), "
        f"{machine['torch_threads']} threads; data {source}")
    t0 = time.perf_counter()
    model, tok = load(args.model, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    say(f"generation: {n_prompts} prompts x <= {new_tokens} new tokens (model loaded in {load_s:.1f} s)")
    gen = bench_generation(model, tok, prompts, new_tokens, [1, 16], say)
    del model
    ev: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-gen-") as tmp:
        if not args.skip_eval:
            raw = Path(tmp) / "eval.json"
            raw.write_text(json.dumps(recs[:n_eval], ensure_ascii=False), encoding="utf-8")
            prepared = prepare_dataset([str(raw)], Path(tmp) / "prepared", tokenizer=tok, max_length=512,
                                       val_ratio=0.0, console=lambda *_: None)
            prepared.raise_if_unusable()
            say(f"evaluation (`tunelab eval`: perplexity + BLEU): {n_eval} records x <= {eval_tokens} new tokens")
            ev = bench_eval(args.model, Path(tmp) / "prepared", n_eval, eval_tokens, [16, 1], args.dtype,
                            Path(tmp) / "eval", say)

    print()
    print(f"Generation: tunelab.infer.generate, {n_prompts} Alpaca prompts, greedy, <= {new_tokens} new tokens, "
          f"{dtype}, {machine['torch_threads']} threads")
    base = gen[0]["tokens_per_s"]
    print(text_table(["batch size", "seconds", "answer tokens", "tokens/s", "vs batch 1", "same answers"],
                     [[str(r["batch_size"]), fmt(r["seconds"]), str(r["tokens"]), fmt(r["tokens_per_s"]),
                       fmt(r["tokens_per_s"] / base, ".1f") + "×", f"{r['same_as_first']}/{r['prompts']}"]
                      for r in gen]))
    if ev:
        print()
        print(f"Evaluation: run_eval (`tunelab eval`) over {ev[0]['records']} records: perplexity + greedy BLEU, "
              f"<= {eval_tokens} new tokens")
        slow = ev[-1]["seconds"]
        print(text_table(["batch size", "seconds", "records/s", "speed-up", "BLEU", "perplexity", "same predictions"],
                         [[str(r["batch_size"]), fmt(r["seconds"]), fmt(r["records_per_s"], ".2f"),
                           fmt(slow / r["seconds"], ".1f") + "×", fmt(r["bleu"], ".2f"), fmt(r["perplexity"], ".3f"),
                           f"{r['same_predictions']}/{r['generated']}"] for r in ev]))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "dtype": dtype, "model": args.model,
                                               "data": source, "generation": gen, "eval": ev,
                                               "settings": {"prompts": n_prompts, "max_new_tokens": new_tokens,
                                                            "eval_records": n_eval,
                                                            "eval_new_tokens": eval_tokens}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
