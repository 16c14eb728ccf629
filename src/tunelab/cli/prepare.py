"""`tunelab prepare`: validate a raw dataset and write a prepared folder (train/val splits, report, rejections).

    tunelab prepare --input data/raw/my_data.json --format alpaca
    tunelab prepare --input data/raw/ --map instruction=question,output=answer --max-length 1024
    tunelab prepare --input chats.jsonl --check --max-reject-ratio 0.05   # dry run for CI

Exit codes: 0 the data is usable; 1 not usable (nothing accepted, or too many rejections); 2 a file cannot be
read at all, or a bad option (the message says which and where).
"""

from __future__ import annotations

import argparse

from tunelab.cli import non_negative_int

DEFAULT_MODEL = "bundled:smollm2-135m-instruct"  # the same default as model.name in tunelab.config


def parse_map(text: str | None) -> dict[str, str] | None:
    """'instruction=question,output=answer' -> {'instruction': 'question', 'output': 'answer'}."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise argparse.ArgumentTypeError(f"--map expects name=column pairs separated by commas, got {part!r}")
        out[key.strip()] = value.strip()
    return out


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared with `tunelab validate`."""
    p.add_argument("--format", default="auto", choices=["auto", "alpaca", "sharegpt", "openai"],
                   help="record format of sft conversations; auto detects it per record (default, and the only "
                        "choice for other stages)")
    p.add_argument("--map", type=parse_map, default=None, metavar="NAME=COLUMN,...",
                   help="custom field names, e.g. instruction=question,output=answer (also role=, content=; "
                        "preference stages: chosen=, rejected=, prompt=, ...; pt: text=)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model or tokenizer folder whose tokenizer and chat template give the token statistics "
                        f"(default {DEFAULT_MODEL})")
    p.add_argument("--no-tokenizer", action="store_true", help="skip token statistics (no model needed)")
    p.add_argument("--max-length", type=int, default=512, help="maximum tokens per record (default 512)")
    p.add_argument("--overflow", default="truncate", choices=["truncate", "drop", "keep"],
                   help="what to do with records longer than --max-length (default truncate)")
    p.add_argument("--train-on", default="assistant", choices=["assistant", "all", "last_assistant"],
                   help="loss mask used for the statistics and samples (default assistant)")
    p.add_argument("--system-prompt", default=None, help="system prompt added to records that carry none")
    p.add_argument("--max-reject-ratio", type=float, default=1.0,
                   help="fail (exit 1) when more than this share of records is rejected (default 1.0: never)")
    p.add_argument("--show-samples", type=non_negative_int, default=0, metavar="N",
                   help="print N rendered records with the trained span marked [[ ]]")
    p.add_argument("--stage", default="sft", choices=["sft", "pt", "dpo", "orpo", "simpo", "kto"],
                   help="what the data trains (training.stage): sft conversations (default), pt raw text, "
                        "dpo/orpo/simpo chosen/rejected pairs, kto answers labelled true/false")
    p.add_argument("--text-documents", default=None, choices=["auto", "paragraph", "line", "file"],
                   help="--stage pt, .txt files: where one document ends (data.text_documents); auto (default): "
                        "blank lines separate documents, a file without them holds one per line")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", "-i", nargs="+", required=True, metavar="FILE",
                   help="raw data: files (JSON, JSONL, CSV, Parquet), folders or globs")
    add_common_arguments(p)
    p.add_argument("--output", "-o", default=None, help="prepared folder (default data/processed/<name>)")
    p.add_argument("--name", default=None, help="dataset name (default: the first input's file name)")
    p.add_argument("--val-ratio", type=float, default=None, help="share held out for validation (default 0.1)")
    p.add_argument("--eval-file", nargs="+", default=None, metavar="FILE",
                   help="explicit validation data instead of --val-ratio (every input record then trains)")
    p.add_argument("--seed", type=int, default=42, help="seed of the train/validation split (default 42)")
    p.add_argument("--check", action="store_true", help="validate and report only; write nothing")


def load_stats_tokenizer(name: str):
    """A tokenizer for the statistics: a model (bundled, hub id, folder) or a folder holding just a tokenizer."""
    from pathlib import Path

    path = Path(name).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    from tunelab.model.loading import load_tokenizer

    return load_tokenizer(name)


def run_prepare(args: argparse.Namespace, inputs: list[str], check: bool) -> int:
    from tunelab.data.prepare import DataError, prepare_dataset

    if args.text_documents and args.stage != "pt":
        raise DataError(f"--text-documents applies to --stage pt (raw text), not --stage {args.stage}")
    val_ratio = getattr(args, "val_ratio", None)  # validate has neither option
    if getattr(args, "eval_file", None) and val_ratio is not None:
        raise DataError("--val-ratio and --eval-file exclude each other: with --eval-file the validation split is "
                        "that file and every input record trains; give one of them")
    tokenizer = None if args.no_tokenizer else load_stats_tokenizer(args.model)
    result = prepare_dataset(
        inputs, getattr(args, "output", None), format=args.format, column_map=args.map, tokenizer=tokenizer,
        max_length=args.max_length, overflow=args.overflow, train_on=args.train_on,
        val_ratio=0.1 if val_ratio is None else val_ratio, eval_inputs=getattr(args, "eval_file", None),
        seed=getattr(args, "seed", 42), system_prompt=args.system_prompt, check=check,
        max_reject_ratio=args.max_reject_ratio, show_samples=args.show_samples, name=getattr(args, "name", None),
        stage=args.stage, text_documents=args.text_documents or "auto")
    return 0 if result.usable else 1


def run(args: argparse.Namespace) -> int:
    return run_prepare(args, args.input, args.check)
