"""One LLaMA-Factory training row of bench/train.py, run by LLaMA-Factory's own venv (setup_llamafactory.sh).

    <llamafactory venv>/bin/python bench/peers/llamafactory_child.py SPEC.json

SPEC (written by bench/train.py): model_dir, train_file (tunelab's prepared train split, {"messages": [...]} per
line), out_dir, steps, rows (per_device_train_batch_size), cutoff, lr, warmup_steps, seed, bf16, result. Standard
library and LLaMA-Factory only: this file must not import tunelab or bench (another venv).

Measured here: the time of every optimiser step (a TrainerCallback, from the end of the previous step, as the
other rows) and the non-padding tokens of every micro-batch (counted from the features LLaMA-Factory's collator
receives, before it turns neat packing's segment ids into a 4D mask). The adapter is saved for the common eval.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def write_dataset(spec: dict, folder: Path) -> None:
    """The train split in LLaMA-Factory's sharegpt/OpenAI-messages form, and its dataset_info.json."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(x) for x in Path(spec["train_file"]).read_text(encoding="utf-8").splitlines() if x.strip()]
    (folder / "train.json").write_text(json.dumps([{"messages": r["messages"]} for r in rows], ensure_ascii=False))
    info = {"bench": {"file_name": "train.json", "formatting": "sharegpt", "columns": {"messages": "messages"},
                      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                               "assistant_tag": "assistant", "system_tag": "system"}}}
    (folder / "dataset_info.json").write_text(json.dumps(info))


def count_tokens_in_collator(counts: list[int]) -> None:
    from llamafactory.data import collator as C

    cls = C.SFTDataCollatorWith4DAttentionMask
    original = cls.__call__

    def call(self, features):
        # non-padding tokens: neat packing marks each record's tokens with its segment number, padding with 0
        counts.append(sum(sum(1 for a in f["attention_mask"] if a) for f in features))
        return original(self, features)

    cls.__call__ = call


def main(spec_path: str) -> int:
    import torch
    from transformers import TrainerCallback

    spec = json.loads(Path(spec_path).read_text())
    t0 = time.perf_counter()
    out = Path(spec["out_dir"])
    write_dataset(spec, out / "data")
    counts: list[int] = []
    count_tokens_in_collator(counts)
    times: list[float] = []
    losses: list[float] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            times.append(now - self.t)
            self.t = now

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = {
        "model_name_or_path": spec["model_dir"], "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_target": "all", "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.05,
        "dataset": "bench", "dataset_dir": str(out / "data"), "template": "smollm2", "cutoff_len": spec["cutoff"],
        "packing": True, "neat_packing": True, "overwrite_cache": True, "preprocessing_num_workers": 1,
        "output_dir": str(out / "adapter"), "overwrite_output_dir": True, "per_device_train_batch_size": spec["rows"],
        "gradient_accumulation_steps": 1, "learning_rate": spec["lr"], "max_steps": spec["steps"],
        "lr_scheduler_type": "cosine", "warmup_steps": spec["warmup_steps"], "max_grad_norm": 1.0,
        "weight_decay": 0.0, "seed": spec["seed"], "bf16": spec["bf16"], "fp16": False, "logging_steps": 1,
        "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "dataloader_num_workers": 0,
        "plot_loss": False, "trust_remote_code": False, "use_cpu": True,
    }
    from llamafactory.train.tuner import run_exp

    run_exp(args, callbacks=[StepTimer()])
    steps = len(times)
    Path(spec["result"]).write_text(json.dumps({
        "step_times": times, "step_tokens": counts[:steps], "losses": losses,
        "final_train_loss": losses[-1] if losses else None,
        "dtype": {"name": "bf16" if spec["bf16"] else "fp32", "reason": f"LLaMA-Factory bf16={spec['bf16']}"},
        "checkpoint": str(out / "adapter"), "total_s": time.perf_counter() - t0,
        "torch_threads": torch.get_num_threads(), "args": args}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
