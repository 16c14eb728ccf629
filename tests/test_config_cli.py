"""The config schema (typos, every problem at once, overrides, the generated reference) and the CLI surface."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunelab.config import ConfigError, load_config, markdown_reference
from tunelab.cli import VERBS

REPO = Path(__file__).resolve().parents[1]


def test_brief_keys_and_defaults():
    cfg = load_config(REPO / "config.yaml")
    assert cfg.model.name == "bundled:smollm2-135m-instruct"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.05)
    assert (cfg.training.epochs, cfg.training.batch_size) == (3, 4)


def test_typo_gets_path_line_and_hint(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  name: x\nlora:\n  r: 8\n  alpah: 16\ntraining:\n  epoch: 2\n  batch_size: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert "3 problems" in msg  # every problem at once
    assert "lora.alpah: unknown key" in msg and "line 5" in msg and "did you mean lora.alpha?" in msg
    assert "training.epoch: unknown key" in msg and "did you mean training.epochs?" in msg
    assert "training.batch_size" in msg and "'many'" in msg


def test_an_unknown_override_is_named_as_given_with_every_key_it_may_mean(tmp_path):
    """`learning_rate=1e-4` on the command line was reported at 'line 17' of the file (the nested
    training.learning_rate), the brief's `batch_size` got 'did you mean eval.batch_size?', and other tools' names
    (lr, lora_alpha) got unrelated keys."""
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  name: x\ntraining:\n  batch_size: 4\n  learning_rate: 2e-4\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, ["learning_rate=1e-4", "batch_size=2", "training.lr=3", "lora_alpha=8"])
    msg = str(e.value)
    assert ", line " not in msg
    assert "learning_rate: unknown key (command-line override learning_rate=1e-4) (did you mean " \
           "training.learning_rate?)" in msg
    assert "(did you mean training.batch_size or eval.batch_size?)" in msg
    assert "training.lr: unknown key (command-line override training.lr=3) (did you mean training.learning_rate?)" \
        in msg
    assert "lora_alpha: unknown key (command-line override lora_alpha=8) (did you mean lora.alpha?)" in msg
    f.write_text("training:\n  learning_rate: 2e-4\nlearning_rate: 1e-4\n")  # the top-level key, not the nested
    with pytest.raises(ConfigError, match=r"learning_rate: unknown key \(.*c\.yaml, line 3\)"):
        load_config(f)


def test_dotted_overrides_and_scientific_notation():
    cfg = load_config(REPO / "config.yaml", ["training.epochs=1", "lora.r=8", "training.learning_rate=2e-4",
                                             "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.training.epochs == 1 and cfg.lora.r == 8 and cfg.training.learning_rate == 2e-4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="did you mean training.max_steps"):
        load_config(None, ["training.max_step=3"])


def test_override_values_are_kept_whole_and_numbers_are_numbers(tmp_path):
    """An override value is YAML, except where YAML would cut it (a comment after ` #`) or cannot read it; a number
    is never a boolean (YAML reads yes/no as those) nor infinite; a config that is not UTF-8 says where."""
    cfg = load_config(None, ["data.system_prompt=Reply with #1 only", "model.chat_template={{ x }}"])
    assert cfg.data.system_prompt == "Reply with #1 only" and cfg.model.chat_template == "{{ x }}"
    for text in ("[be brief", "#1", "a#b"):
        assert load_config(None, [f"data.system_prompt={text}"]).data.system_prompt == text
    for bad, says in (("training.max_steps=yes", "not the boolean true"), ("training.epochs=.inf", "finite"),
                      ("training.learning_rate=nan", "finite")):
        with pytest.raises(ConfigError, match=says):
            load_config(None, [bad])
    (tmp_path / "c.yaml").write_bytes(b"training:\n  epochs: 1 # caf\xe9\n")
    with pytest.raises(ConfigError, match=r"c.yaml is not UTF-8 text \(line 2, byte 27\)"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("argv,says", [
    (["infer", "--model", "m", "--batch-size", "0"], "--batch-size: '0' is not a whole number of at least 1"),
    (["infer", "--model", "m", "--top-p", "0"], "--top-p: '0' is not a number above 0 and at most 1"),
    (["infer", "--model", "m", "--temperature", "-1"], "--temperature: '-1' is not a number of at least 0"),
    (["infer", "--model", "m", "--max-new-tokens", "0"], "--max-new-tokens: '0' is not a whole number"),
    (["eval", "--max-samples", "-1"], "--max-samples: '-1' is not a whole number of at least 1"),
    (["eval", "--batch-size", "0"], "--batch-size: '0' is not a whole number"),
    (["serve", "--port", "99999"], "--port: '99999' is not a port number (0-65535)"),
])
def test_option_values_that_cannot_work_are_usage_errors(argv, says, capsys):
    """They used to hang (infer --batch-size 0), crash deep inside (top_p 0, port 99999), or be replaced by the
    defaults without a word (eval's 0s), or decode greedily when asked for temperature -1."""
    from tunelab.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", ".", "a\\b"])
def test_a_run_name_is_a_plain_folder_name(name, tmp_path):
    """`output.run_name: ../../escape` trained into a folder outside output.dir (unseen by runs list and the UI)."""
    with pytest.raises(ConfigError, match="is not a plain folder name"):
        load_config(None, [f"output.run_name={name}"])
    assert load_config(None, ["output.run_name=my-run_2.b"]).output.run_name == "my-run_2.b"


@pytest.mark.parametrize("overrides,says", [
    (["training.stage=kto", "training.batch_size=1"], "training.stage=kto needs training.batch_size of at least 2"),
    (["training.stage=kto", "preference.precompute_ref_logps=true"], "read by training.stage=dpo only, not kto"),
    (["training.stage=simpo", "preference.precompute_ref_logps=true"], "read by training.stage=dpo only, not simpo"),
    (["training.stage=dpo", "data.format=alpaca"], "data.format alpaca applies to sft conversations"),
    (["training.stage=pt", "model.adapter=outputs/sft"], "not by training.stage=pt"),  # was ignored without a word
    (["model.adapter=outputs/sft"], "not by training.stage=sft"),
])
def test_preference_settings_that_cannot_work_are_refused(overrides, says):
    """kto at batch 1 trained with a KL estimate equal to the example's own reward; precompute was refused for kto
    only after the model had loaded, and silently ignored by orpo and simpo."""
    with pytest.raises(ConfigError, match=says):
        load_config(None, overrides)
    load_config(None, ["training.stage=kto", "training.batch_size=2"])


def test_a_saved_run_config_an_older_tunelab_accepted_still_loads_with_the_behaviour_it_had(tmp_path):
    """Resume and reproduce read a run's config.yaml: today's stricter checks must not lock older runs out where the
    setting did nothing (precompute outside dpo, data.format outside sft) or names the same folder (run_name)."""
    from tunelab.config import load_run_config

    saved = tmp_path / "config.yaml"
    saved.write_text("training: {stage: simpo}\npreference: {precompute_ref_logps: true}\ndata: {format: alpaca}\n"
                     "output: {dir: runs, run_name: grp/r1}\n")
    cfg = load_run_config(saved)
    assert not cfg.preference.precompute_ref_logps and cfg.data.format == "auto"
    assert Path(cfg.output.dir) / cfg.output.run_name == Path("runs/grp/r1") and cfg.output.run_name == "r1"
    with pytest.raises(ConfigError, match="not a plain folder name"):  # a new config is held to the rules
        load_config(saved)


def test_config_reference_is_current():
    assert (REPO / "docs" / "config.md").read_text() == markdown_reference() + "\n", \
        "regenerate: python -m tunelab.config --markdown > docs/config.md"


def test_help_is_fast_and_lists_every_verb():
    code = "import sys, time; t=time.time(); from tunelab.cli import main; main(['--help'])"
    t = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and all(v in out.stdout for v in VERBS)
    heavy = subprocess.run([sys.executable, "-c", "import sys; from tunelab.cli import build_parser; build_parser();"
                            "print(','.join(m for m in ('torch', 'transformers', 'peft', 'pandas') if m in sys.modules))"],
                           capture_output=True, text=True)
    assert heavy.stdout.strip() == "", f"heavy imports on the --help path: {heavy.stdout}"
    assert time.time() - t < 20  # generous: the real guard is the import check above


@pytest.mark.parametrize("verb", list(VERBS))
def test_each_verb_help(verb):
    out = subprocess.run([sys.executable, "-m", "tunelab", verb, "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "usage: tunelab" in out.stdout


def test_unreachable_hub_id_is_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = subprocess.run([sys.executable, "-m", "tunelab", "train", "model.name=SomeOrg/not-a-model-xyz",
                          "data.train=nothing.json", f"output.dir={tmp_path / 'outputs'}"],
                         capture_output=True, text=True, env=None, cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "bundled:smollm2-135m-instruct" in out.stderr
    assert not any((tmp_path / "outputs").iterdir()), "a run that failed before training leaves no folder"


def test_allocator_reexec_only_for_training_verbs_from_a_command_line(monkeypatch):
    from tunelab import runtime

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("TUNELAB_ALLOCATOR", raising=False)
    monkeypatch.setattr(sys, "argv", ["/usr/bin/tunelab", "train"])
    glibc = sys.platform.startswith("linux") and __import__("platform").libc_ver()[0] == "glibc"
    assert runtime.wants_allocator_reexec("train") is glibc
    assert not runtime.wants_allocator_reexec("prepare") and not runtime.wants_allocator_reexec(None)
    monkeypatch.setenv("TUNELAB_ALLOCATOR", "system")
    assert not runtime.wants_allocator_reexec("train")
    monkeypatch.delenv("TUNELAB_ALLOCATOR")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=3")  # the user's own choice wins
    assert not runtime.wants_allocator_reexec("train")
    assert runtime.allocator_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == \
        "glibc.malloc.arena_max=2:glibc.malloc.tcache_count=0"
    monkeypatch.setattr(sys, "argv", ["-c"])  # `python -c`, `python -` or a REPL calling main(): never
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert not runtime.wants_allocator_reexec("train")


def test_allocator_reexec_keeps_the_command_line_and_runs_once(monkeypatch):
    from tunelab import runtime

    if not (sys.platform.startswith("linux") and __import__("platform").libc_ver()[0] == "glibc"):
        pytest.skip("glibc only")
    for var in ("GLIBC_TUNABLES", "TUNELAB_ALLOCATOR", "TUNELAB_REEXECUTED"):
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(runtime.os, "execve", lambda exe, argv, env: calls.append((exe, argv, env)))
    monkeypatch.setattr(sys, "argv", ["/x/bin/tunelab", "train", "--config", "c.yaml"])
    monkeypatch.setattr(sys, "orig_argv", ["/usr/bin/python3", "/x/bin/tunelab", "train", "--config", "c.yaml"])
    runtime.reexec_with_allocator_settings("train")
    (exe, argv, env), = calls
    assert exe == sys.executable and argv == [sys.executable, "/x/bin/tunelab", "train", "--config", "c.yaml"]
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=0" and env["TUNELAB_REEXECUTED"] == "1"
    monkeypatch.setenv("TUNELAB_REEXECUTED", "1")  # already restarted: never again
    runtime.reexec_with_allocator_settings("train")
    assert len(calls) == 1
    monkeypatch.delenv("TUNELAB_REEXECUTED")
    monkeypatch.setattr(sys, "argv", ["/home/me/my_script.py"])  # someone's script calling main(): left alone
    runtime.reexec_with_allocator_settings("train")
    assert len(calls) == 1


def test_a_config_that_is_not_a_regular_file_is_not_called_missing(tmp_path):
    with pytest.raises(ConfigError, match=r"^config /dev/null is not a regular file \(a folder, device or pipe\)"):
        load_config("/dev/null")  # it exists: "config file not found" was wrong
    with pytest.raises(ConfigError, match=r"^config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_runs_list_tells_a_missing_or_file_dir_from_an_empty_one(tmp_path, capsys):
    """`runs list --dir outptus` (a typo) and `--dir some.json` both said 'no runs in ...' and exited 0."""
    from tunelab.cli import main

    (tmp_path / "a.json").write_text("{}")
    assert main(["runs", "list", "--dir", str(tmp_path / "a.json")]) == 2
    assert "a.json is a file: give the folder that holds the runs" in capsys.readouterr().err
    assert main(["runs", "list", "--dir", str(tmp_path / "outptus")]) == 0
    assert "(no such folder: runs go to output.dir" in capsys.readouterr().out
    assert main(["runs", "list", "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"no runs in {tmp_path}"


def test_prepare_refuses_options_that_contradict_each_other(tmp_path, capsys):
    """`--eval-file F --val-ratio 0.3` dropped --val-ratio without a word; `--show-samples -1` was taken as 0."""
    from tunelab.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    args = ["prepare", "-i", str(data), "--no-tokenizer", "--check"]
    assert main([*args, "--eval-file", str(data), "--val-ratio", "0.3"]) == 2
    assert "--val-ratio and --eval-file exclude each other" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([*args, "--show-samples", "-1"])
    assert e.value.code == 2 and "--show-samples: '-1' is not a whole number of at least 0" in capsys.readouterr().err
    assert main([*args, "--val-ratio", "0.5"]) == 0 and "val_ratio=0.5" in capsys.readouterr().out
    assert main(args) == 0 and "val_ratio=0.1" in capsys.readouterr().out  # the default


def test_merge_refuses_a_tolerance_for_a_verification_it_skips(tmp_path, capsys):
    """`--no-verify --tolerance 0.5` merged without checking anything, the tolerance dropped without a word."""
    from tunelab.cli import main

    assert main(["merge", "--adapter", str(tmp_path / "run"), "--output", str(tmp_path / "m"), "--no-verify",
                 "--tolerance", "0.5"]) == 2
    assert "--tolerance is the bound of the verification that --no-verify skips" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("argv,says", [
    (["train", "--training.epochs=1"], "--training.epochs=1 (config settings go without dashes: training.epochs=1)"),
    (["train", "--lr", "1e-4"], "--lr (config settings go without dashes: training.learning_rate=...)"),
    (["sweep", "--grid", "lora.r=8", "--lora_r=4"], "--lora_r=4 (config settings go without dashes: lora.r=4)"),
    (["eval", "--epochs", "1"], "unrecognized arguments: --epochs 1\n"),  # eval takes no config overrides
    (["train", "--output_dir=x"], "--output_dir=x (config settings go without dashes: output.dir=x)"),
    (["train", "--training"], "unrecognized arguments: --training\n"),  # a section is no setting
])
def test_a_config_setting_written_as_a_flag_is_shown_as_an_override(argv, says, capsys):
    """`tunelab train --training.epochs=1` (as other tools' command lines take it) said only 'unrecognized
    arguments'."""
    from tunelab.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize("local_rank,num_processes,says", [(None, 1, True), ("0", 1, True), ("1", 1, False),
                                                            (None, 2, False)])  # the launcher: its rank 0 says it
def test_a_repeated_override_is_told_once_under_a_launcher_too(local_rank, num_processes, says, monkeypatch, capsys):
    """Under `torchrun tunelab train` / `accelerate launch` every process has LOCAL_RANK, so nobody said it."""
    import argparse

    from tunelab.cli import train as cli_train

    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(cli_train, "train_from_args", lambda *a: 0)
    monkeypatch.setattr(cli_train, "_launch", lambda args: 0)
    args = argparse.Namespace(config=None, overrides=["training.epochs=1", "training.epochs=2"], resume=None,
                              num_processes=num_processes)
    assert cli_train.run(args) == 0
    assert ("training.epochs" in capsys.readouterr().err) == says
