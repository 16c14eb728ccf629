"""`tunelab infer`: chat with a model, answer one prompt or a file of prompts, or compare base and fine-tuned.

    tunelab infer --model models/merged                          # interactive, streaming; /reset /system /exit
    tunelab infer --model bundled:smollm2-135m-instruct --adapter outputs/run --prompt "Who are you?"
    tunelab infer --model models/merged --input prompts.jsonl --output answers.jsonl
    tunelab infer --adapter outputs/run --compare --prompt "Who are you?"
"""

from __future__ import annotations

import argparse

from tunelab.cli import non_negative, positive, positive_int, unit_fraction

DEFAULT_COMPARE_PROMPTS = ["Who are you?", "What can you help me with?", "Give me one tip for learning Python."]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder, hub id or bundled name (default with --adapter: "
                                                 "the adapter's base model)")
    p.add_argument("--adapter", default=None, help="run folder or adapter checkpoint to apply to --model")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--prompt", default=None, help="answer this one prompt and exit")
    mode.add_argument("--input", default=None, help="JSONL of prompts ({\"prompt\": ...} or {\"messages\": [...]})")
    p.add_argument("--output", default=None, help="with --input: JSONL to write the answers to")
    p.add_argument("--overwrite", action="store_true", help="with --output: replace the file even when it is not "
                                                            "an earlier answers file")
    p.add_argument("--compare", action="store_true", help="show base and fine-tuned answers side by side "
                                                          "(prompts from --prompt, --input or a built-in few)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--temperature", type=non_negative, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=unit_fraction, default=1.0)
    p.add_argument("--repetition-penalty", type=positive, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=positive_int, default=16, help="prompts generated together with --input")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.add_argument("--weights", choices=["model", "int8"], default="model",
                   help="decode with the model's own weights (default) or int8 copies of them: ~1.8x faster steps "
                        "on CPU, answers close to but not always the model's own (see bench/README.md)")


def run(args: argparse.Namespace) -> int:
    from tunelab import infer

    _check_options(args)
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
               repetition_penalty=args.repetition_penalty, seed=args.seed)
    if args.compare:
        labels = None
        if args.input:
            numbered = infer.numbered_prompts(args.input)
            prompts = [r["messages"] for _, r in numbered]
            labels = [f"{args.input}:{n}: the prompt" for n, _ in numbered]
        else:
            prompts = [args.prompt] if args.prompt else DEFAULT_COMPARE_PROMPTS
        base, tuned = (args.model, args.adapter) if args.adapter else (None, args.model)
        rows = infer.compare_answers(base, tuned, prompts, system=args.system, dtype=args.dtype, labels=labels, **gen)
        infer.print_comparison(rows)
        return 0
    if args.input:
        infer.check_batch(args.input, args.output, args.overwrite)  # every bad line, before the model loads
    model, tok = infer.load(args.model, adapter=args.adapter, dtype=args.dtype)
    infer.require_chat_template(tok, args.adapter or args.model)
    gen["weights"] = args.weights
    if args.prompt is not None:
        # one prompt is a single stream: batch_size=1 lets the decode use its one-row kernels (tunelab.decode)
        print(infer.generate(model, tok, [infer.as_conversation(args.prompt, args.system)], batch_size=1,
                             labels=["--prompt"], **gen)[0])
    elif args.input:
        n = infer.answer_file(model, tok, args.input, args.output, system=args.system, overwrite=args.overwrite,
                              batch_size=args.batch_size, **gen)
        print(f"wrote {n} answers to {args.output}")
    else:
        infer.chat_loop(model, tok, system=args.system, **gen)
    return 0


def _check_options(args: argparse.Namespace) -> None:
    """Options that cannot go together, or that would be ignored: refused before anything is loaded."""
    from tunelab.errors import TunelabError

    if not args.model and not args.adapter:
        raise TunelabError("give --model (a model folder, hub id or bundled name) and/or --adapter (a run folder)")
    if args.prompt is not None and not args.prompt.strip():
        raise TunelabError("--prompt is empty; give the text to answer")
    if args.compare and args.weights != "model":
        raise TunelabError("--weights int8 is for answering; --compare shows the model's own answers")
    if args.compare and args.output:
        raise TunelabError("--compare shows the answers side by side and writes no --output file; leave out "
                           "--output, or --compare to write the fine-tuned model's answers")
    if args.overwrite and not args.output:
        raise TunelabError("--overwrite goes with --output (the answers file it may replace)")
    if args.output and not args.input:
        raise TunelabError("--output goes with --input (a JSONL file of prompts)")
    if args.input and not args.output and not args.compare:
        raise TunelabError("--input needs --output (where to write the answers)")
