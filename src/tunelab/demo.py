"""The whole pipeline end to end on the bundled model and the demo data — what `make demo` runs.

    tunelab demo [--config config.yaml] [--merged models/merged] [KEY=VALUE ...]

prepare (both demo files) → train (LoRA) → eval before/after → merge (verified) → infer, ending with the base
model's and the fine-tuned model's answers to the same prompts side by side.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.rule import Rule


def run_demo(config: str = "config.yaml", merged: str = "models/merged", overrides: list[str] | None = None,
             raw_dir: str = "data/raw", console: Console | None = None) -> dict:
    from tunelab.config import load_config
    from tunelab.data.prepare import prepare_dataset
    from tunelab.demo_data import DEMO_PROMPTS, write_demo_data
    from tunelab.evaluate.report import eval_table
    from tunelab.evaluate.runner import run_eval
    from tunelab.infer import compare_answers, print_comparison
    from tunelab.merge import merge_adapter, prepare_output
    from tunelab.model.loading import load_tokenizer
    from tunelab.train.recipe import train

    console = console or Console()
    t0 = time.time()
    timings: dict[str, float] = {}

    def stage(name: str) -> None:
        timings[name] = time.time()
        console.print(Rule(f"[bold]{name}"))

    cfg = load_config(config, overrides)  # a bad config or --merged fails now, not after minutes of training
    prepare_output(Path(merged), "--merged")
    stage("1/5 prepare")
    files = write_demo_data(raw_dir)
    console.print(f"demo data written: {files[0]} (Alpaca), {files[1]} (ShareGPT)")
    tokenizer = load_tokenizer(cfg.model.name)
    prepared = prepare_dataset([str(f) for f in files], "data/processed/demo", tokenizer=tokenizer,
                               max_length=cfg.data.max_length, val_ratio=cfg.data.val_ratio, seed=cfg.training.seed,
                               show_samples=1)
    cfg = load_config(config, [*(overrides or []), f"data.train={prepared.output}"])

    stage("2/5 train (LoRA)")
    run = train(cfg, config_path=config)

    stage("3/5 evaluate: base vs fine-tuned on the held-out split")
    ev = run_eval(adapter=str(run), compare_base=True, metrics=["perplexity", "bleu", "rouge"])
    console.print(eval_table(ev.result.metrics, ev.base_result.metrics if ev.base_result else None,
                             title="held-out evaluation"))

    stage("4/5 merge (verified)")
    report = merge_adapter(str(run), merged)
    console.print(report.summary())

    stage("5/5 inference: the same prompts, base vs fine-tuned (merged)")
    rows = compare_answers(cfg.model.name, merged, DEMO_PROMPTS, max_new_tokens=48)
    print_comparison(rows, console=console, titles=("base model", "fine-tuned (merged)"))
    total = time.time() - t0
    console.print(f"\nrun folder: {run}\nmerged model: {merged}\ndemo finished in {total / 60:.1f} min")
    console.print(next_steps(merged, run))
    return {"run": run, "merged": merged, "merge": report, "eval": ev, "answers": rows, "seconds": total}


def next_steps(merged: str, run: Path) -> str:
    """The commands to try after the demo, on the folders it wrote."""
    import shlex

    return (f"next: python inference.py --model {shlex.quote(str(merged))}   |   tunelab runs list   |   "
            f"tunelab runs report {shlex.quote(str(run))}")
