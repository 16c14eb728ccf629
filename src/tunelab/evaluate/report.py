"""Reports people look at: the eval before/after table, and one Markdown or HTML page per run.

    tunelab runs report outputs/my-run                 # outputs/my-run/report.md (+ report/loss.png)
    tunelab runs report outputs/my-run -o rep/a.md     # rep/a.md (+ rep/a/loss.png: each report has its own)
    tunelab runs report outputs/my-run -o report.html  # one self-contained HTML file (plot embedded)

The run report holds the loss plot, the resolved config, the data summary, every evaluation (final metrics and
`eval/*.json`, with the BLEU tokeniser that was chosen), and a handful of base-vs-tuned sample answers from
`eval/*.predictions.jsonl` written by `tunelab eval --compare-base`.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any

METRIC_LABELS = {"perplexity": "Perplexity", "eval_loss": "Eval loss", "eval_tokens": "Eval tokens",
                 "train_loss": "Train loss", "bleu": "BLEU", "chrf": "chrF", "rouge_l": "ROUGE-L",
                 "exact_match": "Exact match (%)"}


def _f(v: Any) -> str:
    from tunelab.runs import fmt_num

    return "—" if v is None else fmt_num(v)


def before_after_rows(tuned: dict[str, float], base: dict[str, float] | None) -> list[tuple[str, str, str, str]]:
    """(metric, base, tuned, change) rows; the change is marked better/worse where the metric's direction is known."""
    from tunelab.runs import metric_direction

    rows = []
    for key in [k for k in METRIC_LABELS if k in tuned] + [k for k in tuned if k not in METRIC_LABELS]:
        t, b = tuned.get(key), (base or {}).get(key)
        change = ""
        if isinstance(t, (int, float)) and isinstance(b, (int, float)) and key != "eval_tokens":
            direction = metric_direction(key)
            better = (t < b) if direction == "min" else (t > b)
            mark = "" if t == b or direction is None else " (better)" if better else " (worse)"
            change = f"{t - b:+.4g}{mark}"
        rows.append((METRIC_LABELS.get(key, key), _f(b) if base is not None else "", _f(t), change))
    return rows


def eval_table(tuned: dict[str, float], base: dict[str, float] | None = None, title: str = "evaluation"):
    """A rich table: metrics alone, or base vs fine-tuned with the change."""
    from rich.table import Table

    t = Table(title=title)
    t.add_column("metric")
    if base is not None:
        t.add_column("base", justify="right")
    t.add_column("fine-tuned" if base is not None else "value", justify="right")
    if base is not None:
        t.add_column("change", justify="right")
    for metric, b, v, change in before_after_rows(tuned, base):
        colour = "green" if "better" in change else "red" if "worse" in change else "white"
        t.add_row(metric, b, v, f"[{colour}]{change}[/]") if base is not None else t.add_row(metric, v)
    return t


# ---------------------------------------------------------------- run report


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in rows]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in esc])


def _samples(run: Path, limit: int) -> list[dict[str, Any]]:
    """Sample answers from the newest predictions file, preferring one that holds base answers too."""
    files = sorted((run / "eval").glob("*.predictions.jsonl"), key=lambda p: p.stat().st_mtime, reverse=True)
    best: list[dict[str, Any]] = []
    for f in files:
        rows = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        if rows and "base_prediction" in rows[0]:
            return rows[:limit]
        best = best or rows[:limit]
    return best


def _progress(run: Path, s) -> list[list[str]]:
    """Duration, steps and checkpoints; a run killed outright never wrote its step count or duration into the
    manifest, so they are read from metrics.jsonl (marked as logged) rather than shown as 0 s and —."""
    from tunelab.runs import last_logged

    step, elapsed = (s.steps, s.duration_s) if s.steps is not None else last_logged(run)
    logged = " (last logged)" if s.steps is None and step is not None else ""
    duration = s.duration_s if s.duration_s is not None else elapsed
    checkpoints = sorted((p.name for p in run.glob("checkpoint-*") if p.is_dir()),
                         key=lambda n: (not n[11:].isdigit(), int(n[11:]) if n[11:].isdigit() else 0, n))
    return [["duration", "—" if duration is None else f"{duration:.0f} s{logged}"], ["steps", _f(step) + logged],
            ["checkpoints", ", ".join(checkpoints) or "—"]]


def _sections(run: Path, samples: int) -> dict[str, Any]:
    import yaml

    from tunelab.runs import eval_label, final_metrics, read_evals, read_manifest, read_metrics, summarize

    manifest = read_manifest(run)
    s = summarize(run, manifest)
    overview = [["status", f"{s.status}: {s.note}" if s.note else s.status], ["method", s.method],
                ["model", s.model], ["started", s.date], *_progress(run, s), ["seed", _f(manifest.get("seed"))],
                ["dtype", _f((manifest.get("dtype") or {}).get("name") if isinstance(manifest.get("dtype"), dict)
                             else manifest.get("dtype"))], ["git commit", _f(manifest.get("git_commit"))]]
    data = manifest.get("data") if isinstance(manifest.get("data"), dict) else {}
    data_rows = [[k, _f(v)] for k, v in data.items()] + [["fingerprint", _f(manifest.get("data_fingerprint"))]]
    prepared = Path(str(data.get("folder", run / "data"))) / "report.json"
    if prepared.is_file():
        rep = json.loads(prepared.read_text(encoding="utf-8"))
        data_rows += [[k, _f(rep.get(k))] for k in ("records_read", "records_accepted", "records_rejected",
                                                   "duplicates_removed") if k in rep]
    evals = [("final (training)", final_metrics(manifest), None, None)]
    for name, ev in read_evals(run).items():
        evals.append((f"eval/{eval_label(name, ev)}", ev.get("metrics") or {}, ev.get("base_metrics"),
                      (ev.get("tokenizer_choice") or {}).get("bleu_tokenize_reason")))
    config_text = (run / "config.yaml").read_text(encoding="utf-8") if (run / "config.yaml").is_file() \
        else yaml.safe_dump({})
    return {"name": manifest.get("run_name") or run.name, "overview": overview, "data": data_rows, "evals": evals,
            "config": config_text, "samples": _samples(run, samples), "has_curve": bool(read_metrics(run))}


def _plot(run: Path, image: Path) -> Path | None:
    from tunelab.runs import RunError, plot_runs

    try:
        return plot_runs([run], "loss", image, title=f"loss: {run.name}")
    except RunError:
        return None


def _refuse_foreign(out: Path) -> None:
    """A file at `out` that is not a run report (notes.md, someone's page) is not replaced unasked: -o names a
    path, and a report of tunelab's own is the only thing it rewrites."""
    from tunelab.runs import RunError

    if not out.exists():
        return
    try:
        with open(out, encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
    except OSError:
        head = ""
    if not (head.startswith("# Run report: ") or (head.startswith("<!doctype html>") and "<h1>Run report: " in head)):
        raise RunError(f"{out} exists and is not a report tunelab wrote; choose another -o, or pass --force to "
                       "replace it")


def write_run_report(run: str | os.PathLike, output: str | os.PathLike | None = None, fmt: str | None = None,
                     samples: int = 5, runs_dir: str | os.PathLike = "outputs", force: bool = False) -> Path:
    """Write `<run>/report.md` (or .html, or `output`) and return its path (`force`: replace a file there that is
    not a run report)."""
    from tunelab.runs import resolve_run

    run = resolve_run(run, runs_dir)
    fmt = fmt or (Path(output).suffix.lstrip(".").lower() if output else "md")
    fmt = {"markdown": "md", "htm": "html"}.get(fmt, fmt)
    if fmt not in ("md", "html"):
        from tunelab.runs import RunError

        raise RunError(f"report format must be md or html, not {fmt!r}")
    out = Path(output) if output else run / f"report.{fmt}"
    if not force:
        _refuse_foreign(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sec = _sections(run, samples)
    if fmt == "md":  # the image is named after the report, so another report in the same folder keeps its own
        plot = _plot(run, out.parent / out.stem / "loss.png") if sec["has_curve"] else None
        text = _markdown(sec, plot, out)
    else:  # the page embeds the image: it is drawn in a scratch folder, and no file is left to go stale
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            text = _html(sec, _plot(run, Path(tmp) / "loss.png") if sec["has_curve"] else None)
    out.write_text(text, encoding="utf-8")
    return out


def _markdown(sec: dict[str, Any], plot: Path | None, out: Path) -> str:
    parts = [f"# Run report: {sec['name']}", "", _md_table(["", ""], sec["overview"]), ""]
    if plot is not None:
        parts += ["## Loss", "", f"![loss curves]({os.path.relpath(plot, out.parent)})", ""]
    parts += ["## Evaluation", ""]
    for title, tuned, base, reason in sec["evals"]:
        if not tuned:
            continue
        parts += [f"### {title}", ""]
        rows = before_after_rows(tuned, base)
        if base is not None:
            parts.append(_md_table(["metric", "base", "fine-tuned", "change"], [list(r) for r in rows]))
        else:
            parts.append(_md_table(["metric", "value"], [[r[0], r[2]] for r in rows]))
        if reason:
            parts += ["", f"BLEU tokenisation: {reason}."]
        parts.append("")
    if sec["samples"]:
        parts += ["## Sample answers", ""]
        for i, s in enumerate(sec["samples"], 1):
            parts += [f"**{i}. Prompt:** {s.get('prompt', '')}", "", f"- reference: {s.get('reference', '')}"]
            if "base_prediction" in s:
                parts.append(f"- base: {s['base_prediction'] or '(empty)'}")
            parts += [f"- fine-tuned: {s.get('prediction') or '(empty)'}", ""]
    parts += ["## Data", "", _md_table(["", ""], sec["data"]), "", "## Config", "", "```yaml",
              sec["config"].rstrip(), "```", ""]
    return "\n".join(parts)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html(sec: dict[str, Any], plot: Path | None) -> str:
    e = html.escape
    parts = [f"<h1>Run report: {e(sec['name'])}</h1>", _html_table(["", ""], sec["overview"])]
    if plot is not None:
        data = base64.b64encode(plot.read_bytes()).decode()
        parts += ["<h2>Loss</h2>", f'<img alt="loss curves" src="data:image/png;base64,{data}">']
    parts.append("<h2>Evaluation</h2>")
    for title, tuned, base, reason in sec["evals"]:
        if not tuned:
            continue
        rows = before_after_rows(tuned, base)
        parts.append(f"<h3>{e(title)}</h3>")
        parts.append(_html_table(["metric", "base", "fine-tuned", "change"], [list(r) for r in rows])
                     if base is not None else _html_table(["metric", "value"], [[r[0], r[2]] for r in rows]))
        if reason:
            parts.append(f"<p>BLEU tokenisation: {e(reason)}.</p>")
    if sec["samples"]:
        parts.append("<h2>Sample answers</h2>")
        for s in sec["samples"]:
            rows = [["prompt", s.get("prompt", "")], ["reference", s.get("reference", "")]]
            if "base_prediction" in s:
                rows.append(["base", s["base_prediction"]])
            rows.append(["fine-tuned", s.get("prediction", "")])
            parts.append(_html_table(["", ""], rows))
    parts += ["<h2>Data</h2>", _html_table(["", ""], sec["data"]), "<h2>Config</h2>",
              f"<pre>{e(sec['config'])}</pre>"]
    style = ("body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;"
             "text-align:left;vertical-align:top}pre{background:#f6f6f6;padding:1em;overflow:auto}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(sec['name'])}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
