"""tunelab eval --model BASE_OR_MERGED [--adapter RUN] --data PREPARED_OR_RAW [--metrics ...] [--compare-base]

    tunelab eval --adapter outputs/my-run --compare-base            # the run's own held-out split, base vs tuned
    tunelab eval --model models/merged --data data/raw/test.json --metrics perplexity,bleu,rouge,chrf,exact_match

Writes `<run>/eval/<name>.json` (metrics, settings, data fingerprint, models, BLEU tokeniser and why) and
`<run>/eval/<name>.predictions.jsonl` (prompt, reference, prediction, per-sample scores; base answers too with
--compare-base). Without a run (a plain or merged model) they go to --output-dir. A raw data file is read as
`tunelab prepare` reads it: every rejected record is printed with its file and line, and counted in the results.
"""

from __future__ import annotations

import argparse

from tunelab.cli import positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="base or merged model: hub id, local folder or bundled:... "
                                         "(default: the adapter's base model)")
    p.add_argument("--adapter", "-a", metavar="RUN", help="a run folder (its checkpoint-final) or a checkpoint folder")
    p.add_argument("--data", "-d", help="prepared folder, run folder (its data/) or raw file (default: the run's data)")
    p.add_argument("--split", choices=["val", "train"], help="split of a prepared folder or a run (default val)")
    p.add_argument("--metrics", default=None,
                   help="comma-separated: perplexity,bleu,rouge,chrf,exact_match (default: the run's eval.metrics, "
                        "else perplexity,bleu)")
    p.add_argument("--compare-base", action="store_true", help="also evaluate the base model; print before/after")
    p.add_argument("--base", help="base model for --compare-base with a merged model (default: its tunelab.json)")
    p.add_argument("--name", help="result name: eval/<name>.json (default: `val` for the run's own data, else "
                                  "<data>-<split>, led by what was evaluated when it is not the run's final adapter "
                                  "on its base: checkpoint-2-val, m1-r1-val); a name holding another model's result "
                                  "is refused")
    p.add_argument("--max-samples", type=positive_int, help="records used for the generation metrics (default 32)")
    p.add_argument("--max-new-tokens", type=positive_int, help="generation length (default 64)")
    p.add_argument("--batch-size", type=positive_int, help="records per batch (default 8)")
    p.add_argument("--max-length", type=positive_int, help="tokens per record (default: the run's data.max_length)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], help="default: the run's dtype")
    p.add_argument("--output-dir", help="where results go when no run is given (default outputs/eval)")


def run(args: argparse.Namespace) -> int:
    from tunelab.evaluate.report import eval_table
    from tunelab.runs import make_console
    from tunelab.evaluate.runner import run_eval

    out = run_eval(args.model, args.adapter, args.data, metrics=args.metrics, name=args.name, split=args.split,
                   compare_base=args.compare_base, base=args.base, max_samples=args.max_samples,
                   max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, max_length=args.max_length,
                   dtype=args.dtype, output_dir=args.output_dir)
    console = make_console()
    base = out.base_result.metrics if out.base_result else None
    data = out.record["data"]
    title = f"{out.name}: {data['records']} records ({data['split']})"
    console.print(eval_table(out.result.metrics, base, title=title))
    choice = out.record.get("tokenizer_choice")
    if choice:
        console.print(f"BLEU tokenisation: {choice['bleu_tokenize']} — {choice['bleu_tokenize_reason']}")
    if data.get("records_rejected"):  # a raw file: each rejection was printed above, as prepare prints them
        console.print(f"{data['records_rejected']} of {data['records_read']} records of {data['source']} rejected "
                      "(reasons above; counts and the first 50 in the results)", markup=False, highlight=False,
                      soft_wrap=True)
    console.print(f"results: {out.json_path}\npredictions: {out.predictions_path}")
    return 0
