"""The config front door off the happy path: odd YAML, odd overrides, settings that cannot work together.
No model is loaded; every test reads configs only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tunelab.config import ConfigError, load_config, load_run_config

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_key_given_twice_in_a_file_is_refused_naming_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys without a word: `epochs: 1 ... epochs: 5` trained 5 epochs, and a
    second `training:` section dropped everything the first one set."""
    path = _write(tmp_path, "training:\n  epochs: 1\n  batch_size: 2\n  epochs: 5\nlora:\n  r: 8\n"
                            "training:\n  learning_rate: 1e-4\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "2 problems in " in msg
    assert "training.epochs: given twice (lines 2 and 4); keep one" in msg
    assert "training: given twice (lines 1 and 7); keep one" in msg


def test_a_merge_key_may_be_set_again_and_anchors_load(tmp_path):
    """A key a `<<:` merge brings in may be set again beside it (that is what merge keys are for)."""
    path = _write(tmp_path, "lora: &l {r: 8, alpha: 16}\ntraining:\n  epochs: 1\n"
                            "eval: {<<: {max_samples: 4, batch_size: 2}, batch_size: 1}\n")
    cfg = load_config(path)
    assert (cfg.eval.max_samples, cfg.eval.batch_size, cfg.lora.r) == (4, 1, 8)


def test_a_yaml_syntax_error_names_the_file_line_and_tabs(tmp_path):
    """The message said `in "<unicode string>", line 2` and PyYAML's scanner words for a tab indentation."""
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, "training:\n\tepochs: 1\n"))
    msg = str(e.value)
    assert "<unicode string>" not in msg and "c.yaml is not valid YAML, line 2, column 1" in msg
    assert "indent with spaces" in msg
    with pytest.raises(ConfigError, match=r"line 3, column 1: .*from line 2\)$"):
        load_config(_write(tmp_path, "training:\n  epochs: [1\n"))
    assert load_config(_write(tmp_path, "# only a comment\n")).training.epochs == 3  # the defaults


@pytest.mark.parametrize("key,text,says", [
    ("lora.target_modules", "q_proj", "write [q_proj] or all-linear"),
    ("lora.target_modules", "q_proj,v_proj", "write [q_proj, v_proj] or all-linear"),
    ("eval.metrics", "bleu", "write [bleu]"),
    ("tracking.report_to", "none", "write [none]"),
])
def test_a_list_setting_given_one_word_says_how_to_write_the_list(tmp_path, key, text, says):
    """`target_modules: q_proj` gave two problems about `lora.target_modules.list[str]` and
    `literal['all-linear']`, without a line; `metrics: bleu` said only 'Input should be a valid list'."""
    section, name = key.split(".")
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, f"{section}:\n  {name}: {text}\n"))
    msg = str(e.value)
    assert msg.startswith("1 problem in ") and f"{key}: a list is due here: {says}" in msg and ", line 2)" in msg
    with pytest.raises(ConfigError, match=f"{key}: a list is due here: {says.replace('[', '.').replace(']', '.')}"):
        load_config(None, [f"{key}={text}"])
    assert load_config(None, ["lora.target_modules=all-linear"]).lora.target_modules == "all-linear"


def test_home_and_environment_variables_in_paths_are_expanded(tmp_path, monkeypatch):
    """`output.dir: ~/runs` made a folder named `~` in the working folder, `$RUNS/x` one named `$RUNS`."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TUNELAB_TEST_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("TUNELAB_TEST_UNSET", raising=False)
    cfg = load_config(_write(tmp_path, "data:\n  train: ~/d.jsonl\n  eval: ${TUNELAB_TEST_DATA}/e.jsonl\n"
                                       "output:\n  dir: $TUNELAB_TEST_DATA/runs\n"))
    assert cfg.data.train == str(tmp_path / "home" / "d.jsonl")
    assert cfg.data.eval == str(tmp_path / "data" / "e.jsonl")
    assert cfg.output.dir == str(tmp_path / "data" / "runs")
    adapter = load_config(None, ["training.stage=dpo", "model.adapter=~/runs/sft"]).model.adapter
    assert adapter == str(tmp_path / "home" / "runs" / "sft")
    with pytest.raises(ConfigError, match=r"output.dir: the environment variable TUNELAB_TEST_UNSET in "
                                          r"'\$TUNELAB_TEST_UNSET/runs' is not set"):
        load_config(None, ["output.dir=$TUNELAB_TEST_UNSET/runs"])
    assert load_config(None, ["output.dir=runs"]).output.dir == "runs"  # a relative path stays relative


def test_step_counts_that_cannot_work_are_refused_with_the_fix(tmp_path):
    """max_steps: -5 trained training.epochs passes without a word; early_stopping_patience with eval_steps 0
    never stopped a run (the only evaluation is the final one)."""
    with pytest.raises(ConfigError, match=r"training.max_steps: give a number of optimiser steps \(at least 1\), "
                                          r"or -1"):
        load_config(None, ["training.max_steps=-5"])
    with pytest.raises(ConfigError, match="would never stop a run. Set training.eval_steps too"):
        load_config(None, ["training.early_stopping_patience=3"])
    assert load_config(None, ["training.early_stopping_patience=3", "training.eval_steps=10"]) \
        .training.early_stopping_patience == 3
    assert load_config(None, ["training.max_steps=0"]).training.max_steps == 0  # as -1: epochs decide
    # a run an older tunelab trained so keeps loading (resume, reproduce), with the behaviour it had
    saved = _write(tmp_path, "training:\n  early_stopping_patience: 3\n")
    assert load_run_config(saved).training.early_stopping_patience == 0


def test_text_settings_keep_the_override_as_typed():
    """YAML read `model.revision=0123456` as the octal number 42798 and `data.system_prompt=yes` as true, and
    both were then refused as 'not a valid string'."""
    cfg = load_config(None, ["model.revision=0123456", "data.system_prompt=yes", "output.run_name=2024-01-01",
                             "data.train=1e5"])
    assert (cfg.model.revision, cfg.data.system_prompt) == ("0123456", "yes")
    assert (cfg.output.run_name, cfg.data.train) == ("2024-01-01", "1e5")
    assert load_config(None, ["model.revision=null"]).model.revision is None  # null still clears it
    assert load_config(None, ["training.epochs=2"]).training.epochs == 2.0  # numbers stay numbers


@pytest.mark.parametrize("override,says", [
    ("training.epochs.x=3", "training.epochs.x: training.epochs is a setting, not a section"),
    ("=3", "'=3': the key is empty or has an empty part"),
    ("training.=3", "'training.=3': the key is empty or has an empty part"),
    (".epochs=3", "'.epochs=3': the key is empty or has an empty part"),
])
def test_override_keys_that_name_nothing_are_told_so(override, says):
    """These were reported as 'training.epochs: Input should be a valid number' (no override named) or
    ': unknown key'."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert says in str(e.value)


def test_a_key_given_twice_on_the_command_line_is_named_in_a_warning(tmp_path, monkeypatch, capsys):
    """`tunelab train training.epochs=1 ... training.epochs=3` trained 3 epochs without a word. The last one still
    applies (a script adding to a base command relies on it), and the command line says so."""
    from tunelab.cli import main
    from tunelab.cli import train as train_cli

    calls = []
    monkeypatch.setattr(train_cli, "train_from_args", lambda *a: calls.append(a) or 0)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "training.epochs=1", "lora.r=8", "training.epochs=3"]) == 0
    assert "warning: training.epochs is given 2 times on the command line (training.epochs=1, training.epochs=3): " \
           "the last one applies" in capsys.readouterr().err
    assert calls[0][1] == ["training.epochs=1", "lora.r=8", "training.epochs=3"]
    assert main(["train", "training.epochs=1", "lora.r=8"]) == 0 and "warning" not in capsys.readouterr().err


def test_a_repeated_key_is_reported_with_every_other_problem_of_the_file(tmp_path):
    """The repeated keys came alone, and the file's other problems only after they were fixed."""
    path = _write(tmp_path, "training:\n  epochs: 1\n  epochs: 2\n  batch_sise: 4\nlora:\n  r: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith("3 problems in ") and "training.epochs: given twice (lines 2 and 3)" in msg
    assert "training.batch_sise: unknown key" in msg and "lora.r: " in msg and "line 6" in msg


def test_a_malformed_override_is_reported_with_the_file_s_problems(tmp_path):
    """An override without `=` stopped at 'bad command-line override' and hid the file's own problems."""
    path = _write(tmp_path, "lora:\n  alpah: 16\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["training.epochs", "training.batch_size=0"])
    msg = str(e.value)
    assert msg.startswith("3 problems in ") and "'training.epochs': overrides look like section.key=value" in msg
    assert "lora.alpah: unknown key" in msg and "line 2" in msg and "did you mean lora.alpha?" in msg
    assert "training.batch_size: " in msg and "(command-line override training.batch_size=0)" in msg


def test_text_settings_in_a_file_keep_the_text_as_written(tmp_path):
    """`revision: 0123456` was refused as 'not a valid string (got 42798)', YAML's octal reading, and
    `system_prompt: no` as the boolean false; numbers and quoted text are unchanged."""
    cfg = load_config(_write(tmp_path, "model:\n  revision: 0123456\ndata:\n  system_prompt: no\n"
                                       "output:\n  run_name: 2024-01-01\ntraining:\n  epochs: 2\n  packing: no\n"
                                       "lora:\n  r: 8\n"))
    assert (cfg.model.revision, cfg.data.system_prompt, cfg.output.run_name) == ("0123456", "no", "2024-01-01")
    assert (cfg.training.epochs, cfg.training.packing, cfg.lora.r) == (2, False, 8)
    assert load_config(_write(tmp_path, "model:\n  revision: null\n")).model.revision is None


def test_a_config_path_with_a_home_tilde_is_found(tmp_path, monkeypatch):
    """`--config "~/c.yaml"` (quoted, so the shell left the ~) was 'config file not found: ~/c.yaml'."""
    monkeypatch.setenv("HOME", str(tmp_path))
    _write(tmp_path, "training:\n  epochs: 2\n")
    assert load_config("~/c.yaml").training.epochs == 2


def test_misspelt_and_flattened_sections_are_told_what_was_meant(tmp_path):
    """`trainig:` got 'did you mean training.seed?', `grad_accum` 'training.max_grad_norm?', `model: Qwen/...`
    pydantic's 'valid dictionary or instance of ModelConfig', and a `training:` whose keys were all commented out
    was refused as None."""
    path = _write(tmp_path, "Trainig:\n  epochs: 1\nmodel: Qwen/Qwen2.5-1.5B-Instruct\nlora:\n  grad_accum: 4\n"
                            "  max_seq_length: 8\n")
    msg = str(pytest.raises(ConfigError, load_config, path).value)
    assert "Trainig: unknown key" in msg and "(did you mean training?)" in msg
    assert "model: a section is due here, with its settings under it (e.g. model: {name: ...})" in msg
    assert "lora.grad_accum: unknown key" in msg and "(did you mean training.gradient_accumulation_steps?)" in msg
    assert "(did you mean data.max_length?)" in msg
    cfg = load_config(_write(tmp_path, "training:\n  # epochs: 1\nlora:\n  r: 8\n"))
    assert cfg.training.epochs == 3 and cfg.lora.r == 8


@pytest.mark.parametrize("name,content", [
    ("d.json", '[{"instruction": "a", "output": "b"}]'),
    ("d.jsonl", '{"instruction": "a", "output": "b"}\n'),  # alpaca's `output` is no section
    ("d2.jsonl", '{"a": 1}\n{"b": 2}\n'),
    ("d.csv", "instruction,output\na,b\n"),
])
def test_a_dataset_given_as_the_config_is_told_so(tmp_path, name, content):
    """`tunelab train --config data.jsonl` reported 'output: Input should be a valid dictionary', 'instruction:
    unknown key', 'top level must be a mapping' or a YAML parse error, never that a dataset was given."""
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError, match=f"looks like a dataset, not a config .*give the data as "
                                          f"data.train={re.escape(str(path))}"):
        load_config(path)


def test_a_config_written_as_json_still_loads(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"training": {"epochs": 2}, "output": {"dir": "runs"}}')
    assert load_config(path).training.epochs == 2


def test_every_problem_has_its_line_in_flow_style_merges_and_lists_too(tmp_path):
    """Lines were found by scanning the text: none for flow style (`training: {epochs: many}`), none for a list
    item, none for a check across settings; a list with a bad item also got 'should be all-linear'."""
    path = _write(tmp_path, "lora: {r: 8}\ntraining: {epochs: many, batch_sise: 2}\nx: &b {max_samples: 0}\n"
                            "eval:\n  <<: *b\n  metrics:\n    - bleu\n    - bleurt\n")
    msg = str(pytest.raises(ConfigError, load_config, path).value)
    assert "training.epochs: Input should be a valid number" in msg and "(got 'many') (" in msg
    assert f"{path}, line 2)" in msg and "training.batch_sise: unknown key (" in msg
    assert f"eval.max_samples: Input should be greater than or equal to 1 (got 0) ({path}, line 3)" in msg
    assert "eval.metrics.1: Input should be" in msg and f"(got 'bleurt') ({path}, line 8)" in msg
    modules = _write(tmp_path, "lora:\n  target_modules:\n    - q_proj\n    - 3\n")
    msg = str(pytest.raises(ConfigError, load_config, modules).value)
    assert msg.startswith("1 problem") and f"lora.target_modules.1: Input should be a valid string (got 3) " \
                                           f"({modules}, line 4)" in msg
    both = _write(tmp_path, "training:\n  packing: true\n  group_by_length: true\n")
    msg = str(pytest.raises(ConfigError, load_config, both).value)
    assert "exclude each other" in msg and f"({both}, line 2)" in msg


def test_settings_this_run_does_not_read_are_named_in_a_warning(tmp_path, monkeypatch, capsys):
    """quantization.* under method lora, lora.* under full, preference.* for sft, data.val_ratio beside data.eval
    and training.batch_size under batch_tokens were accepted and did nothing, without a word."""
    from tunelab.cli import main
    from tunelab.config import ignored_settings
    from tunelab.train import recipe

    assert ignored_settings(load_config(str(REPO / "config.yaml"))) == []  # the brief's config: every key is read
    cfg = load_config(None, ["training.method=full", "lora.r=8", "lora.alpha=4", "quantization.quant_type=fp4",
                             "preference.beta=0.3", "data.eval=e.jsonl", "data.val_ratio=0.2",
                             "training.batch_tokens=1024", "training.batch_size=8"])
    assert ignored_settings(cfg) == [
        "quantization.quant_type is not used by this run (training.method is full: only qlora quantises the base "
        "model)",
        "lora.r, lora.alpha are not used by this run (training.method is full: it trains every weight, no adapter)",
        "preference.beta is not used by this run (training.stage is sft: preference settings are read by dpo, orpo, "
        "simpo and kto)",
        "data.val_ratio is not used by this run (data.eval is the validation set)",
        "training.batch_size is not used by this run (training.batch_tokens sets what a micro-batch holds)"]
    assert ignored_settings(load_config(None, ["training.stage=dpo", "preference.beta=0.3", "lora.r=8"])) == []
    monkeypatch.setattr(recipe, "train", lambda cfg, config_path=None: None)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "training.method=full", "lora.r=8"]) == 0
    assert "warning: lora.r is not used by this run (training.method is full" in capsys.readouterr().err


def test_an_old_run_s_patience_is_kept_when_the_resume_sets_eval_steps(tmp_path):
    """A run saved with early_stopping_patience and eval_steps 0 reads back with patience off (it never stopped the
    run); resuming it with training.eval_steps=50 kept patience 0 without a word: the override now decides."""
    saved = tmp_path / "config.yaml"
    saved.write_text("training: {early_stopping_patience: 3, eval_steps: 0}\n")
    assert load_run_config(saved).training.early_stopping_patience == 0
    t = load_run_config(saved, ["training.eval_steps=50"]).training
    assert (t.eval_steps, t.early_stopping_patience) == (50, 3)


def test_a_dollar_in_a_run_s_saved_path_is_part_of_the_name(tmp_path, monkeypatch):
    """A run's config.yaml holds its paths as used: `$` there was expanded (or refused as an unset variable), so
    resume and reproduce of such a run failed; a config the user writes still expands it."""
    monkeypatch.delenv("TUNELAB_NO_SUCH_VAR", raising=False)
    saved = tmp_path / "config.yaml"
    saved.write_text(f"data: {{train: {tmp_path}/$TUNELAB_NO_SUCH_VAR/d.jsonl}}\noutput: {{dir: {tmp_path}/a$b}}\n")
    cfg = load_run_config(saved)
    assert cfg.data.train == f"{tmp_path}/$TUNELAB_NO_SUCH_VAR/d.jsonl" and cfg.output.dir == f"{tmp_path}/a$b"
    with pytest.raises(ConfigError, match="TUNELAB_NO_SUCH_VAR in .* is not set"):
        load_config(saved)


def test_a_json_config_s_typo_keeps_its_line_and_an_empty_one_is_the_defaults(tmp_path):
    """Every read or parse error of a .json config was told 'looks like a dataset' (line and column lost), and `{}`
    (the defaults, as an empty YAML file) was refused as a dataset."""
    broken = tmp_path / "c.json"
    broken.write_text('{"training": {"epochs": 1}\n')
    with pytest.raises(ConfigError, match=r"is not valid YAML, line \d+, column \d+") as e:
        load_config(broken)
    assert "dataset" not in str(e.value)
    empty = tmp_path / "e.json"
    empty.write_text("{}\n")
    assert load_config(empty).training.epochs == load_config(None).training.epochs
