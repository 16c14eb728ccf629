"""Every preference objective equals TRL's on the same tiny model, batch and reference: loss and LoRA gradients
within 1e-4 (fp32). TRL's trainers are built for real (DPOTrainer, KTOTrainer) and fed the same token ids through
their own collators; ORPO and SimPO (TRL's experimental ORPOTrainer / CPOTrainer, whose datasets tokenise text
themselves) run TRL's own loss methods on full logits of a padded batch, as their `concatenated_forward` does.
Ours goes through one packed, padding-free forward with the chunked per-token log-prob, in both layouts: each
answer with its own copy of the prompt, and each prompt once with the two answers as branches of it."""

from __future__ import annotations

import copy
import types
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")

from tunelab.config import PreferenceConfig  # noqa: E402
from tunelab.train.preference import adapter_disabled  # noqa: E402
from tunelab.train.preference_loss import (collate_kto, collate_pairs, preference_step,  # noqa: E402
                                           reference_logps)

TOL = 1e-4
PROMPTS = ["What is the capital of France?", "Name a prime number.", "写一句问候语。", "Say hi."]
CHOSEN = ["Paris is the capital of France.", "Seven.", "你好，很高兴见到你！", "Hi there!"]
REJECTED = ["I do not know, maybe Lyon or Marseille.", "Nine is prime.", "不知道。", "Go away, I am busy now."]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)


def _base_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def _moderate(model) -> None:
    """A LoRA B that is small but not zero: the policy differs from the reference (adapter disabled) by moderate
    log-ratios, so every loss branch is in play and nothing saturates."""
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data.copy_(torch.randn_like(p) * (0.3 if "lora_A" in n else 0.05))


@pytest.fixture()
def lora_model(tiny_model_dir):
    """The tiny Llama in fp32 with a LoRA adapter (for the trainers that are given a ready model)."""
    from peft import get_peft_model

    model = get_peft_model(_base_model(tiny_model_dir), _lora_config())
    _moderate(model)
    return model


def _same_adapter(tiny_model_dir, trained):
    """Our copy: a fresh peft model with exactly the adapter weights TRL's trainer holds."""
    from peft import get_peft_model

    ours = get_peft_model(_base_model(tiny_model_dir), _lora_config())
    lora = {k: v for k, v in trained.state_dict().items() if "lora_" in k}
    missing = ours.load_state_dict(lora, strict=False)
    assert not missing.unexpected_keys and len(lora) > 0
    return ours


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _pairs(tok) -> list[dict]:
    out = []
    for p, c, r in zip(PROMPTS, CHOSEN, REJECTED):
        prompt = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        out.append({"prompt_ids": _ids(tok, prompt), "chosen_ids": _ids(tok, c + "<|im_end|>"),
                    "rejected_ids": _ids(tok, r + "<|im_end|>")})
    return out


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _ours(model, batch, stage, pcfg) -> tuple[float, dict]:
    model.zero_grad()
    ref = reference_logps(lambda: adapter_disabled(model), batch, stage, 16) if stage in ("dpo", "kto") else None
    out = preference_step(model, batch, pcfg, stage, ref, chunk_size=16)  # several chunks per row
    loss = out.loss_sum / out.n
    loss.backward()
    return float(loss.detach()), _grads(model)


def _ours_both_layouts(model, pairs, stage, pcfg, **collate_kw) -> list[tuple[float, dict]]:
    """Ours twice: each answer with its own copy of the prompt (SDPA), then each prompt once with the rejected
    answer as a branch of it (tunelab's packed attention, which reads branches)."""
    from tunelab.model.attention import use_packed_attention

    plain = _ours(model, collate_pairs(pairs, **collate_kw), stage, pcfg)
    with pytest.raises(ValueError, match="shares prompts"):  # SDPA's masks would read a branch as a new record
        _ours(model, collate_pairs(pairs, share_prompt=True, **collate_kw), stage, pcfg)
    assert use_packed_attention(model.get_base_model())
    return [plain, _ours(model, collate_pairs(pairs, share_prompt=True, **collate_kw), stage, pcfg)]


def _compare(a_loss, a_grads, b_loss, b_grads) -> None:
    assert abs(a_loss - b_loss) < TOL, (a_loss, b_loss)
    assert a_grads.keys() == b_grads.keys() and a_grads
    worst = max(float((a_grads[k] - b_grads[k]).abs().max()) for k in a_grads)
    assert worst < TOL, worst
    assert any(float(g.abs().max()) > 1e-6 for g in a_grads.values()), "gradients must not be trivially zero"


def _trl_args(cls, tmp_path, batch, **kw):
    return cls(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=batch, use_cpu=True,
               bf16=False, fp16=False, max_length=None, **kw)


@pytest.mark.parametrize("loss_type,smoothing,sft_weight", [("sigmoid", 0.0, 0.0), ("hinge", 0.0, 0.0),
                                                             ("ipo", 0.0, 0.0), ("sigmoid", 0.0, 0.7)])
def test_dpo_equals_trl(tiny_model_dir, tok, tmp_path, loss_type, smoothing, sft_weight):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    pairs = _pairs(tok)
    data = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=_base_model(tiny_model_dir), peft_config=_lora_config(),
                             args=_trl_args(DPOConfig, tmp_path, len(pairs), beta=0.3,
                                            # sft_weight: TRL's RPO form, the sft loss added with its weight
                                            loss_type=[loss_type] + ["sft"] * bool(sft_weight),
                                            loss_weights=[1.0, sft_weight] if sft_weight else None),
                             train_dataset=data, processing_class=tok)
    _moderate(trainer.model)
    ours_model = _same_adapter(tiny_model_dir, trainer.model)
    batch = trainer.data_collator(pairs)
    trainer.model.train()
    trainer.model.zero_grad()
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_grads = _grads(trainer.model)

    pcfg = PreferenceConfig(beta=0.3, loss_type=loss_type, label_smoothing=smoothing, sft_weight=sft_weight)
    for loss, grads in _ours_both_layouts(ours_model, pairs, "dpo", pcfg):
        _compare(loss, grads, float(trl_loss), trl_grads)


def _padded(pairs, pad_id):
    """TRL's experimental trainers' concatenated batch: [chosen..., rejected...], right padded, labels -100 on the
    prompt and padding."""
    rows = [(p["prompt_ids"], p["chosen_ids"]) for p in pairs] + [(p["prompt_ids"], p["rejected_ids"]) for p in pairs]
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (a, b) in enumerate(rows):
        ids[i, :len(a) + len(b)] = torch.tensor(a + b)
        labels[i, len(a):len(a) + len(b)] = torch.tensor(b)
        mask[i, :len(a) + len(b)] = 1
    return ids, labels, mask


def _trl_experimental(model, pairs, pad_id, loss):
    ids, labels, mask = _padded(pairs, pad_id)
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    value = loss(logits, ids, labels, mask, len(pairs))
    value.backward()
    return float(value), _grads(model)


def test_orpo_equals_trl(lora_model, tok):
    from trl.experimental.orpo import ORPOTrainer

    pairs = _pairs(tok)
    ours_model = copy.deepcopy(lora_model)
    fake = types.SimpleNamespace(beta=0.25, accelerator=types.SimpleNamespace(device=torch.device("cpu")))

    def orpo(logits, ids, labels, mask, n):
        # ORPOTrainer.concatenated_forward: NLL over prompt + chosen (non-padding), mean log-probs of the answers
        nll_labels = torch.where(mask == 1, ids, -100)[:n]
        nll = torch.nn.functional.cross_entropy(logits[:n, :-1].reshape(-1, logits.shape[-1]),
                                                nll_labels[:, 1:].reshape(-1))
        logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
        losses = ORPOTrainer.odds_ratio_loss(fake, logps[:n], logps[n:])[0]
        return nll - losses.mean()

    trl_loss, trl_grads = _trl_experimental(lora_model, pairs, tok.pad_token_id, orpo)
    for loss, grads in _ours_both_layouts(ours_model, pairs, "orpo", PreferenceConfig(beta=0.25),
                                          with_prompt_nll=True):
        _compare(loss, grads, trl_loss, trl_grads)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_simpo_equals_trl(lora_model, tok, smoothing):
    from trl.experimental.cpo import CPOTrainer

    pairs = _pairs(tok)
    ours_model = copy.deepcopy(lora_model)
    fake = types.SimpleNamespace(beta=2.0, simpo_gamma=0.7, alpha=0.0, loss_type="simpo", label_smoothing=smoothing,
                                 accelerator=types.SimpleNamespace(device=torch.device("cpu")))

    def simpo(logits, ids, labels, mask, n):  # CPOTrainer with loss_type=simpo, cpo_alpha=0 (the SimPO paper)
        logps = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
        return CPOTrainer.cpo_loss(fake, logps[:n], logps[n:])[0].mean()

    trl_loss, trl_grads = _trl_experimental(lora_model, pairs, tok.pad_token_id, simpo)
    pcfg = PreferenceConfig(beta=2.0, gamma=0.7, label_smoothing=smoothing)
    for loss, grads in _ours_both_layouts(ours_model, pairs, "simpo", pcfg):
        _compare(loss, grads, trl_loss, trl_grads)


def test_dpo_label_smoothing_is_conservative_dpo(lora_model, tok):
    """TRL 1.x's DPOTrainer has no smoothed sigmoid; its CPOTrainer sigmoid is the same formula on a plain
    log-prob difference: with reference log-probs of zero ours must equal it."""
    from trl.experimental.cpo import CPOTrainer

    pairs = _pairs(tok)
    fake = types.SimpleNamespace(beta=0.3, alpha=0.0, loss_type="sigmoid", label_smoothing=0.2,
                                 accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    from tunelab.train.preference_loss import dpo_losses

    c, r = torch.tensor([-3.0, -5.0, -1.0, -7.0]), torch.tensor([-4.0, -2.0, -6.0, -7.5])
    zero, n = torch.zeros(4), torch.ones(4)
    ours = dpo_losses(c, r, zero, zero, n, n, 0.3, "sigmoid", 0.2)[0]
    theirs = CPOTrainer.cpo_loss(fake, c, r)[0]
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert len(pairs) == 4


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_kto_equals_trl(tiny_model_dir, tok, tmp_path, weights):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    pairs = _pairs(tok)
    examples = [{"prompt_ids": p["prompt_ids"], "completion_ids": p["chosen_ids" if i % 2 == 0 else "rejected_ids"],
                 "label": i % 2 == 0} for i, p in enumerate(pairs)]
    examples.append({**examples[0], "completion_ids": pairs[0]["rejected_ids"], "label": False})
    data = Dataset.from_list([{"prompt": p, "completion": c, "label": i % 2 == 0}
                              for i, (p, c) in enumerate(zip(PROMPTS, CHOSEN))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = KTOTrainer(model=_base_model(tiny_model_dir), peft_config=_lora_config(), args=_trl_args(KTOConfig, tmp_path, len(examples), beta=0.2,
                                                               desirable_weight=weights[0],
                                                               undesirable_weight=weights[1]),
                             train_dataset=data, processing_class=tok)
    _moderate(trainer.model)
    ours_model = _same_adapter(tiny_model_dir, trainer.model)
    # TRL's KL pairs: answers rotated by one within the batch, (x_1, y_n), (x_2, y_1), ... as collate_kto does
    rotated = [{**e, "KL_completion_ids": examples[i - 1]["completion_ids"]} for i, e in enumerate(examples)]
    batch = trainer.data_collator(rotated)
    trainer.model.train()
    trainer.model.zero_grad()
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_grads = _grads(trainer.model)

    pcfg = PreferenceConfig(beta=0.2, desirable_weight=weights[0], undesirable_weight=weights[1])
    loss, grads = _ours(ours_model, collate_kto(examples), "kto", pcfg)
    _compare(loss, grads, float(trl_loss), trl_grads)
