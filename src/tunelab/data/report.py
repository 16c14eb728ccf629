"""What `prepare` tells a person: token statistics, the length histogram (terminal and PNG) and report.md.

Everything here reads the report dict built by `tunelab.data.prepare`; nothing here decides what is accepted.
"""

from __future__ import annotations

import math
from array import array
from pathlib import Path
from typing import Any


def percentile(sorted_values: list[int] | array, q: float) -> int:
    """Nearest-rank percentile (q in 0..100) of an already sorted sequence."""
    if not sorted_values:
        return 0
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return int(sorted_values[k])


def histogram(lengths: list[int] | array, max_length: int, bins: int = 12) -> dict[str, list[int]]:
    """Equal-width bins from 0 to max(longest, max_length), so the max_length mark always falls inside."""
    top = max(max(lengths, default=0), max_length, 1)
    width = max(1, math.ceil(top / bins))
    counts = [0] * bins
    for n in lengths:
        counts[min(bins - 1, n // width)] += 1
    return {"edges": [i * width for i in range(bins + 1)], "counts": counts}


def token_stats(lengths: array, trained: array, max_length: int, counters: dict[str, int],
                tokenizer_name: str) -> dict[str, Any]:
    s = sorted(lengths)
    return {
        "tokenizer": tokenizer_name,
        "records": len(s),
        "p50": percentile(s, 50), "p95": percentile(s, 95), "max": s[-1] if s else 0,
        "mean": round(sum(s) / len(s), 1) if s else 0,
        "max_length": max_length,
        "trained_tokens": int(sum(trained)),
        **counters,
        "histogram": histogram(s, max_length),
    }


def histogram_lines(hist: dict[str, list[int]], max_length: int, width: int = 40) -> list[str]:
    edges, counts = hist["edges"], hist["counts"]
    peak = max(counts, default=0) or 1
    out = []
    for i, c in enumerate(counts):
        lo, hi = edges[i], edges[i + 1]
        bar = "█" * max(1 if c else 0, round(c / peak * width))
        mark = "  ◀ max_length" if lo < max_length <= hi else ""
        out.append(f"  {lo:>6}–{hi - 1:<6} {bar:<{width}} {c}{mark}")
    return out


def write_histogram_png(hist: dict[str, list[int]], max_length: int, path: Path, title: str) -> None:
    # The object API with the Agg canvas: no global backend switch, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    edges, counts = hist["edges"], hist["counts"]
    ax.bar(edges[:-1], counts, width=[edges[i + 1] - edges[i] for i in range(len(counts))], align="edge",
           color="#4c72b0", edgecolor="white")
    ax.axvline(max_length, color="#c44e52", linestyle="--", label=f"max_length = {max_length}")
    ax.set_xlabel("tokens per record (after the chat template)")
    ax.set_ylabel("records")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def conservation_line(r: dict[str, Any]) -> str:
    return (f"{r['records_read']} read = {r['records_accepted']} accepted + {r['records_rejected']} rejected + "
            f"{r['duplicates_removed']} duplicates removed")


def formats_text(formats: dict[str, int], first: dict[str, str]) -> str:
    """``alpaca 3 (first at line 1), sharegpt 2 (first at line 4)``: a file's record formats."""
    return ", ".join(f"{fmt} {n} (first at {first[fmt]})" if fmt in first else f"{fmt} {n}"
                     for fmt, n in formats.items())


def _table(rows: list[tuple], header: tuple) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(x).replace("|", "\\|") for x in row) + " |" for row in rows]
    return out


def markdown(r: dict[str, Any]) -> str:
    """report.md: the same facts as report.json, for a person."""
    lines = [f"# Prepared dataset: {r['name']}", "",
             f"**{'Usable' if r['usable'] else 'NOT usable'}** — {conservation_line(r)}.", ""]
    for p in r.get("problems", []):
        lines.append(f"- problem: {p}")
    lines += ["", f"Split: {r['split']['train']} train / {r['split']['val']} validation ({r['split']['how']}).",
              "", f"Fingerprint: `{r['fingerprint']}`", "", "## Inputs", ""]
    lines += _table([(f["path"], f["role"], f["container"], f["encoding"],
                      formats_text(f.get("formats", {}), f.get("format_first", {})) or "-", f["records_read"],
                      f["accepted"], f["rejected"], f["duplicates"]) for f in r["files"]],
                    ("file", "role", "container", "encoding", "formats", "read", "accepted", "rejected",
                     "duplicates"))
    if r.get("skipped_files"):
        lines += ["", f"**Not read**: {len(r['skipped_files'])} file(s) in the input folders are not data files: "
                  + ", ".join(f"`{x}`" for x in r["skipped_files"]) + "."]
    mixed = [f for f in r["files"] if len(f.get("formats", {})) > 1]
    if mixed:
        lines += ["", f"**Mixed formats** in {len(mixed)} file(s): each record was read by its own format; "
                  "use `--format` to insist on one, or split the file."]
    if r["rejected_by_reason"]:
        lines += ["", "## Rejected records", "", "Every rejected record is in `rejected.jsonl` with its raw text.", ""]
        lines += _table(sorted(r["rejected_by_reason"].items(), key=lambda kv: -kv[1]), ("reason", "records"))
        lines += ["", "First rejections:", ""]
        lines += [f"- `{x['source']}` {x['location']}: {x['reason']}" for x in r["rejected_examples"][:20]]
    if r["warnings"]:
        lines += ["", "## Warnings", ""]
        lines += _table([(k, v, "; ".join(r["warning_examples"].get(k, [])[:3])) for k, v in r["warnings"].items()],
                        ("warning", "records", "examples"))
    if r["normalisations"]:
        lines += ["", "## Normalisations", ""]
        lines += _table(sorted(r["normalisations"].items(), key=lambda kv: -kv[1]), ("what", "count"))
    ts = r.get("token_stats")
    if ts:
        lines += ["", "## Tokens", "", f"Tokenizer `{ts['tokenizer']}`, with its chat template.", ""]
        keys = ["records", "p50", "p95", "max", "mean", "max_length", "over_max_length", "truncated", "dropped",
                "kept_over_max_length", "nothing_to_train", "trained_tokens"]
        lines += _table([(k, ts[k]) for k in keys if k in ts], ("statistic", "value"))
        lines += ["", "![length histogram](length_histogram.png)", "", "```"]
        lines += histogram_lines(ts["histogram"], ts["max_length"]) + ["```"]
    lines += _stage_token_lines(r)
    lines += ["", "## Options", "", "```json"]
    import json

    lines += [json.dumps(r["options"], indent=2, ensure_ascii=False), "```", ""]
    return "\n".join(lines)


def _stage_token_lines(r: dict[str, Any]) -> list[str]:
    """Token sections of the stages that do not read conversations: pt (text_stats), preference (preference_stats)."""
    lines: list[str] = []
    text = r.get("text_stats")
    if text:
        from tunelab.data.text import markdown_lines

        lines += ["", "## Text (continued pretraining)", "",
                  "Each document ends with EOS; documents longer than max_length are split into pieces; pieces are "
                  "packed whole, in order, into blocks of at most max_length tokens, each piece attending only to "
                  "itself.", ""]
        lines += _table(markdown_lines(text), ("statistic", "value"))
    pref = r.get("preference_stats")
    if pref:
        lines += ["", "## Preference tokens", "",
                  f"After the chat template; answers after the train-time cut to max_length={pref['max_length']}: "
                  f"{pref['truncated']} of {pref['records']} records ({pref['truncated_share']:.1%}) had their "
                  f"answers cut ({pref['answer_tokens_cut']} tokens).", ""]
        lines += _table([(part, v["p50"], v["p95"], v["max"], v["mean"], v["tokens"])
                         for part, v in pref["parts"].items()], ("part", "p50", "p95", "max", "mean", "tokens"))
    return lines
