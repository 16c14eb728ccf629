"""Runs as data: list, show, compare (best marked), plot and report over run folders (docs/architecture.md)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tunelab import runs
from tunelab.cli import main


def make_run(root: Path, name: str, *, lr: float = 2e-4, r: int = 16, status: str = "finished",
             losses=(2.0, 1.5, 1.2), eval_losses=((3, 1.4),), metrics=None, fingerprint="a" * 64,
             started="2026-11-20T10:00:00+00:00", predictions=None) -> Path:
    """A run folder as the training recipe writes it (config.yaml, manifest.json, metrics.jsonl)."""
    from tunelab.config import load_config, save_config

    run = root / name
    run.mkdir(parents=True)
    cfg = load_config(None, [f"training.learning_rate={lr}", f"lora.r={r}", f"output.dir={root}",
                             f"output.run_name={name}"])
    save_config(cfg, run / "config.yaml")
    metrics = metrics if metrics is not None else {"train_loss": losses[-1], "eval_loss": eval_losses[-1][1],
                                                   "perplexity": 2.718 ** eval_losses[-1][1], "bleu": 12.5}
    manifest = {"run_name": name, "status": status, "seed": 42, "method": "lora", "model": "bundled:smollm2",
                "data_fingerprint": fingerprint,
                "data": {"folder": str(run / "data"), "source": "data/raw/demo.json", "train_records": 30,
                         "val_records": 4},
                "dtype": {"name": "fp32", "reason": "no GPU"}, "started_at": started,
                "ended_at": started, "global_step": len(losses), "duration_s": 75.0, "metrics": metrics}
    (run / "manifest.json").write_text(json.dumps(manifest))
    lines = [{"step": i + 1, "epoch": 0.1 * (i + 1), "loss": v, "lr": lr, "grad_norm": 1.0, "tokens_per_s": 9.0,
              "elapsed_s": i} for i, v in enumerate(losses)]
    lines += [{"step": s, "epoch": 0.3, "eval_loss": v, "eval_perplexity": 2.718 ** v} for s, v in eval_losses]
    lines.append({"step": len(losses), "final": True, **metrics})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if predictions:
        (run / "eval").mkdir()
        (run / "eval" / "val.json").write_text(json.dumps({
            "metrics": {"bleu": 30.0, "perplexity": 3.0}, "base_metrics": {"bleu": 5.0, "perplexity": 9.0},
            "tokenizer_choice": {"bleu_tokenize": "zh", "bleu_tokenize_reason": "references contain Chinese"}}))
        (run / "eval" / "val.predictions.jsonl").write_text(
            "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    return run


def test_list_shows_every_column_newest_first(tmp_path, capsys):
    make_run(tmp_path, "old", started="2026-11-01T10:00:00+00:00")
    make_run(tmp_path, "new", started="2026-11-21T10:00:00+00:00", status="interrupted", metrics={})
    make_run(tmp_path / "mysweep", "r8", started="2026-11-10T10:00:00+00:00")  # grouped one level deeper
    (tmp_path / "not-a-run").mkdir()
    listed = runs.list_runs(tmp_path)
    assert [s.name for s in listed] == ["new", "mysweep/r8", "old"]
    old = listed[-1]
    assert (old.status, old.method, old.model, old.data, old.steps) == ("finished", "lora", "bundled:smollm2",
                                                                        "demo.json (30/4)", 3)
    assert old.metrics["eval_loss"] == 1.4 and old.metrics["bleu"] == 12.5
    assert main(["runs", "list", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for word in ("name", "status", "BLEU", "duration", "interrupted", "1m15s", "mysweep/r8"):
        assert word in out


def test_list_is_fast_with_hundreds_of_runs(tmp_path):
    manifest = json.dumps({"run_name": "x", "status": "completed", "metrics": {"eval_loss": 1.0},
                           "started_at": "2026-11-01T10:00:00+00:00"})
    for i in range(300):
        d = tmp_path / f"run-{i:03d}"
        d.mkdir()
        (d / "manifest.json").write_text(manifest)
        (d / "metrics.jsonl").write_text("not json, and never read by list\n" * 1000)
    t = time.perf_counter()
    assert len(runs.list_runs(tmp_path)) == 300
    assert time.perf_counter() - t < 2.0


def test_resolve_run_by_name_or_path_and_suggests(tmp_path):
    run = make_run(tmp_path, "lora-r16")
    assert runs.resolve_run("lora-r16", tmp_path) == run
    assert runs.resolve_run(run / "checkpoint-final", tmp_path) == run
    with pytest.raises(runs.RunError, match="did you mean lora-r16"):
        runs.resolve_run("lora-r61", tmp_path)
    gone = tmp_path / "gone"  # an absolute path is looked at once, and said once
    with pytest.raises(runs.RunError, match=rf"looked at {gone}\)"):
        runs.resolve_run(gone, tmp_path)


def test_show(tmp_path, capsys):
    make_run(tmp_path, "a")
    assert main(["runs", "show", "a", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fp32 (no GPU)" in out and "aaaaaaaa" in out and "learning_rate" in out and "Eval loss" in out


def test_a_damaged_run_folder_is_named_and_does_not_break_the_others(tmp_path, capsys):
    make_run(tmp_path, "good")
    (make_run(tmp_path, "nulled") / "manifest.json").write_text("null")
    (make_run(tmp_path, "listed") / "manifest.json").write_text("[1, 2]")
    (make_run(tmp_path, "badyaml") / "config.yaml").write_text("training: [unclosed\n")
    assert main(["runs", "list", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "good" in out and out.count("unreadable") == 2
    for verb in (["show", "nulled"], ["show", "badyaml"], ["compare", "good", "badyaml"]):
        assert main(["runs", *verb, "--dir", str(tmp_path)]) == 2
        assert "cannot read" in capsys.readouterr().err


def test_compare_marks_the_best_and_diffs_config_and_data(tmp_path, capsys):
    make_run(tmp_path, "a", lr=1e-4, eval_losses=((3, 1.4),), metrics={"eval_loss": 1.4, "bleu": 20.0})
    make_run(tmp_path, "b", lr=2e-4, eval_losses=((3, 1.1),), metrics={"eval_loss": 1.1, "bleu": 10.0},
             fingerprint="b" * 64)
    make_run(tmp_path, "c", lr=2e-4, metrics={"eval_loss": 1.3, "bleu": 20.0})
    cmp = runs.compare_runs(["a", "b", "c"], tmp_path)
    assert cmp.best["eval_loss"] == [1]  # lower is better
    assert cmp.best["bleu"] == [0, 2]  # higher is better; ties are all marked
    assert cmp.config_diff == {"training.learning_rate": [1e-4, 2e-4, 2e-4]}  # run names and dirs aside
    assert not cmp.data_same and cmp.data["fingerprint"][1] == "b" * 64
    assert cmp.env_diff == {}  # same seed, precision, versions
    assert main(["runs", "compare", "a", "b", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "★" in out and "DIFFERENT" in out and "training.learning_rate" in out


def test_a_nan_metric_is_never_the_best(tmp_path):
    """A run whose eval loss went NaN listed first: min(nan, 1.2) is nan, so no run was marked best; listed second
    it was skipped only by luck of min's order."""
    make_run(tmp_path, "nan", metrics={"eval_loss": float("nan"), "bleu": float("nan")})
    make_run(tmp_path, "ok", metrics={"eval_loss": 1.2, "bleu": 5.0})
    make_run(tmp_path, "worse", metrics={"eval_loss": 1.5, "bleu": 1.0})
    for order in (["nan", "ok", "worse"], ["ok", "nan", "worse"]):
        cmp = runs.compare_runs(order, tmp_path)
        assert cmp.best["eval_loss"] == cmp.best["bleu"] == [order.index("ok")]


def test_compare_marks_the_best_of_preference_training_metrics(tmp_path):
    """Preference training logs its held-out metrics with an eval_ prefix (eval_rewards/accuracy, ...)."""
    make_run(tmp_path, "a", metrics={"eval_rewards/accuracy": 0.6, "eval_rewards/margin": 0.2})
    make_run(tmp_path, "b", metrics={"eval_rewards/accuracy": 0.8, "eval_rewards/margin": 0.1})
    cmp = runs.compare_runs(["a", "b"], tmp_path)
    assert cmp.best["eval_rewards/accuracy"] == [1] and cmp.best["eval_rewards/margin"] == [0]
    assert runs.metric_direction("eval_logps/rejected") == "min" and runs.metric_direction("val:eval_loss") == "min"
    assert runs.metric_direction("eval_tokens") is None and runs.metric_direction("eval_") is None


def test_compare_shows_environment_differences(tmp_path):
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b")
    manifest = json.loads((b / "manifest.json").read_text())
    manifest.update(seed=7, versions={"torch": "2.13.0"}, dtype={"name": "bf16", "reason": "GPU"})
    (b / "manifest.json").write_text(json.dumps(manifest))
    env = runs.compare_runs([a, b]).env_diff
    assert env["seed"] == [42, 7] and env["dtype.name"] == ["fp32", "bf16"] and env["versions.torch"] == [None, "2.13.0"]


def test_compare_needs_two_runs(tmp_path):
    make_run(tmp_path, "a")
    with pytest.raises(runs.RunError, match="at least two"):
        runs.compare_runs(["a"], tmp_path)


def test_plot_overlays_train_and_eval_curves(tmp_path):
    a = make_run(tmp_path, "a")
    b = make_run(tmp_path, "b", losses=(2.2, 1.9, 1.7))
    out = runs.plot_runs([a, b], "loss", tmp_path / "plots" / "loss.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["runs", "plot", "a", "b", "--dir", str(tmp_path), "--metric", "perplexity",
                 "-o", str(tmp_path / "ppl.png")]) == 0
    assert (tmp_path / "ppl.png").stat().st_size > 1000
    with pytest.raises(runs.RunError, match="no 'nonsense' values"):
        runs.plot_runs([a], "nonsense", tmp_path / "x.png")
    for name in ("plot.xyz", "plot"):  # a traceback from matplotlib; "wrote plot" for a file named plot.png
        with pytest.raises(runs.RunError, match=r"name the image file with one of .*\.png"):
            runs.plot_runs([a], "loss", tmp_path / name)


def test_curve_reader_survives_a_torn_last_line(tmp_path):
    run = make_run(tmp_path, "a")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    assert [s for s, _ in runs.curve(runs.read_metrics(run), "loss")] == [1, 2, 3]


@pytest.mark.parametrize("fmt", ["md", "html"])
def test_report_has_plot_config_data_evals_and_samples(tmp_path, fmt):
    from tunelab.evaluate.report import write_run_report

    preds = [{"index": 0, "prompt": "Who are you?", "reference": "I am Tuna.", "prediction": "I am Tuna.",
              "base_prediction": "I am SmolLM.", "scores": {"bleu": 100.0}, "base_scores": {"bleu": 10.0}},
             {"index": 1, "prompt": "首都？", "reference": "北京。", "prediction": "北京。",
              "base_prediction": "不知道", "scores": {"bleu": 100.0}}]
    run = make_run(tmp_path, "a", predictions=preds)
    out = write_run_report(run, fmt=fmt)
    text = out.read_text()
    assert out == run / f"report.{fmt}"
    for needle in ("Loss", "learning_rate", "fingerprint", "demo.json", "BLEU", "I am SmolLM.", "不知道",
                   "fine-tuned", "references contain Chinese"):
        assert needle in text, needle
    if fmt == "md":
        assert (run / "report" / "loss.png").is_file() and "![loss curves](report/loss.png)" in text
    else:
        assert "data:image/png;base64," in text
    # base 9.0 -> tuned 3.0 perplexity is an improvement; BLEU 5 -> 30 too
    assert text.count("(better)") >= 2


def test_report_cli(tmp_path, capsys):
    make_run(tmp_path, "a")
    assert main(["runs", "report", "a", "--dir", str(tmp_path), "-o", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").read_text().startswith("<!doctype html>")


def test_statuses_of_older_runs_read_in_todays_words(tmp_path):
    from tunelab.rundir import run_status
    from tunelab.runs import list_runs

    assert run_status({"status": "completed"}) == "finished" and run_status({"status": "diverged"}) == "failed"
    assert run_status({}) == "unknown"
    make_run(tmp_path, "old", status="completed")
    assert [r.status for r in list_runs(tmp_path)] == ["finished"]


def test_list_sweep_finds_its_runs_from_any_folder(tmp_path, monkeypatch):
    """sweep.json records run_dir relative to where the sweep ran; `runs list --sweep` must not depend on that."""
    from tunelab.sweep import run_sweep

    def train(cfg, resume=None):
        return make_run(Path(cfg.output.dir), cfg.output.run_name)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(tmp_path)
    run_sweep(None, ["lora.r=8,16"], overrides=["output.dir=outputs"], name="s", train_fn=train, say=lambda *_: None)
    monkeypatch.chdir(elsewhere)
    assert sorted(s.name for s in runs.list_runs(tmp_path / "outputs", sweep="s")) == ["s/r16", "s/r8"]


def test_runs_reads_a_sweep_without_importing_the_sweep_module(tmp_path, monkeypatch):
    """sweep imports runs; runs importing sweep back would be a cycle (house style: none)."""
    import sys

    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text(json.dumps({"runs": {"r8": {"status": "finished"}}}))
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "sweep.json").write_text(json.dumps({"runs": [1]}))
    monkeypatch.setitem(sys.modules, "tunelab.sweep", None)  # any import of it raises ImportError
    assert list(runs.load_sweep(tmp_path, "s")["runs"]) == ["r8"]
    with pytest.raises(runs.RunError, match="cannot read .*sweep.json"):
        runs.load_sweep(tmp_path, "t")


def test_reports_in_one_folder_keep_their_own_loss_plot(tmp_path):
    from tunelab.evaluate.report import write_run_report

    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b", losses=(5.0, 4.0, 3.0))
    ra = write_run_report(a, tmp_path / "rep" / "a.md")
    rb = write_run_report(b, tmp_path / "rep" / "b.md")
    image = lambda md: md.parent / md.read_text().split("![loss curves](")[1].split(")")[0]  # noqa: E731
    assert image(ra) != image(rb) and image(ra).is_file() and image(rb).is_file()
    write_run_report(b, tmp_path / "rep" / "c.html")
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["a", "a.md", "b", "b.md", "c.html"]


def test_malformed_fields_are_tolerated_without_a_traceback(tmp_path, capsys):
    odd = make_run(tmp_path, "odd")
    manifest = json.loads((odd / "manifest.json").read_text())
    manifest.update(duration_s="12", global_step="3", dtype={"name": "fp32"})
    (odd / "manifest.json").write_text(json.dumps(manifest))
    (odd / "eval").mkdir()
    (odd / "eval" / "val.json").write_text("[1, 2]")
    (odd / "eval" / "test.json").write_text('{"metrics": [1], "base_metrics": "x", "tokenizer_choice": 3}')
    make_run(tmp_path, "good")
    assert main(["runs", "list", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "good" in out and "odd" in out and "unreadable" not in out
    assert main(["runs", "show", "odd", "--dir", str(tmp_path)]) == 0
    assert "fp32" in capsys.readouterr().out
    assert main(["runs", "compare", "odd", "good", "--dir", str(tmp_path)]) == 0
    from tunelab.evaluate.report import write_run_report

    assert "fp32" in write_run_report(odd).read_text()
    manifest["data_fingerprint"] = ["not", "a", "string"]
    (odd / "manifest.json").write_text(json.dumps(manifest))
    assert not runs.compare_runs(["odd", "good"], tmp_path).data_same


def test_compare_and_plot_tell_alike_names_apart(tmp_path, monkeypatch):
    a, b = make_run(tmp_path / "mine", "r2"), make_run(tmp_path / "other", "r2")
    assert runs.compare_runs(["mine/r2", "other/r2"], tmp_path).names == ["mine/r2", "other/r2"]
    assert runs.compare_runs([a, make_run(tmp_path, "x")], tmp_path).names == ["r2", "x"]  # unique: plain names
    assert runs.run_labels([a, b], tmp_path) == ["mine/r2", "other/r2"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = []
    real_legend = plt.Axes.legend

    def legend(ax, *args, **kw):
        labels.extend(ax.get_legend_handles_labels()[1])
        return real_legend(ax, *args, **kw)

    monkeypatch.setattr(plt.Axes, "legend", legend)
    runs.plot_runs(["mine/r2", "other/r2"], "loss", tmp_path / "p.png", tmp_path)
    assert "mine/r2 train" in labels and "other/r2 train" in labels


# ---------------------------------------------------------------- damaged run folders


def test_a_damaged_manifest_is_named_on_resume_and_does_not_stop_the_run_writing_it(tmp_path, capsys, caplog):
    """A truncated manifest.json gave `train --resume` a JSONDecodeError traceback. It is one error naming the file
    and what to do; the process that writes the manifest goes on from what it wrote last instead, and the runs
    table still lists every run."""
    from tunelab.errors import TunelabError
    from tunelab.rundir import RunDir

    run = make_run(tmp_path, "cut", status="interrupted")
    (run / "manifest.json").write_text((run / "manifest.json").read_text()[:50])
    with pytest.raises(TunelabError, match=r"cannot read .*manifest.json.*\n.*restore the file") as e:
        RunDir(run).manifest()
    assert f"tunelab train --config {run / 'config.yaml'}" in str(e.value)
    assert main(["train", "--resume", str(run)]) == 2
    assert "The run's record is damaged" in capsys.readouterr().err
    make_run(tmp_path, "good")
    assert main(["runs", "list", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "good" in out and "unreadable" in out

    writer = RunDir(tmp_path / "live")
    writer.path.mkdir()
    writer.update_manifest(status="running", data_fingerprint="f")
    writer.manifest_path.write_text('{"status": "run')  # damaged under the run (a hand edit, a full disk)
    writer.update_manifest(status="finished")
    assert json.loads(writer.manifest_path.read_text()) == {"status": "finished", "data_fingerprint": "f"}
    assert any("written again from what this run recorded" in r.getMessage() for r in caplog.records)


def _damaged_metrics(run: Path) -> None:
    """Three bad lines among the good ones (a list, a number, bytes that are not UTF-8), then a torn last line."""
    good = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (run / "metrics.jsonl").write_bytes(b"".join([good[0], b"[1]\n", b"3\n", b'{"step": 2, "note": "\xff"}\n',
                                                  *good[1:], b'{"step": 4, "lo']))


def test_damaged_metric_lines_are_skipped_with_one_warning(tmp_path, capsys, caplog):
    """A non-object line gave an AttributeError in plot/report (and on resume, in truncate_metrics), bytes that are
    not UTF-8 a UnicodeDecodeError in show/report/plot. Such lines are left out with one warning naming the file
    and how many; a torn last line (a kill mid-append) stays quiet."""
    from tunelab.rundir import RunDir

    run = make_run(tmp_path, "a", losses=(2.0, 1.5, 1.2, 1.1))
    _damaged_metrics(run)
    assert [s for s, _ in runs.curve(runs.read_metrics(run), "loss")] == [1, 2, 3, 4]
    for verb in (["show", "a"], ["plot", "a", "-o", str(tmp_path / "a.png")],
                 ["report", "a", "-o", str(tmp_path / "a.md")]):
        assert main(["runs", *verb, "--dir", str(tmp_path)]) == 0, capsys.readouterr().err
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and warned[0].startswith(f"{run / 'metrics.jsonl'}: 3 lines skipped")

    RunDir(run).truncate_metrics(2)  # a resume from checkpoint-2
    assert [(r["step"], "loss" in r) for r in runs.read_metrics(run)] == [(1, True), (2, True)]

    caplog.clear()
    torn = make_run(tmp_path, "torn")
    with open(torn / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    assert len(runs.read_metrics(torn)) == 5 and not caplog.records


def test_a_run_whose_process_is_gone_lists_as_stale(tmp_path, capsys):
    """`runs list` said `running` for a run killed outright (its manifest never written again); the web UI calls
    it `stale` by the recorded pid and its start time, and so does the CLI now, by the same function."""
    import subprocess
    import sys

    from tunelab.rundir import process_started

    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    for name, owner in (("killed", {"pid": gone.pid, "pid_started": 1.0}),
                        ("live", {"pid": os.getpid(), "pid_started": process_started()}),
                        ("old", {})):  # made before runs recorded their process: cannot tell, shown as written
        run = make_run(tmp_path, name, status="running")
        manifest = json.loads((run / "manifest.json").read_text())
        (run / "manifest.json").write_text(json.dumps({**manifest, **owner}))
    assert {s.name: s.status for s in runs.list_runs(tmp_path)} == {"killed": "stale", "live": "running",
                                                                    "old": "running"}
    assert main(["runs", "list", "--dir", str(tmp_path)]) == 0
    assert "stale" in capsys.readouterr().out
    assert main(["runs", "show", "killed", "--dir", str(tmp_path)]) == 0
    assert "its process is gone" in capsys.readouterr().out


def test_a_file_name_that_is_not_utf8_is_written_into_the_manifest(tmp_path):
    """data.train = b'\\xff.jsonl' (a str with a surrogate escape in Python) crashed training in
    write_json_atomic; it is escaped there, and other text stays readable."""
    from tunelab.rundir import write_json_atomic

    data = {"data": {"source": os.fsdecode(b"/data/\xff.jsonl"), "note": "café"}}
    write_json_atomic(tmp_path / "manifest.json", data)
    assert json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8")) == data


def test_report_of_a_killed_run_shows_its_logged_steps_and_checkpoints(tmp_path, capsys):
    """A run killed outright (no global_step or duration in its manifest) read `steps | —` and `duration | 0 s`
    although metrics.jsonl had its steps and a checkpoint was kept."""
    from tunelab.evaluate.report import write_run_report

    run = make_run(tmp_path, "killed", status="running", losses=(2.0, 1.8, 1.6, 1.5))
    manifest = json.loads((run / "manifest.json").read_text())
    for key in ("global_step", "duration_s", "ended_at"):
        manifest.pop(key)
    (run / "manifest.json").write_text(json.dumps(manifest))
    (run / "checkpoint-3").mkdir()
    text = write_run_report(run).read_text()
    assert "| steps | 4 (last logged) |" in text and "| checkpoints | checkpoint-3 |" in text
    assert "| duration | 3 s (last logged) |" in text and "0 s" not in text
    assert main(["runs", "show", str(run)]) == 0 and "4 (last logged)" in capsys.readouterr().out


def test_report_does_not_overwrite_a_file_it_did_not_write(tmp_path, capsys):
    make_run(tmp_path, "a")
    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\n")
    assert main(["runs", "report", "a", "--dir", str(tmp_path), "-o", str(notes)]) != 0
    assert notes.read_text() == "# my notes\n" and "not a report tunelab wrote" in capsys.readouterr().err
    for _ in range(2):  # its own report is rewritten
        assert main(["runs", "report", "a", "--dir", str(tmp_path), "-o", str(tmp_path / "r.md")]) == 0
    assert main(["runs", "report", "a", "--dir", str(tmp_path), "-o", str(notes), "--force"]) == 0
    assert notes.read_text().startswith("# Run report: a")
