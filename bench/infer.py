"""Batched vs one-at-a-time generation on the bundled model: tokens/s of `tunelab.infer.generate`.

    python bench/infer.py                           # 16 prompts, 64 new tokens, batch 1 vs 4 vs 16, auto dtype
    python bench/infer.py --dtype fp32 --max-new-tokens 128 --batch-sizes 1,16 --threads 1

Same process, same prompts, greedy, side by side (the machine is shared: compare only within one run).
tokens/s counts the answer tokens each prompt really produced (up to and including its end-of-turn token), not
the padding a finished row of a batch keeps computing. "same answers" compares each batch size's answers with
batch 1's: equal in fp32; in bf16, padding changes rounding and a near-tie can flip a token.
"""

from __future__ import annotations

import argparse
import time

PROMPTS = [
    "Who are you?", "What is the capital of France?", "Give me three tips for learning Python.",
    "Explain what a neural network is in two sentences.", "Write a haiku about the sea.",
    "What is 17 times 23?", "Name the planets of the solar system.", "How do I boil an egg?",
    "Translate 'good morning' into Spanish and German.", "What causes rain?",
    "Summarise the plot of Romeo and Juliet.", "Why is the sky blue?", "List four fruits that are red.",
    "What is the difference between a list and a tuple in Python?", "Suggest a name for a pet turtle.",
    "How many days are there in a leap year?",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled:smollm2-135m-instruct")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--n", type=int, default=16, help="number of prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", default="1,4,16")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice). On a shared, loaded machine 1 thread can be "
                        "several times faster than 2: OpenMP threads wait for each other at every matmul")
    args = p.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from rich.console import Console
    from rich.table import Table

    from tunelab.infer import as_conversation, generate, load
    from tunelab.model.loading import choose_dtype

    model, tok = load(args.model, dtype=args.dtype)
    convos = [as_conversation(PROMPTS[i % len(PROMPTS)]) for i in range(args.n)]
    generate(model, tok, convos[:2], max_new_tokens=4)  # warm-up: first-call allocations and kernel selection
    rows, reference = [], None
    for bs in [int(x) for x in args.batch_sizes.split(",")]:
        t0 = time.perf_counter()
        answers = generate(model, tok, convos, max_new_tokens=args.max_new_tokens, batch_size=bs)
        secs = time.perf_counter() - t0
        # answer tokens + the end-of-turn token where the answer stopped before the limit
        tokens = sum(min(len(tok(a, add_special_tokens=False)["input_ids"]) + 1, args.max_new_tokens) for a in answers)
        reference = reference or answers
        same = sum(a == b for a, b in zip(answers, reference))
        rows.append((bs, secs, tokens, tokens / secs, same))
    base = rows[0][3]
    table = Table(title=f"generate() on {args.model}, {args.n} prompts, ≤{args.max_new_tokens} new tokens, "
                        f"{choose_dtype(args.dtype).name}, torch threads {torch.get_num_threads()}")
    for col in ("batch size", "seconds", "answer tokens", "tokens/s", "vs batch 1", "same answers"):
        table.add_column(col, justify="right")
    for bs, secs, tokens, tps, same in rows:
        table.add_row(str(bs), f"{secs:.1f}", str(tokens), f"{tps:.1f}", f"{tps / base:.1f}×", f"{same}/{args.n}")
    Console().print(table)


if __name__ == "__main__":
    main()
