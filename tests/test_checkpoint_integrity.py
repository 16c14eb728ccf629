"""Checkpoints that are damaged after they were written (same size, other bytes) or carry a malformed manifest:
a resume moves a damaged newest checkpoint aside and uses the one before it, a file that still fails to load is
an error naming it, and a manifest of any shape is at worst "not complete", never a traceback."""

from __future__ import annotations

import hashlib
import json
import re
import signal
from pathlib import Path

import pytest
import torch

from tunelab.config import load_config
from tunelab.demo_data import write_demo_data
from tunelab.errors import TunelabError
from tunelab.train import checkpoint as ckpt


def _damage(path: Path) -> None:
    """Flip the first bytes, keeping the size: what a bad disk or a stray write leaves, unseen by a size check."""
    data = bytearray(path.read_bytes())
    data[:16] = bytes(b ^ 0xFF for b in data[:16])
    path.write_bytes(bytes(data))


def _tiny_checkpoint(run: Path, step: int) -> Path:
    """A real step checkpoint (optimiser, schedule, RNG, loop state) of a one-layer model: no model download."""
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return ckpt.save_checkpoint(run, f"checkpoint-{step}", lambda d: torch.save(model.state_dict(), d / "w.pt"),
                                optimizer=opt, scheduler=sched, trainer_state={"global_step": step})


def _sizes_only(folder: Path) -> None:
    """The manifest an older tunelab wrote: sizes, no hashes."""
    man = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({"files": man["files"], "complete": True}))


def test_a_new_manifest_records_each_files_sha256(tmp_path):
    folder = _tiny_checkpoint(tmp_path, 2)
    man = json.loads((folder / "manifest.json").read_text())
    assert set(man["sha256"]) == set(man["files"]) == {"w.pt", "optimizer.pt", "scheduler.pt", "rng_state.pt",
                                                        "trainer_state.json"}
    for name, digest in man["sha256"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
        assert (folder / name).stat().st_size == man["files"][name]


def test_the_newest_damaged_checkpoints_are_moved_aside_and_only_the_chosen_one_is_hashed(tmp_path, monkeypatch):
    for step in (2, 4, 6):
        _tiny_checkpoint(tmp_path, step)
    _damage(tmp_path / "checkpoint-6" / "optimizer.pt")
    _damage(tmp_path / "checkpoint-4" / "trainer_state.json")
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [2, 4, 6], "same sizes: complete to a size check"
    hashed = []
    real = ckpt.sha256_file
    monkeypatch.setattr(ckpt, "sha256_file", lambda p: hashed.append(p.parent.name) or real(p))
    said = []
    assert ckpt.newest_sound_checkpoint(tmp_path, said.append) == tmp_path / "checkpoint-2"
    assert len(said) == 2
    assert "checkpoint-6 is damaged: optimizer.pt" in said[0] and "moved aside to checkpoint-6.damaged" in said[0]
    assert "checkpoint-4 is damaged: trainer_state.json" in said[1]
    assert (tmp_path / "checkpoint-6.damaged" / "optimizer.pt").is_file()
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [2]
    ckpt.rotate(tmp_path, 1)  # rotation keeps the good one, never a damaged one in its place
    assert (tmp_path / "checkpoint-2").is_dir()
    _tiny_checkpoint(tmp_path, 4)
    _tiny_checkpoint(tmp_path, 6)
    hashed.clear()  # saving hashed the new ones
    assert ckpt.newest_sound_checkpoint(tmp_path, said.append) == tmp_path / "checkpoint-6"
    assert set(hashed) == {"checkpoint-6"}, "only the chosen checkpoint is hashed, not every one"


def test_a_second_damage_at_the_same_step_is_moved_aside_beside_the_first(tmp_path):
    for _ in range(2):
        _damage(_tiny_checkpoint(tmp_path, 2) / "rng_state.pt")
        assert ckpt.newest_sound_checkpoint(tmp_path, lambda _: None) is None
    assert (tmp_path / "checkpoint-2.damaged").is_dir() and (tmp_path / "checkpoint-2.damaged-2").is_dir()


def test_when_every_checkpoint_is_damaged_the_run_starts_from_step_0_and_says_so(tmp_path):
    _damage(_tiny_checkpoint(tmp_path, 2) / "w.pt")
    said = []
    assert ckpt.newest_sound_checkpoint(tmp_path, said.append) is None
    assert "checkpoint-2 is damaged: w.pt" in said[0]
    assert "no undamaged checkpoint is left" in said[1] and "from step 0" in said[1]


def test_only_the_main_process_moves_a_damaged_checkpoint_aside(tmp_path):
    _tiny_checkpoint(tmp_path, 2)
    _damage(_tiny_checkpoint(tmp_path, 4) / "optimizer.pt")
    assert ckpt.newest_sound_checkpoint(tmp_path, lambda _: None, set_aside=False) == tmp_path / "checkpoint-2"
    assert (tmp_path / "checkpoint-4").is_dir() and not (tmp_path / "checkpoint-4.damaged").exists()


def test_an_old_sizes_only_manifest_is_still_accepted(tmp_path):
    folder = _tiny_checkpoint(tmp_path, 2)
    _sizes_only(folder)
    assert ckpt.is_complete(folder)
    assert ckpt.newest_sound_checkpoint(tmp_path, pytest.fail) == folder  # nothing to verify, nothing to say
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    assert ckpt.load_training_state(folder, opt, sched)["global_step"] == 2


@pytest.mark.parametrize("text", ["[1]", '{"files": null}', '{"files": [1]}', '{"files": {"w.pt": "7"}}',
                                  '{"files": {"w.pt": 1.5}}', '{"files": {"w.pt": true}}', '{"files": {}}', '"x"',
                                  '{"files": {"w.pt": 1}, "sha256": null}',
                                  '{"files": {"w.pt": 1}, "sha256": {"w.pt": 5}}',
                                  '{"files": {"w.pt": 1}, "sha256": {"other": "ab"}}', "{torn", "\udcff"])
def test_a_malformed_manifest_makes_a_checkpoint_incomplete_never_an_error(tmp_path, text):
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    (folder / "w.pt").write_bytes(b"x")  # 1 byte: `true` and 1.5 must not pass for its size either
    (folder / "manifest.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    assert not ckpt.is_complete(folder)
    assert ckpt.complete_checkpoints(tmp_path) == []
    assert ckpt.newest_sound_checkpoint(tmp_path, pytest.fail) is None


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pt", "trainer_state.json"])
def test_a_damaged_file_the_hashes_cannot_see_is_an_error_naming_it(tmp_path, name):
    """An old sizes-only checkpoint: the damage shows only on loading, and must not be torch's traceback (for
    optimizer.pt it spoke of `weights_only` and the legacy .tar format)."""
    folder = _tiny_checkpoint(tmp_path, 2)
    _sizes_only(folder)
    _damage(folder / name)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    fix = f"mv {folder} {folder}.damaged && tunelab train --resume {tmp_path}"
    with pytest.raises(TunelabError, match=rf"{re.escape(name)} in {re.escape(str(folder))} could not be loaded "
                                           rf"\(.*{re.escape(fix)}"):
        ckpt.load_training_state(folder, opt, sched)


def test_trainer_state_that_is_not_an_object_is_an_error_naming_it(tmp_path):
    folder = _tiny_checkpoint(tmp_path, 2)
    (folder / "trainer_state.json").write_text("[1]")
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(TunelabError, match=r"trainer_state.json in .* could not be loaded \(ValueError: a JSON list"):
        ckpt.load_training_state(folder, opt, sched)


def test_a_failed_save_says_which_checkpoints_are_intact_or_that_there_are_none(tmp_path):
    def full(folder):
        raise OSError(28, "No space left on device")

    with pytest.raises(TunelabError) as first:
        ckpt.save_checkpoint(tmp_path, "checkpoint-2", full)
    assert "intact" not in str(first.value)
    assert "No resumable checkpoint was written before it, so a resume starts the run again from step 0" \
        in str(first.value)
    ckpt.save_checkpoint(tmp_path, "checkpoint-best", lambda d: (d / "w.bin").write_bytes(b"x"))
    with pytest.raises(TunelabError, match=r"again from step 0 \(checkpoint-best intact\); free some space"):
        ckpt.save_checkpoint(tmp_path, "checkpoint-final", full)
    _tiny_checkpoint(tmp_path, 2)
    with pytest.raises(TunelabError, match=r"The earlier checkpoints are intact \(checkpoint-2, checkpoint-best\); "):
        ckpt.save_checkpoint(tmp_path, "checkpoint-4", full)


def test_resume_moves_a_damaged_newest_checkpoint_aside_and_uses_the_one_before(tiny_model_dir, tmp_path,
                                                                              signal_after_step):
    """The audit's case end to end: optimizer.pt of the newest checkpoint damaged at the same size used to stop
    every `--resume` with torch's traceback, on the same checkpoint each time."""
    from tunelab.train.lifecycle import TrainingInterrupted
    from tunelab.train.recipe import train

    write_demo_data(tmp_path / "raw")
    overrides = [f"model.name={tiny_model_dir}", "model.dtype=fp32", f"data.train={tmp_path}/raw/demo_*.json",
                 f"output.dir={tmp_path}/out", "output.run_name=r", "training.batch_size=4",
                 "training.logging_steps=1", "training.learning_rate=5e-3", "eval.metrics=[perplexity]",
                 "tracking.report_to=[none]", "training.save_steps=2", "training.max_steps=6"]
    signal_after_step(4, signal.SIGINT)
    with pytest.raises(TrainingInterrupted):
        train(load_config(None, overrides))
    signal_after_step(None)
    run = tmp_path / "out" / "r"
    assert [s for s, _ in ckpt.complete_checkpoints(run)] == [2, 4]
    _damage(run / "checkpoint-4" / "optimizer.pt")
    train(load_config(None), resume=str(run))
    log = (run / "train.log").read_text()
    assert "warning: checkpoint-4 is damaged: optimizer.pt no longer matches" in log
    assert "moved aside to checkpoint-4.damaged" in log and "Resuming from checkpoint-2 (step 2/6)" in log
    assert json.loads((run / "manifest.json").read_text())["status"] == "finished"
    assert (run / "checkpoint-4.damaged" / "optimizer.pt").is_file()
    assert [s for s, _ in ckpt.complete_checkpoints(run)] == [2, 4], "checkpoint-4 written again, from step 2 on"
    assert ckpt.damaged_file(run / "checkpoint-4") is None
