"""The training hot path against the reference it stands for: a plain transformers model with a peft adapter,
`model(input_ids, attention_mask, labels=...)` on the records as one padded batch (its mean over every labelled
token). One optimiser step's gradient through the recipe's own
pieces (packed rows or padded batches, accumulation, a token budget split into passes, fused LoRA, lean layers,
per-record attention, the chunked loss) is the token-weighted mean of the records' losses; evaluation is the mean
token loss of the held-out records; records longer than the model's positions are refused, not trained."""

from __future__ import annotations

import json

import pytest
import torch

from tunelab.config import load_config
from tunelab.data.batching import collate_packed, collate_padded, step_batches_for_epoch
from tunelab.data.template import encode_record
from tunelab.model.adapters import apply_method
from tunelab.model.loss import CausalLMLoss, autocast_for, eval_loss


def _records(tok, n=8):
    """Records of uneven lengths and trained-token counts."""
    out = []
    for i in range(n):
        conv = [{"role": "user", "content": f"Question {i} " * (1 + (i * 7) % 9)},
                {"role": "assistant", "content": f"Answer {i} word " * (1 + (i * 5) % 11)}]
        enc = encode_record(tok, conv, max_length=128)
        out.append({"input_ids": enc.input_ids, "labels": enc.labels,
                    "n_targets": sum(1 for x in enc.labels[1:] if x != -100)})
    return out


def _recipe_model(model_dir, dtype, *options):
    """The model as the recipe trains it (its levers on), with nonzero lora_B so that every adapter has a gradient."""
    from tunelab.train.distributed import make_accelerator
    from tunelab.train.recipe import build_model

    cfg = load_config(None, [f"model.name={model_dir}", f"model.dtype={dtype}", "lora.r=4", "lora.alpha=8",
                             "data.max_length=128", *options])
    model, choice = build_model(cfg, make_accelerator(), lambda *_: None)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return cfg, model, autocast_for("cpu", choice.name)


def _reference(model_dir, cfg, trained):
    """A plain fp32 transformers + peft model holding `trained`'s adapter weights."""
    from transformers import AutoModelForCausalLM

    ref = apply_method(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), cfg)
    adapters = {k: v.float() for k, v in trained.state_dict().items() if "lora_" in k}
    assert not ref.load_state_dict(adapters, strict=False).unexpected_keys
    return ref


def _reference_loss(ref, records, pad_id):
    """transformers' own loss of the records as one right-padded batch: the mean over every labelled token."""
    batch = collate_padded(records, pad_id)
    assert int((batch["labels"][:, 1:] != -100).sum()) == sum(e["n_targets"] for e in records)
    return ref(**batch).loss


def _adapter_grads(model):
    return {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


# training.batch_tokens in passes (4 passes of <= 128 tokens a step), batch_size records packed, and padded
MODES = {"tokens": ["training.batch_tokens=256", "training.pass_tokens=128"],
         "packed": ["training.batch_size=3"], "padded": ["training.batch_size=3", "training.packing=false"]}


@pytest.mark.parametrize("dtype, mode", [("fp32", "tokens"), ("fp32", "packed"), ("fp32", "padded"),
                                         ("bf16", "tokens")])
def test_one_steps_gradient_is_the_reference_token_mean_over_its_records(model_dir, tiny_tokenizer, dtype, mode):
    """Several passes of uneven token counts make one step: its loss and every adapter gradient equal the
    reference's mean token loss over the step's records (fp32: float rounding, measured ~1e-6 of each gradient's
    largest value; bf16: within its rounding, measured <= 3% of a gradient's norm, as with every lever off); no
    base weight gets one."""
    from accelerate import Accelerator

    from tunelab.train.recipe import forward_backward, make_plan

    train = _records(tiny_tokenizer)
    lengths = [len(e["input_ids"]) for e in train]
    cfg, model, autocast = _recipe_model(model_dir, dtype, "lora.dropout=0", "training.gradient_accumulation_steps=2",
                                         *MODES[mode])
    plan = make_plan(cfg, lengths, 1)
    group = step_batches_for_epoch(lengths, cfg.training, 0, plan.pass_tokens)[:plan.group_size]
    assert len(group) >= 2 and len({sum(train[i]["n_targets"] for i in b) for b in group}) > 1, group
    collate = collate_packed if cfg.training.packing else (lambda b: collate_padded(b, tiny_tokenizer.pad_token_id))
    loss, _ = forward_backward(group, train, collate, Accelerator(cpu=True), CausalLMLoss(model), autocast,
                               torch.amp.GradScaler("cpu", enabled=False))
    mine = _adapter_grads(model)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)

    ref = _reference(model_dir, cfg, model)
    reference = _reference_loss(ref, [train[i] for b in group for i in b], tiny_tokenizer.pad_token_id)
    reference.backward()
    expected = _adapter_grads(ref)
    assert mine.keys() == expected.keys() == {n for n, p in ref.named_parameters() if p.requires_grad}
    if dtype == "fp32":
        assert loss == pytest.approx(float(reference.detach()), rel=1e-6)
        for name, g in expected.items():
            assert float((mine[name] - g).abs().max()) <= 1e-5 * float(g.abs().max()), name
    else:  # the bf16 base's rounding: measured 3e-4 of the loss, <= 3% of each gradient's norm
        assert loss == pytest.approx(float(reference.detach()), rel=3e-3)
        for name, g in expected.items():
            assert float((mine[name] - g).norm()) <= 0.08 * float(g.norm()), name


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_eval_loss_is_the_reference_mean_token_loss_with_dropout_off(model_dir, tiny_tokenizer, dtype):
    """Training's evaluation (padded batches by records and by tokens) on a model that trains with LoRA dropout:
    the reference's token-weighted mean loss, the same in every batching (no mask drawn), and the model is back in
    training mode after it."""
    records = _records(tiny_tokenizer, 6)
    cfg, model, autocast = _recipe_model(model_dir, dtype, "lora.dropout=0.3")
    losses = []
    for batch_size, max_tokens in ((4, 0), (3, 90)):
        loss, count = eval_loss(CausalLMLoss(model), records, batch_size, tiny_tokenizer.pad_token_id, autocast,
                                "cpu", max_tokens)
        losses.append(loss)
    assert all(m.training for m in model.modules())
    ref = _reference(model_dir, cfg, model).eval()
    with torch.no_grad():
        reference = float(_reference_loss(ref, records, tiny_tokenizer.pad_token_id))
    assert count == sum(e["n_targets"] for e in records)
    tol = 1e-6 if dtype == "fp32" else 1e-3
    assert losses == pytest.approx([reference] * 2, rel=tol)


@pytest.mark.model
def test_a_record_kept_past_the_models_positions_is_refused_before_training(short_context_model_dir, tmp_path):
    """data.overflow=keep trains records past data.max_length whole; one longer than the model's
    max_position_embeddings was trained on positions the model never had (rotary: silently; learned positions: an
    index error mid-run). It is refused with the record and the fix, before a step."""
    from tunelab.errors import TunelabError
    from tunelab.train.recipe import train

    records = [{"instruction": f"Say {i}", "output": f"ok {i}"} for i in range(12)]
    records.insert(3, {"instruction": "Say " + "long " * 80, "output": "ok"})
    (tmp_path / "data.json").write_text(json.dumps(records))
    options = [f"model.name={short_context_model_dir}", "model.dtype=fp32", f"data.train={tmp_path / 'data.json'}",
               f"output.dir={tmp_path / 'out'}", "data.max_length=48", "data.val_ratio=0", "training.max_steps=2",
               "tracking.report_to=[none]", "eval.metrics=[perplexity]"]
    with pytest.raises(TunelabError, match=r"1 record\(s\) kept whole by data.overflow=keep are longer than .*"
                                           r"max_position_embeddings \(64\); the longest has 1\d\d tokens "
                                           r"\(.*data.json:record 4.*Set data.overflow=truncate"):
        train(load_config(None, options + ["data.overflow=keep"]))
    assert not list((tmp_path / "out").glob("*/checkpoint-*")), "nothing trained"
    train(load_config(None, options + ["data.overflow=truncate", "output.run_name=cut"]))  # cut to 48: trains


def test_weights_trained_beside_the_adapter_on_a_bf16_base_are_fp32_and_take_every_step(model_dir):
    """lora.modules_to_save's copy of a bf16 base's head (and lora.bias's biases) stayed bf16, where AdamW's
    learning-rate-sized steps round away: one 2e-4 step left ~2/3 of this head's weights unchanged. Every trained
    weight is an fp32 master copy now (tied copies still one Parameter), and a step moves it."""
    cfg, model, _ = _recipe_model(model_dir, "bf16", "lora.modules_to_save=[lm_head]")
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    base = model.base_model.model
    head = base.lm_head.modules_to_save["default"].weight
    assert head is base.model.embed_tokens.modules_to_save["default"].weight, "the tied copies are one Parameter"
    assert base.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16, "the frozen base stays"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(0)).to(p.dtype)
    before = head.detach().clone()
    optimizer.step()
    assert float((head.detach() != before).float().mean()) > 0.99
