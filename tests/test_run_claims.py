"""Who owns a run folder, and what is left when the disk or the terminal goes away: one process per folder (its
lock), unique default names, SIGHUP handled as SIGTERM, a full disk reported without a traceback or a leftover
folder, and `--config FILE --resume` judged like the command line's overrides instead of ignored."""

from __future__ import annotations

import errno
import json
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.config import load_config
from tunelab.demo_data import write_demo_data
from tunelab.errors import TunelabError
from tunelab.train.lifecycle import LOCK_NAME, TrainingInterrupted
from tunelab.train.recipe import train


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("raw")
    write_demo_data(folder)
    return str(folder / "demo_*.json")


def _overrides(model, data, out, *extra) -> list[str]:
    return [f"model.name={model}", "model.dtype=fp32", f"data.train={data}", f"output.dir={out}",
            "training.epochs=1", "training.batch_size=4", "training.logging_steps=1", "training.max_steps=4",
            "eval.metrics=[perplexity]", "tracking.report_to=[none]", *extra]


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def _interrupted(signal_after_step, monkeypatch, cfg, signum=signal.SIGINT) -> Path:
    signal_after_step(2, signum)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(cfg)
    monkeypatch.undo()
    return Path(cfg.output.dir) / cfg.output.run_name, str(stopped.value)


@pytest.fixture
def hang_ups_heard():
    """SIGHUP at its default, as in a terminal session (a suite started under `nohup` inherits it ignored, and an
    ignored SIGHUP is left ignored)."""
    before = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGHUP, before)


def test_sighup_stops_a_run_with_a_checkpoint_as_sigterm_does(tiny_model_dir, demo_files, tmp_path, monkeypatch,
                                                               signal_after_step, hang_ups_heard):
    """The terminal or ssh session closing killed the run on the spot: no checkpoint, status left `running`."""
    cfg = load_config(None, _overrides(tiny_model_dir, demo_files, tmp_path, "output.run_name=hup"))
    run, message = _interrupted(signal_after_step, monkeypatch, cfg, signal.SIGHUP)
    assert "stopped by SIGHUP after step 2/4; checkpoint written" in message
    assert _manifest(run)["status"] == "interrupted" and (run / "checkpoint-2").is_dir()
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL  # put back


def test_a_second_process_on_the_run_folder_is_refused_while_the_first_holds_it(tiny_model_dir, demo_files,
                                                                               tmp_path, monkeypatch,
                                                                               signal_after_step):
    """Two `--resume` at once both trained one folder (each removed the other's staging checkpoint, steps logged
    twice): the folder's lock now lets one in. The pid check alone left a gap between check and write."""
    from tunelab.cli.train import train_from_args

    cfg = load_config(None, _overrides(tiny_model_dir, demo_files, tmp_path, "output.run_name=busy"))
    run, _ = _interrupted(signal_after_step, monkeypatch, cfg)
    holder = subprocess.Popen([sys.executable, "-c", "import time; from filelock import FileLock; "
                               f"lock = FileLock({str(run / LOCK_NAME)!r}); lock.acquire(); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = (run / "manifest.json").read_text()
        with pytest.raises(TunelabError, match="being trained right now by another process"):
            train_from_args(None, [f"output.dir={tmp_path}"], resume=str(run))
        assert (run / "manifest.json").read_text() == before  # left to its owner
    finally:
        holder.kill()
        holder.wait()
    train_from_args(None, [f"output.dir={tmp_path}"], resume=str(run))  # the lock died with its process
    assert _manifest(run)["status"] == "finished"


def test_fresh_runs_with_one_default_name_get_their_own_folders(tiny_model_dir, demo_files, tmp_path, monkeypatch):
    """Two runs started in the same second had the same default name: the second was refused (or, racing, shared
    the folder). A given output.run_name is still refused when it holds a run."""
    import tunelab.train.lifecycle as lifecycle

    monkeypatch.setattr(lifecycle, "default_run_name", lambda cfg: "tiny-lora-20261203-101010")
    first = train(load_config(None, _overrides(tiny_model_dir, demo_files, tmp_path, "training.max_steps=1")))
    second = train(load_config(None, _overrides(tiny_model_dir, demo_files, tmp_path, "training.max_steps=1")))
    assert (first.name, second.name) == ("tiny-lora-20261203-101010", "tiny-lora-20261203-101010-2")
    assert _manifest(second)["run_name"] == second.name and _manifest(second)["status"] == "finished"
    with pytest.raises(TunelabError, match="already holds a run"):
        train(load_config(None, _overrides(tiny_model_dir, demo_files, tmp_path, f"output.run_name={first.name}")))


def test_a_full_disk_while_the_run_folder_is_made_leaves_nothing_in_the_way(tiny_model_dir, demo_files, tmp_path,
                                                                            monkeypatch):
    """The folder stayed behind, and the same command after freeing space was refused ("already holds a run")."""
    import tunelab.train.lifecycle as lifecycle

    def full(cfg, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lifecycle, "save_config", full)
    cfg = load_config(None, _overrides(tiny_model_dir, demo_files, tmp_path, "output.run_name=full"))
    with pytest.raises(TunelabError, match="cannot start the run in .*No space left on device"):
        train(cfg)
    assert not (tmp_path / "full").exists()
    (tmp_path / "mine").mkdir()  # an empty folder of the user's: kept, with nothing of the run in it
    with pytest.raises(TunelabError, match="No space left"):
        train(load_config(None, _overrides(tiny_model_dir, demo_files, tmp_path, "output.run_name=mine")))
    assert list((tmp_path / "mine").iterdir()) == []
    monkeypatch.undo()
    assert _manifest(train(cfg))["status"] == "finished"


def test_a_full_disk_at_the_runs_end_keeps_the_runs_own_error(tiny_model_dir, demo_files, tmp_path, monkeypatch,
                                                                capsys):
    """Recording the end on a full disk failed again, and that traceback replaced the run's clear error."""
    import tunelab.train.recipe as recipe
    from tunelab.rundir import RunDir

    real = RunDir.update_manifest

    def full_at_the_end(self, **fields):
        if "ended_at" in fields:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, **fields)

    def refused(*a, **k):
        raise TunelabError("not enough free disk in the run folder for a checkpoint")

    monkeypatch.setattr(RunDir, "update_manifest", full_at_the_end)
    monkeypatch.setattr(recipe.ckpt, "save_checkpoint", refused)
    cfg = load_config(None, _overrides(tiny_model_dir, demo_files, tmp_path, "output.run_name=end"))
    with pytest.raises(TunelabError, match="not enough free disk"):
        train(cfg)
    assert "could not record the run's end (failed)" in capsys.readouterr().err


def test_a_full_disk_outside_training_is_one_line_not_a_traceback(monkeypatch, capsys, tmp_path):
    """An OSError without a file name (write/flush on a full disk) came out as a traceback."""
    import tunelab.cli.validate as validate
    from tunelab.cli import main

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(validate, "run", full)
    assert main(["validate", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: No space left on device\n") and "the disk is full" in err


def test_a_config_file_given_on_resume_is_applied_or_refused_not_ignored(tiny_model_dir, demo_files, tmp_path,
                                                                         monkeypatch, signal_after_step):
    """`--config other.yaml --resume` dropped the file's learning rate without a word and recorded other.yaml as
    the run's config. Now a difference that changes training is refused naming the file, a safe one is applied,
    and the manifest keeps the file the run was started from."""
    from tunelab.cli.train import train_from_args

    cfg = load_config(None, _overrides(tiny_model_dir, demo_files, tmp_path, "output.run_name=cf"))
    run, _ = _interrupted(signal_after_step, monkeypatch, cfg)
    (tmp_path / "other.yaml").write_text("training: {learning_rate: 0.5, eval_steps: 1}\n")
    args = ["model.dtype=fp32", f"model.name={tiny_model_dir}", f"data.train={demo_files}", f"output.dir={tmp_path}",
            "training.epochs=1", "training.batch_size=4", "training.logging_steps=1", "training.max_steps=4",
            "eval.metrics=[perplexity]", "tracking.report_to=[none]"]
    with pytest.raises(TunelabError, match=r"--config .*other.yaml: the file would change what the run trains "
                                           r"\(training.learning_rate: 0.5 there, 0.0002 in the run\)"):
        train_from_args(str(tmp_path / "other.yaml"), args, resume=str(run))
    (tmp_path / "other.yaml").write_text("training: {eval_steps: 1}\n")
    train_from_args(str(tmp_path / "other.yaml"), args, resume=str(run))
    assert load_config(run / "config.yaml").training.eval_steps == 1
    assert "Eval @ step 3" in (run / "train.log").read_text()
    assert _manifest(run)["status"] == "finished" and _manifest(run).get("config_path") is None


def test_resume_followed_by_an_override_reads_it_as_one(monkeypatch):
    """`--resume training.eval_steps=5` took the override for the run folder ("not a tunelab run folder")."""
    import tunelab.cli.train as cli_train
    from tunelab.cli import build_parser

    seen = {}
    monkeypatch.setattr(cli_train, "train_from_args", lambda config, overrides, resume: seen.update(
        overrides=overrides, resume=resume) or 0)
    args = build_parser().parse_args(["train", "--resume", "training.eval_steps=5", "lora.r=4"])
    assert cli_train.run(args) == 0 and seen == {"overrides": ["training.eval_steps=5", "lora.r=4"],
                                                 "resume": "latest"}


def test_the_resume_hint_can_be_pasted_into_a_shell(tmp_path):
    """The printed `tunelab train --resume PATH` broke on a path with a space."""
    from tunelab.rundir import resume_command

    run = tmp_path / "my runs" / "it's"
    assert shlex.split(resume_command(run)) == ["tunelab", "train", "--resume", str(run)]


def test_a_hang_up_stops_any_verb_as_sigterm_does(monkeypatch, capsys, tmp_path, hang_ups_heard):
    """SIGHUP killed a verb without its cleanup (a merge's staging copy stayed); now it takes the verb's SIGTERM
    path: here the CLI's own (interrupted, 130), in a server uvicorn's graceful shutdown, in training a checkpoint."""
    import os
    import time

    import tunelab.cli.validate as validate
    from tunelab.cli import main

    def hung_up(args):
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(10)  # the handler interrupts this

    monkeypatch.setattr(validate, "run", hung_up)
    assert main(["validate", str(tmp_path / "x.json")]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # started with nohup: hang-ups stay ignored
    monkeypatch.setattr(validate, "run", lambda args: os.kill(os.getpid(), signal.SIGHUP) or 0)
    assert main(["validate", str(tmp_path / "x.json")]) == 0
