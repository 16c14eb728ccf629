"""One Unsloth training row of bench/train.py, run by Unsloth's own venv (setup_unsloth.sh).

    <unsloth venv>/bin/python bench/peers/unsloth_child.py SPEC.json

SPEC (written by bench/train.py): model_dir, train_file (tunelab's prepared train split, {"messages": [...]} per
line), out_dir, steps, rows (per_device_train_batch_size), cutoff, lr, warmup_steps, seed, bf16, result. Standard
library, Unsloth and TRL only (another venv). Unsloth's documented LoRA recipe: `FastLanguageModel` with its
defaults (including `use_gradient_checkpointing="unsloth"`), TRL's SFTTrainer with packing (rows of `cutoff`
tokens, padding-free), the answer-only loss TRL uses for prompt-completion data. Measured like the LLaMA-Factory
row: each optimiser step's time, non-padding tokens per micro-batch from the collator, the adapter saved.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(spec_path: str) -> int:
    import unsloth  # noqa: F401  (first: it patches transformers and TRL)
    from unsloth import FastLanguageModel

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    spec = json.loads(Path(spec_path).read_text())
    t0 = time.perf_counter()
    out = Path(spec["out_dir"])
    recs = [json.loads(x) for x in Path(spec["train_file"]).read_text(encoding="utf-8").splitlines() if x.strip()]
    ds = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in recs])
    dtype = torch.bfloat16 if spec["bf16"] else torch.float32
    model, tok = FastLanguageModel.from_pretrained(spec["model_dir"], max_seq_length=spec["cutoff"], dtype=dtype,
                                                   load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, lora_dropout=0.05, random_state=spec["seed"],
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    times: list[float] = []
    counts: list[int] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            times.append(now - self.t)
            self.t = now

    args = SFTConfig(
        output_dir=str(out / "trainer"), max_steps=spec["steps"], per_device_train_batch_size=spec["rows"],
        learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=spec["warmup_steps"], weight_decay=0.0,
        max_grad_norm=1.0, seed=spec["seed"], bf16=spec["bf16"], fp16=False, max_length=spec["cutoff"],
        packing=True, logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, use_cpu=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[StepTimer()])
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        mask = batch.get("attention_mask")
        counts.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting
    trainer.train()
    model.save_pretrained(str(out / "adapter"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    Path(spec["result"]).write_text(json.dumps({
        "step_times": times, "step_tokens": counts[:len(times)], "losses": losses,
        "final_train_loss": losses[-1] if losses else None,
        "dtype": {"name": "bf16" if spec["bf16"] else "fp32", "reason": f"Unsloth dtype, bf16={spec['bf16']}"},
        "checkpoint": str(out / "adapter"), "total_s": time.perf_counter() - t0,
        "gradient_checkpointing": str(getattr(args, "gradient_checkpointing", None)),
        "torch_threads": torch.get_num_threads()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
