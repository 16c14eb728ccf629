"""Reproduce (same curves on CPU, refuses changed data) and sweeps (grid, ranking, resume after interruption).

The fast tests drive the sweep and reproduce logic with a stand-in trainer that writes run folders as the recipe
does; the end-to-end tests train the tiny 2-layer model for a few steps with the real recipe.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tunelab.reproduce import ReproduceError, check_reproducible, loss_curve_diff
from tunelab.sweep import SweepError, combinations, parse_grid, run_sweep


def fake_train(calls: list, interrupt_on: str | None = None):
    """Writes a completed run whose eval_loss depends on lora.r and the learning rate."""

    def train(cfg, resume=None):
        from tunelab.config import save_config

        run = Path(cfg.output.dir) / cfg.output.run_name
        calls.append((cfg.output.run_name, resume))
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.yaml")
        if cfg.output.run_name == interrupt_on:
            (run / "manifest.json").write_text(json.dumps({"status": "interrupted"}))
            raise KeyboardInterrupt
        loss = 1.0 + cfg.lora.r / 100 - cfg.training.learning_rate * 1000
        (run / "manifest.json").write_text(json.dumps({
            "run_name": run.name, "status": "completed", "metrics": {"eval_loss": loss, "bleu": 100 * loss},
            "started_at": "2026-11-20T10:00:00+00:00"}))
        return run

    return train


GRID = ["lora.r=8,16", "training.learning_rate=1e-4,2e-4"]


def test_grid_parsing_and_names():
    grid = parse_grid(GRID + ["lora.target_modules=[q_proj,v_proj],all-linear"])
    assert grid[2] == ("lora.target_modules", ["[q_proj,v_proj]", "all-linear"])
    combos = combinations(parse_grid(GRID))
    assert [c for c, _ in combos] == ["r8-learning_rate1e-4", "r8-learning_rate2e-4", "r16-learning_rate1e-4",
                                      "r16-learning_rate2e-4"]
    assert combos[1][1] == ["lora.r=8", "training.learning_rate=2e-4"]
    for bad in (["lora.r"], ["lora.r=8", "lora.r=16"], []):
        with pytest.raises(SweepError, match="bad --grid"):
            parse_grid(bad)


def test_sweep_runs_every_combination_and_ranks_them(tmp_path):
    calls: list = []
    res = run_sweep(None, GRID, overrides=[f"output.dir={tmp_path}"], name="s", train_fn=fake_train(calls),
                    say=lambda *_: None)
    assert len(calls) == 4 and res.trained == [c for c, _ in calls]
    values = [r.value for r in res.rows]
    assert values == sorted(values) and res.rows[0].combo == "r8-learning_rate2e-4"  # lowest eval_loss first
    state = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert state["ranking"][0] == "r8-learning_rate2e-4" and len(state["runs"]) == 4
    assert all((tmp_path / "s" / c / "manifest.json").is_file() for c in state["runs"])
    # higher-is-better metrics rank the other way round
    by_bleu = run_sweep(None, GRID, overrides=[f"output.dir={tmp_path}"], name="s", metric="bleu",
                        train_fn=fake_train([]), say=lambda *_: None)
    assert by_bleu.rows[0].combo == "r16-learning_rate1e-4"
    # the sweep's runs are ordinary runs, grouped one level down
    from tunelab.runs import list_runs

    assert len(list_runs(tmp_path, sweep="s")) == 4


def test_interrupted_sweep_continues_and_skips_done_runs(tmp_path):
    first: list = []
    with pytest.raises(SweepError, match="run the same command again"):
        run_sweep(None, GRID, overrides=[f"output.dir={tmp_path}"], train_fn=fake_train(first, "r16-learning_rate1e-4"),
                  say=lambda *_: None)
    assert [c for c, _ in first] == ["r8-learning_rate1e-4", "r8-learning_rate2e-4", "r16-learning_rate1e-4"]
    second: list = []
    res = run_sweep(None, GRID, overrides=[f"output.dir={tmp_path}"], train_fn=fake_train(second),
                    say=lambda *_: None)  # same command: same (default) sweep name
    assert res.skipped == ["r8-learning_rate1e-4", "r8-learning_rate2e-4"]
    interrupted = next(p for p in tmp_path.iterdir() if p.is_dir()) / "r16-learning_rate1e-4"
    assert second == [("r16-learning_rate1e-4", str(interrupted)),  # the interrupted run is resumed
                      ("r16-learning_rate2e-4", None)]
    assert all(r.status == "finished" for r in res.rows)


def test_sweep_checks_every_combination_before_training(tmp_path):
    calls: list = []
    with pytest.raises(SweepError) as e:
        run_sweep(None, ["lora.r=8,0", "training.learning_rate=1e-4,-1"], overrides=[f"output.dir={tmp_path}"],
                  train_fn=fake_train(calls), say=lambda *_: None)
    assert "r0" in str(e.value) and "learning_rate-1" in str(e.value) and calls == []


def test_sweep_refuses_a_different_grid_under_the_same_name(tmp_path):
    run_sweep(None, ["lora.r=8"], overrides=[f"output.dir={tmp_path}"], name="s", train_fn=fake_train([]),
              say=lambda *_: None)
    with pytest.raises(SweepError, match="another grid"):
        run_sweep(None, ["lora.r=4"], overrides=[f"output.dir={tmp_path}"], name="s", train_fn=fake_train([]),
                  say=lambda *_: None)


def test_a_failing_combination_does_not_end_the_sweep(tmp_path):
    calls: list = []
    ok = fake_train(calls)

    def flaky(cfg, resume=None):
        if cfg.lora.r == 8:
            raise RuntimeError("CUDA out of memory")
        return ok(cfg, resume)

    res = run_sweep(None, ["lora.r=8,16"], overrides=[f"output.dir={tmp_path}"], train_fn=flaky, say=lambda *_: None)
    assert [(r.combo, r.status) for r in res.rows] == [("r16", "finished"), ("r8", "failed")]
    assert "out of memory" in res.rows[1].error


# ---------------------------------------------------------------- reproduce, with fabricated runs


def _fabricated_run(tmp_path, status="completed", fingerprint="sha256:old"):
    from tunelab.config import load_config, save_config

    run = tmp_path / "r"
    run.mkdir()
    save_config(load_config(None, ["training.seed=7"]), run / "config.yaml")
    (run / "manifest.json").write_text(json.dumps({"status": status, "seed": 7, "data_fingerprint": fingerprint}))
    return run


def test_reproduce_refuses_changed_data(tmp_path):
    run = _fabricated_run(tmp_path)
    with pytest.raises(ReproduceError, match="the data changed") as e:
        check_reproducible(run, fingerprint_fn=lambda cfg, name: "sha256:new")
    assert "Restore the original data" in str(e.value)
    cfg, _ = check_reproducible(run, fingerprint_fn=lambda cfg, name: "sha256:old")
    assert cfg.training.seed == 7


def test_reproduce_switches_off_the_levers_the_original_ran_without(tmp_path, monkeypatch):
    """A run from before the CPU speed levers (no `runtime` in its manifest) is repeated with all of them off,
    a recorded run with exactly the ones it had off (and any lever added after it ran off too)."""
    import os

    from tunelab.reproduce import reproduce

    monkeypatch.delenv("TUNELAB_PERF_OFF", raising=False)
    seen = []

    def fake(cfg):
        seen.append(os.environ.get("TUNELAB_PERF_OFF"))
        out = Path(cfg.output.dir) / cfg.output.run_name
        out.mkdir()
        (out / "manifest.json").write_text(json.dumps({"status": "completed", "data_fingerprint": "sha256:old"}))
        return out

    run = _fabricated_run(tmp_path)
    res = reproduce(run, train_fn=fake, fingerprint_fn=lambda cfg, name: "sha256:old")
    from tunelab.runtime import FIRST_LEVERS, LEVERS, OPT_IN

    assert seen[-1] == ",".join(LEVERS) and "predates" in res.notes[0]
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["runtime"] = {"levers_off": ["fused_head"]}
    (run / "manifest.json").write_text(json.dumps(manifest))
    res = reproduce(run, train_fn=fake, fingerprint_fn=lambda cfg, name: "sha256:old")
    # recorded before the manifest listed the levers it knew: the ones added since are off, as it had none of them
    since = [x for x in LEVERS if x not in FIRST_LEVERS and x not in OPT_IN]
    assert {"shared_prompt", "lean_layers", "autocast_lora_inputs", "one_row_gemv", "bmm_attention"} <= set(since)
    assert seen[-1] == ",".join(["fused_head", *since]) and "TUNELAB_PERF_OFF" not in os.environ
    assert any("added since" in n for n in res.notes)

    manifest["runtime"] = {"levers_off": ["fused_head"], "levers_known": list(LEVERS)}
    (run / "manifest.json").write_text(json.dumps(manifest))
    reproduce(run, train_fn=fake, fingerprint_fn=lambda cfg, name: "sha256:old")
    assert seen[-1] == "fused_head"
    manifest["runtime"] = {"levers_off": [], "levers_on": ["fused_lora"]}  # an opt-in lever the original had on
    (run / "manifest.json").write_text(json.dumps(manifest))
    switched_on = []

    def fake_on(cfg):
        from tunelab.runtime import lever_enabled

        switched_on.append(lever_enabled("fused_lora"))
        return fake(cfg)

    reproduce(run, train_fn=fake_on, fingerprint_fn=lambda cfg, name: "sha256:old")
    assert switched_on == [True] and "TUNELAB_PERF_ON" not in os.environ
    # recorded while fused_lora was opt-in and not asked for: off then, so off in the repeat
    manifest["runtime"] = {"levers_off": [], "levers_on": [], "levers_known": list(LEVERS)}
    (run / "manifest.json").write_text(json.dumps(manifest))
    res = reproduce(run, train_fn=fake_on, fingerprint_fn=lambda cfg, name: "sha256:old")
    assert switched_on[-1] is False and seen[-1] == "fused_lora" and any("opt-in" in n for n in res.notes)
    # recorded since it became a default (the manifest lists what was opt-in): on unless recorded off
    manifest["runtime"] = {"levers_off": [], "levers_on": [], "levers_known": list(LEVERS), "opt_in": list(OPT_IN)}
    (run / "manifest.json").write_text(json.dumps(manifest))
    reproduce(run, train_fn=fake_on, fingerprint_fn=lambda cfg, name: "sha256:old")
    assert switched_on[-1] is True and seen[-1] == ""


@pytest.mark.parametrize("recorded", ["fp32", "bf16"])
def test_reproduce_uses_the_dtype_the_run_recorded(tmp_path, recorded):
    """`auto` may pick another precision on this machine than on the original's: the repeat uses the original's."""
    from tunelab.reproduce import reproduce

    seen = []

    def fake(cfg):
        seen.append(cfg.model.dtype)
        out = Path(cfg.output.dir) / cfg.output.run_name
        out.mkdir()
        (out / "manifest.json").write_text(json.dumps({"status": "finished", "data_fingerprint": "sha256:old"}))
        return out

    run = _fabricated_run(tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest.update(dtype={"name": recorded, "reason": "CPU has AMX/AVX512-BF16"}, runtime={"levers_off": []})
    (run / "manifest.json").write_text(json.dumps(manifest))
    res = reproduce(run, train_fn=fake, fingerprint_fn=lambda cfg, name: "sha256:old")
    assert seen == [recorded] and any(f"auto → {recorded}" in n for n in res.notes)


def test_reproduce_refuses_unfinished_runs(tmp_path):
    run = _fabricated_run(tmp_path, status="interrupted")
    with pytest.raises(ReproduceError, match="tunelab train --resume"):
        check_reproducible(run, fingerprint_fn=lambda cfg, name: "sha256:old")


def test_loss_curve_diff(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for run, losses in ((a, [2.0, 1.5, 1.25]), (b, [2.0, 1.5, 1.0, 0.5])):
        run.mkdir()
        lines = [{"step": i + 1, "loss": v} for i, v in enumerate(losses)] + [{"step": 2, "eval_loss": 1.7}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    d = loss_curve_diff(a, b)
    assert d.max_abs_diff == 0.25 and d.eval_max_abs_diff == 0 and d.steps_compared == 3
    assert d.only_in_repro == [4] and not d.identical
    assert loss_curve_diff(a, a).identical


# ---------------------------------------------------------------- end to end with the real recipe


def _tiny_config(tmp_path, tiny_model_dir, **extra):
    from tunelab.config import load_config
    from tunelab.demo_data import alpaca_records

    data = tmp_path / "raw.json"
    if not data.exists():
        data.write_text(json.dumps(alpaca_records()[:16]))
    overrides = [f"model.name={tiny_model_dir}", "model.dtype=fp32", f"data.train={data}", "data.max_length=96",
                 "data.val_ratio=0.25", "training.max_steps=4", "training.batch_size=4", "training.logging_steps=1",
                 "training.eval_steps=2", "training.learning_rate=1e-3", "lora.r=4", "eval.metrics=[perplexity]",
                 "tracking.report_to=[none]", f"output.dir={tmp_path / 'outputs'}"]
    overrides += [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]
    return load_config(None, overrides), data


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir):
    """One tiny run (4 steps, eval at step 2 and at the end) shared by the end-to-end tests."""
    pytest.importorskip("tunelab.train.recipe")
    from tunelab.train.recipe import train

    cfg, data = _tiny_config(tmp_path_factory.mktemp("e2e"), tiny_model_dir, output__run_name="base",
                             eval__metrics="[perplexity,bleu]", eval__max_samples=2, eval__max_new_tokens=4)
    return train(cfg), data


def test_reproduce_gives_identical_curves_and_refuses_changed_data(trained_run, capsys):
    from tunelab.reproduce import reproduce

    run, data = trained_run
    res = reproduce(run)
    assert res.reproduction == run.parent / "base-repro"
    assert res.diff.steps_compared == 4 and res.diff.identical and res.max_abs_diff == 0
    assert res.final_repro["eval_loss"] == res.final_original["eval_loss"]
    manifest = json.loads((res.reproduction / "manifest.json").read_text())
    assert manifest["reproduction_of"]["max_abs_diff"] == 0

    records = json.loads(data.read_text())
    records[0]["output"] = "a different answer"
    data.write_text(json.dumps(records))
    from tunelab.cli import main

    assert main(["reproduce", str(run)]) == 2
    assert "the data changed since base was trained" in capsys.readouterr().err
    assert not (run.parent / "base-repro2").exists()


def test_eval_perplexity_equals_exp_of_training_eval_loss(trained_run, capsys):
    import math

    from tunelab.cli import main

    run, _ = trained_run
    final = json.loads((run / "manifest.json").read_text())["metrics"]
    assert "bleu" in final  # the recipe's final 评估结果 block comes from evaluate_records
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x for x in logged if x.get("final")][-1]["eval_loss"] == final["eval_loss"]

    rc = main(["eval", "--adapter", str(run), "--metrics", "perplexity,bleu,rouge", "--compare-base",
               "--max-samples", "3", "--max-new-tokens", "4", "--name", "val"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "base" in out and "fine-tuned" in out
    rec = json.loads((run / "eval" / "val.json").read_text())
    assert rec["metrics"]["eval_tokens"] == final["eval_tokens"]
    assert rec["metrics"]["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-5)
    assert rec["metrics"]["perplexity"] == pytest.approx(math.exp(final["eval_loss"]), rel=1e-5)
    assert rec["data"]["fingerprint"] == json.loads((run / "manifest.json").read_text())["data_fingerprint"]
    # the adapter changed the model: base and tuned losses differ
    assert rec["base_metrics"]["eval_loss"] != pytest.approx(rec["metrics"]["eval_loss"], rel=1e-6)
    rows = [json.loads(x) for x in (run / "eval" / "val.predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and "base_prediction" in rows[0]

    from tunelab.evaluate.report import write_run_report

    report = write_run_report(run).read_text()
    assert "base:" in report and "Eval loss" in report


def test_sweep_end_to_end(tmp_path, tiny_model_dir, capsys):
    pytest.importorskip("tunelab.train.recipe")
    import yaml

    cfg, _ = _tiny_config(tmp_path, tiny_model_dir, training__max_steps=2, training__eval_steps=0)
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    res = run_sweep(str(config), ["lora.r=2,4"], name="grid", say=lambda *_: None)
    assert [r.status for r in res.rows] == ["finished", "finished"]
    assert res.rows[0].value <= res.rows[1].value
    from tunelab.cli import main

    capsys.readouterr()
    assert main(["sweep", "--config", str(config), "--grid", "lora.r=2,4", "--name", "grid"]) == 0
    out = capsys.readouterr().out
    assert "r2: already finished, skipped" in out and "r4: already finished, skipped" in out
    assert "sorted by eval_loss" in out


def test_dpo_run_is_tracked_reproduced_and_swept_like_sft(tmp_path, tiny_model_dir):
    """A preference stage goes through the same trackers (TensorBoard, MLflow when installed), reproduce (identical
    curves) and sweep as SFT."""
    import importlib.util

    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tunelab.reproduce import reproduce
    from tunelab.rundir import read_metrics
    from tunelab.train.recipe import train

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"A kind answer number {i}.",
                                         "rejected": "No."}) + "\n" for i in range(12)))
    mlflow = importlib.util.find_spec("mlflow") is not None
    uri = (tmp_path / "mlruns").as_uri()
    cfg, _ = _tiny_config(tmp_path, tiny_model_dir, data__train=pairs, training__stage="dpo",
                          output__run_name="dpo", tracking__mlflow_tracking_uri=uri,
                          tracking__report_to="[tensorboard,mlflow]" if mlflow else "[tensorboard]")
    run = train(cfg)
    logged = [m for m in read_metrics(run) if "loss" in m and not m.get("final")]
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/rewards/accuracy", "train/rewards/margin", "eval/rewards/accuracy"} <= tags, tags
    curve = {e.step: e.value for e in acc.Scalars("train/rewards/margin")}
    assert curve == pytest.approx({m["step"]: m["rewards/margin"] for m in logged}, rel=1e-6)
    if mlflow:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        run_id = json.loads((run / "manifest.json").read_text())["tracking"]["mlflow"]
        history = {m.step: m.value for m in client.get_metric_history(run_id, "rewards/accuracy")}
        assert history == pytest.approx({m["step"]: m["rewards/accuracy"] for m in logged}, rel=1e-9)

    res = reproduce(run)
    assert res.diff.steps_compared == 4 and res.diff.identical and res.max_abs_diff == 0
    assert json.loads((res.reproduction / "manifest.json").read_text())["stage"] == "dpo"

    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    swept = run_sweep(str(config), ["preference.beta=0.1,0.5"], name="beta", say=lambda *_: None)
    assert [r.status for r in swept.rows] == ["finished", "finished"]


# ---------------------------------------------------------------- sweep refusals (before anything trains)


def _sweep(tmp_path, grid=("lora.r=8",), calls=None, **kw):
    kw.setdefault("overrides", [f"output.dir={tmp_path}"])
    return run_sweep(kw.pop("config", None), list(grid), train_fn=fake_train([] if calls is None else calls),
                     say=lambda *_: None, **kw)


def test_sweep_refuses_a_name_started_from_another_config(tmp_path):
    """`--name mine` with an edited config must not show the first config's results as this one's."""
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("training:\n  seed: 1\n")
    b.write_text("training:\n  seed: 2\n")
    _sweep(tmp_path, config=str(a), name="mine")
    calls: list = []
    with pytest.raises(SweepError, match="another config.*differs in training.seed;"):
        _sweep(tmp_path, config=str(b), name="mine", calls=calls)
    assert calls == []
    res = _sweep(tmp_path, config=str(a), name="mine")  # the same config continues it
    assert res.skipped == ["r8"]


@pytest.mark.parametrize("metric", ["eval_los", "eval_tokens"])
def test_sweep_refuses_a_metric_it_cannot_rank_by_before_training(tmp_path, metric):
    calls: list = []
    with pytest.raises(SweepError, match=f"--metric '{metric}': not a metric the sweep can rank by"):
        _sweep(tmp_path, metric=metric, calls=calls)
    assert calls == [] and not any(tmp_path.iterdir())


def test_sweep_ranks_by_what_preference_training_logs(tmp_path):
    calls: list = []
    with pytest.raises(SweepError) as e:
        _sweep(tmp_path, metric="eval_rewards/acuracy", calls=calls)
    assert "did you mean eval_rewards/accuracy?" in str(e.value) and "logps/chosen" in str(e.value)
    assert calls == []
    res = _sweep(tmp_path, ["lora.r=8,16"], metric="eval_rewards/accuracy", name="s")
    assert res.metric == "eval_rewards/accuracy"


def test_sweep_without_the_metric_writes_no_ranking(tmp_path):
    res = _sweep(tmp_path, ["lora.r=8,16"], metric="rouge_l", name="s")  # fake runs record eval_loss and bleu only
    assert all(r.value is None for r in res.rows)
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["ranking"] == []
    from tunelab.sweep import sweep_table

    assert "not ranked" in sweep_table(res).title


@pytest.mark.parametrize("name", ["grp/s1", "../escaped", ".hidden", ".."])
def test_sweep_name_is_a_plain_folder(tmp_path, name):
    with pytest.raises(SweepError, match="plain folder name"):
        _sweep(tmp_path / "out", name=name)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "out").exists()


def test_sweep_refuses_output_keys_it_would_overwrite(tmp_path):
    calls: list = []
    with pytest.raises(SweepError, match="output.dir: the sweep sets output.dir"):
        _sweep(tmp_path, ["output.dir=outA,outB"], calls=calls)
    with pytest.raises(SweepError, match="output.run_name cannot be an override"):
        _sweep(tmp_path, overrides=[f"output.dir={tmp_path}", "output.run_name=x"], calls=calls)
    assert calls == []


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"runs": [1]}', '{"runs": {"r8": 3}}'])
def test_a_damaged_sweep_json_is_one_clear_error(tmp_path, text, capsys):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text(text)
    with pytest.raises(SweepError, match="cannot read .*sweep.json"):
        _sweep(tmp_path, name="s")
    from tunelab.cli import main

    assert main(["runs", "list", "--dir", str(tmp_path), "--sweep", "s"]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "Traceback" not in err


def test_a_sweep_from_before_the_config_hash_is_checked_against_its_runs(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("training:\n  seed: 1\n")
    b.write_text("training:\n  seed: 2\n")
    _sweep(tmp_path, config=str(a), name="mine")
    state = json.loads((tmp_path / "mine" / "sweep.json").read_text())
    state.pop("config_hash", None)
    (tmp_path / "mine" / "sweep.json").write_text(json.dumps(state))
    with pytest.raises(SweepError, match="another config"):
        _sweep(tmp_path, config=str(b), name="mine")
    assert _sweep(tmp_path, config=str(a), name="mine").skipped == ["r8"]


def test_a_tunelab_upgrade_alone_does_not_stop_a_sweep(tmp_path):
    """A newer tunelab adds config keys (with their defaults): the runs an older one trained are still this config's,
    whatever an older sweep.json recorded about the config."""
    import yaml

    from tunelab.config import load_config

    a = tmp_path / "a.yaml"
    a.write_text("training:\n  seed: 1\n")
    _sweep(tmp_path, ["lora.r=8,16"], config=str(a), name="mine")
    state_path = tmp_path / "mine" / "sweep.json"
    state = json.loads(state_path.read_text())
    state["config_hash"] = "0123456789abcdef"  # a hash an older version computed over a config without a new key
    state_path.write_text(json.dumps(state))
    for combo in ("r8", "r16"):  # config.yaml as written before training.seed's neighbours existed
        path = tmp_path / "mine" / combo / "config.yaml"
        saved = yaml.safe_load(path.read_text())
        dropped = [k for k in list(saved["training"]) if k != "seed"][-2:]
        for k in dropped:
            del saved["training"][k]
        path.write_text(yaml.safe_dump(saved))
        assert load_config(path).to_dict()["training"]["seed"] == 1  # read back: the keys get their defaults
    calls: list = []
    res = _sweep(tmp_path, ["lora.r=8,16"], config=str(a), name="mine", calls=calls)
    assert res.skipped == ["r8", "r16"] and calls == []
    assert "config_hash" not in json.loads(state_path.read_text())


def test_an_interrupted_reproduction_is_continued_by_reproduce(tmp_path):
    from tunelab.reproduce import reproduce
    from tunelab.train.lifecycle import TrainingInterrupted

    calls = []

    def fake(cfg, resume=None):
        out = Path(cfg.output.dir) / cfg.output.run_name
        calls.append((out.name, resume))
        out.mkdir(exist_ok=True)
        status = "interrupted" if len(calls) == 1 else "finished"
        (out / "manifest.json").write_text(json.dumps({"status": status, "data_fingerprint": "sha256:old"}))
        if status == "interrupted":
            raise KeyboardInterrupt
        return out

    run = _fabricated_run(tmp_path)
    with pytest.raises(TrainingInterrupted, match=f"run `tunelab reproduce {run}` again") as e:
        reproduce(run, train_fn=fake, fingerprint_fn=lambda cfg, name: "sha256:old")
    assert e.value.exit_code == 130  # as an interrupted `tunelab train`
    res = reproduce(run, train_fn=fake, fingerprint_fn=lambda cfg, name: "sha256:old")
    assert calls == [("r-repro", None), ("r-repro", str(tmp_path / "r-repro"))]
    assert res.reproduction == tmp_path / "r-repro" and not (tmp_path / "r-repro2").exists()
    assert "reproduction_of" in json.loads((res.reproduction / "manifest.json").read_text())


def test_a_second_process_on_a_running_sweep_is_refused(tmp_path):
    """Two `tunelab sweep` commands on one sweep trained the same combinations side by side and overwrote each
    other's sweep.json. While one runs (another process here), the second is refused with one line; once it has
    ended (even killed) the sweep continues."""
    import subprocess
    import sys
    import time

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from tunelab.sweep import run_sweep\n"
        "def train(cfg, resume=None):\n"
        "    print('training', flush=True); time.sleep(60)\n"
        f"run_sweep(None, {GRID!r}, name='s', overrides=['output.dir={tmp_path}'], train_fn=train, "
        "say=lambda *_: None)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "training"
        calls: list = []
        with pytest.raises(SweepError, match=r"^sweep 's' in .* is running now in another process; wait"):
            run_sweep(None, GRID, name="s", overrides=[f"output.dir={tmp_path}"], train_fn=fake_train(calls),
                      say=lambda *_: None)
        assert calls == []
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    res = run_sweep(None, GRID, name="s", overrides=[f"output.dir={tmp_path}"], train_fn=fake_train([]),
                    say=lambda *_: None)
    assert len(res.rows) == 4 and all(r.status == "finished" for r in res.rows)


def test_reproduce_reads_the_original_before_training_and_names_its_damaged_files(tmp_path, caplog):
    """The original's metrics.jsonl was read only after the whole repeat had trained, and a damaged line crashed it
    then, with no `reproduction_of` recorded; a config.yaml that is not YAML gave a ParserError traceback. The
    metrics are read (damaged lines skipped with a warning) before training, and a broken config is refused."""
    from tunelab.cli import main
    from tunelab.reproduce import reproduce

    run = _fabricated_run(tmp_path)
    good = b'{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    (run / "metrics.jsonl").write_bytes(good[:25] + b'[1]\n{"step": 1, "note": "\xff"}\n' + good[25:])
    warned_before = []

    def fake(cfg, resume=None):
        warned_before.append(any("metrics.jsonl: 2 lines skipped" in r.getMessage() for r in caplog.records))
        out = Path(cfg.output.dir) / cfg.output.run_name
        out.mkdir()
        (out / "manifest.json").write_text(json.dumps({"status": "finished", "data_fingerprint": "sha256:old"}))
        (out / "metrics.jsonl").write_bytes(good)
        return out

    res = reproduce(run, train_fn=fake, fingerprint_fn=lambda cfg, name: "sha256:old")
    assert warned_before == [True] and res.diff.steps_compared == 2 and res.diff.identical
    assert json.loads((res.reproduction / "manifest.json").read_text())["reproduction_of"]["identical"] is True

    (run / "config.yaml").write_text("training: [unclosed\n")
    with pytest.raises(ReproduceError, match=r"config.yaml is not valid YAML .*restore the file"):
        reproduce(run, train_fn=fake, fingerprint_fn=lambda cfg, name: "sha256:old")
    assert main(["reproduce", str(run)]) == 2 and warned_before == [True]


def test_reproduce_says_a_stale_run_can_be_resumed(tmp_path):
    """A run whose process is gone while its manifest says running shows as stale, as in `tunelab runs list`."""
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    run = _fabricated_run(tmp_path, status="running")
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "pid": gone.pid, "pid_started": 1.0}))
    with pytest.raises(ReproduceError, match=r"status 'stale'.*continue it with: tunelab train --resume"):
        check_reproducible(run, fingerprint_fn=lambda cfg, name: "sha256:old")


# ---------------------------------------------------------------- grids that repeat themselves


@pytest.mark.parametrize("grid,overrides,says", [
    (["lora.r=8,16,8"], [], "lora.r: the value 8 is given twice"),
    (["training.learning_rate=1e-4,0.0001"], [], "learning_rate1e-4 and learning_rate0.0001"),
    (["lora.r=8,16"], ["lora.r=4"], "lora.r: both a --grid axis and an override"),
])
def test_a_grid_that_would_train_a_config_twice_or_drop_a_setting_is_refused(tmp_path, grid, overrides, says):
    """`lora.r=8,8` and `learning_rate=1e-4,0.0001` trained one config twice under one or two names; an override
    of a grid axis was replaced by the grid's values without a word."""
    from tunelab.errors import TunelabError

    calls: list = []
    with pytest.raises(TunelabError, match=re.escape(says)):
        run_sweep(None, grid, overrides=[f"output.dir={tmp_path}", *overrides], train_fn=fake_train(calls),
                  say=lambda *_: None)
    assert calls == [] and not any(tmp_path.iterdir())


def test_a_key_overridden_twice_in_a_sweep_is_named_in_a_warning(tmp_path):
    said: list = []
    run_sweep(None, ["lora.r=8"], overrides=[f"output.dir={tmp_path}", "training.epochs=1", "training.epochs=2"],
              name="s", train_fn=fake_train([]), say=said.append)
    assert said[0] == "warning: training.epochs is given 2 times on the command line (training.epochs=1, " \
                      "training.epochs=2): the last one applies"


def test_grid_values_that_make_the_same_folder_name_get_their_own_runs(tmp_path):
    """`data.system_prompt=a b,a_b` made two combinations named system_prompta_b: the second config was trained
    for both (the first never), and reported under the first's values."""
    calls: list = []
    res = run_sweep(None, ["data.system_prompt=a b,a_b"], overrides=[f"output.dir={tmp_path}"], name="s",
                    train_fn=fake_train(calls), say=lambda *_: None)
    assert [c for c, _ in calls] == ["system_prompta_b", "system_prompta_b-2"]
    from tunelab.config import load_config

    prompts = {r.combo: load_config(r.run_dir / "config.yaml").data.system_prompt for r in res.rows}
    assert prompts == {"system_prompta_b": "a b", "system_prompta_b-2": "a_b"}


def test_reproduce_refuses_a_run_folder_whose_config_was_edited_or_is_missing(tmp_path):
    """Only the seed was compared with the manifest: a config.yaml edited to another method, stage or model was
    trained as the 'reproduction', and a missing one was reported as 'config file not found'."""
    run = _fabricated_run(tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest.update(method="lora", stage="sft", model="bundled:smollm2-135m-instruct")
    (run / "manifest.json").write_text(json.dumps(manifest))
    check_reproducible(run, fingerprint_fn=lambda cfg, name: "sha256:old")  # as trained: fine
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("method: lora", "method: dora"))
    with pytest.raises(ReproduceError, match=r"config.yaml was edited after the run \(method 'lora' in "
                                             r"manifest.json, 'dora' in config.yaml\)"):
        check_reproducible(run, fingerprint_fn=lambda cfg, name: "sha256:old")
    (run / "config.yaml").unlink()
    with pytest.raises(ReproduceError, match="has no config.yaml: the run records what it trained with there"):
        check_reproducible(run, fingerprint_fn=lambda cfg, name: "sha256:old")


def test_an_unknown_grid_key_is_named_once_with_the_key_meant(tmp_path):
    """A misspelt axis was reported once per combination (a 3 x 3 grid: nine copies of one mistake)."""
    with pytest.raises(SweepError) as e:
        _sweep(tmp_path, ["lora.rr=8,16,32", "training.lr=1e-4,2e-4,3e-4"])
    msg = str(e.value)
    assert msg.count("lora.rr") == 1 and "lora.rr: unknown key (did you mean lora.r?)" in msg
    assert msg.count("training.lr") == 1 and "(did you mean training.learning_rate?)" in msg
    assert [k for k, _ in parse_grid(["data.map.instruction=q,question"])] == ["data.map.instruction"]


def test_reproduce_says_which_tunelab_made_a_run_whose_config_this_one_cannot_read(tmp_path):
    """A run from another tunelab version whose config.yaml holds a key this version does not know was refused as
    an ordinary config mistake, with no word that the run came from another version."""
    from tunelab.config import ConfigError
    from tunelab.rundir import package_versions

    run = _fabricated_run(tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("training:\n",
                                                                               "training:\n  warmup_steps: 5\n"))
    (run / "manifest.json").write_text(json.dumps({**manifest, "versions": {"tunelab": "0.0.1"}}))
    with pytest.raises(ReproduceError) as e:
        check_reproducible(run, fingerprint_fn=lambda cfg, name: "sha256:old")
    assert "training.warmup_steps: unknown key" in str(e.value)
    now = package_versions()["tunelab"]
    assert f"The run was trained by tunelab 0.0.1, and this is tunelab {now}" in str(e.value)
    # the same version: the config mistake alone
    (run / "manifest.json").write_text(json.dumps({**manifest, "versions": {"tunelab": now}}))
    with pytest.raises(ConfigError, match="training.warmup_steps: unknown key"):
        check_reproducible(run, fingerprint_fn=lambda cfg, name: "sha256:old")


def test_a_config_mistake_every_combination_shares_is_said_once(tmp_path):
    """A missing --config (or a typo in it) was reported once per combination of the grid."""
    with pytest.raises(SweepError) as e:
        _sweep(tmp_path, ["lora.r=8,16", "training.learning_rate=1e-4,2e-4"], config=str(tmp_path / "nope.yaml"))
    msg = str(e.value)
    assert msg.count("config file not found") == 1 and "every combination: config file not found" in msg
    with pytest.raises(SweepError) as e:  # per combination where they differ
        _sweep(tmp_path, ["lora.r=8,0,-1"])
    assert "\nr0: " in str(e.value) and "\nr-1: " in str(e.value) and "r8" not in str(e.value)


def test_the_default_sweep_name_follows_a_config_named_under_home(tmp_path, monkeypatch):
    """`--config "~/c.yaml"`: the file was not read, so an edited config kept the sweep name (and its results)."""
    from tunelab.sweep import default_sweep_name

    monkeypatch.setenv("HOME", str(tmp_path))
    grid = parse_grid(["lora.r=8"])
    (tmp_path / "c.yaml").write_text("training:\n  epochs: 1\n")
    first = default_sweep_name("~/c.yaml", grid, [])
    (tmp_path / "c.yaml").write_text("training:\n  epochs: 2\n")
    assert default_sweep_name("~/c.yaml", grid, []) != first


def test_reproduce_refuses_a_name_that_is_taken_before_fingerprinting(tmp_path):
    """`--name` of the original (or another run) went through the data check and on to training, which then
    refused it with advice about output.run_name."""
    from tunelab.reproduce import reproduce

    run = _fabricated_run(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text("{}")
    fingerprinted = []
    for name, says in ((run.name, "is the run itself"), ("other", "is a run")):
        with pytest.raises(ReproduceError, match=f"--name {name}: .*{says}; the repeat goes beside the original"):
            reproduce(run, name=name, fingerprint_fn=lambda cfg, n: fingerprinted.append(n) or "sha256:old",
                      train_fn=lambda *a, **k: pytest.fail("trained"))
    assert fingerprinted == []


def test_a_sweep_whose_output_dir_is_a_file_says_so(tmp_path):
    """It said only 'Not a directory: <file>/<sweep>', with no word of output.dir."""
    (tmp_path / "f").write_text("")
    with pytest.raises(SweepError, match=r"cannot make the sweep folder .*f/s: Not a directory \(check output.dir\)"):
        _sweep(tmp_path, overrides=[f"output.dir={tmp_path / 'f'}"], name="s")


def test_a_sweep_compares_a_run_saved_with_patience_and_no_eval_steps(tmp_path):
    """Such a run (an older tunelab trained it; patience did nothing) was skipped without a word by the check that a
    sweep continues the config it started with: its config.yaml was read with today's stricter checks."""
    from tunelab.config import load_config
    from tunelab.sweep import trained_from_another_config

    (tmp_path / "c1").mkdir()
    (tmp_path / "c1" / "config.yaml").write_text("lora: {r: 8}\ntraining: {early_stopping_patience: 3, eval_steps: 0}\n")
    assert trained_from_another_config(tmp_path, {"c1": load_config(None, ["lora.r=16"])}) == {"c1": ["lora.r"]}
