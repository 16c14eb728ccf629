"""Shared fixtures: a tiny random Llama (2 layers) with the bundled SmolLM2 tokenizer, built in code, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


# ---------------------------------------------------------------- no trace in the repository

# Caches that tools (not tests) write; everything else the suite leaves in the working tree is a bug: a test must
# write under tmp_path. (outputs/, models/ and data/processed/ are git-ignored, so `git status` would not show it.)
_TOOL_CACHES = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", ".mypy_cache", ".ruff_cache"}


def _tree_files() -> set[str]:
    found = set()
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in _TOOL_CACHES and not d.endswith(".egg-info")]
        found.update(os.path.relpath(os.path.join(root, f), REPO) for f in files if not f.endswith(".pyc"))
    return found


def pytest_sessionstart(session):
    session.config._tunelab_tree_before = _tree_files()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_tunelab_tree_before", None)
    if before is None or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    gained = sorted(_tree_files() - before)
    if gained:
        shown = "\n  ".join(gained[:20]) + (f"\n  ... and {len(gained) - 20} more" if len(gained) > 20 else "")
        print(f"\nFAILED: the test session left {len(gained)} new file(s) in the repository (tests must write "
              f"under tmp_path):\n  {shown}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# Tests that load or train a model: `make test` runs them a second time with `model.dtype: auto` forced to the
# other precision (TUNELAB_AUTO_DTYPE), so an AVX2 machine catches what a bf16 one would, and the reverse.
_MODEL_FIXTURES = {"tiny_model_dir", "tiny_model", "model_dir", "run_dir"}


def pytest_configure(config):
    config.addinivalue_line("markers", "model: loads or trains a model (run again with the other auto dtype)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)


try:  # property tests: no example database in the repository, same examples on every machine
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("tunelab", database=None, derandomize=True, deadline=None)
    _hyp_settings.load_profile("tunelab")
except ImportError:
    pass


def shared_file(rel: str) -> Path:
    """A file under ../shared/data, or skip the test when it is absent."""
    path = SHARED_DATA / rel
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The SmolLM2 tokenizer (with its ChatML template), read from the bundled GGUF without loading weights."""
    from transformers import AutoTokenizer

    from tunelab.model.loading import bundled_gguf_path

    gguf = bundled_gguf_path("bundled:smollm2-135m-instruct")
    out = tmp_path_factory.mktemp("tok")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer random LlamaForCausalLM saved as a model folder (safetensors + tokenizer), usable as model.name."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with larger random weights: its greedy output varies from prompt to prompt instead of
    repeating one token, so comparing answers means something."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    out = tmp_path_factory.mktemp("noisy-llama")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def short_context_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A 1-layer random Llama with only 64 positions: records longer than the model's context, cheaply."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("short-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def signal_after_step(monkeypatch):
    """signal_after_step(step, signum=SIGTERM): training sends `signum` to this process once `step` is done (as a
    user's Ctrl-C or a scheduler's SIGTERM would); signal_after_step(None) stops doing it."""
    import signal

    import tunelab.train.monitor as monitor

    original = monitor.Reporter.advance

    def install(step: int | None, signum: int = signal.SIGTERM) -> None:
        def advance(self, s, info):
            original(self, s, info)
            if s == step:
                os.kill(os.getpid(), signum)

        monkeypatch.setattr(monitor.Reporter, "advance", original if step is None else advance)

    return install


@pytest.fixture
def lr_schedule():
    """`(cfg, steps) -> [lr]`: the learning rate each optimiser step of a run with `cfg` uses (its value before that
    step's scheduler.step()), for checking what a run logged; it logged the next step's once (the last step of a
    linear or cosine schedule printed LR 0)."""
    import torch

    from tunelab.train.recipe import make_scheduler

    def used(cfg, steps: int) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.training.learning_rate)
        scheduler, out = make_scheduler(optimizer, cfg, steps), []
        for _ in range(steps):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    return used
