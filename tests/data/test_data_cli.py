"""`tunelab prepare`, `tunelab validate` and prepare_data.py: exit codes, messages, light imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.cli import main
from tunelab.cli.prepare import parse_map

from data_helpers import alpaca, jsonl

REPO = Path(__file__).resolve().parents[2]


def test_parse_map():
    assert parse_map("instruction=question, output=answer") == {"instruction": "question", "output": "answer"}
    assert parse_map(None) is None
    with pytest.raises(Exception, match="name=column"):
        parse_map("instruction")


def test_prepare_exit_0_and_folder(write, tmp_path, capsys):
    src = write("raw.csv", "question,answer\nq1,a1\nq2,a2\nq3,a3\n")
    rc = main(["prepare", "--input", str(src), "--no-tokenizer", "--map", "instruction=question,output=answer",
               "--output", str(tmp_path / "out"), "--val-ratio", "0.34"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "records: 3 read = 3 accepted + 0 rejected + 0 duplicates removed" in out
    assert "split: 2 train / 1 val" in out
    assert json.loads((tmp_path / "out" / "report.json").read_text())["options"]["column_map"] == {
        "instruction": "question", "output": "answer"}


def test_validate_exit_codes(write, capsys):
    good = write("good.jsonl", jsonl([alpaca(1), alpaca(2)]))
    bad = write("bad.jsonl", jsonl([{"instruction": "q"}]))
    assert main(["validate", str(good), "--no-tokenizer"]) == 0
    assert main(["validate", str(bad), "--no-tokenizer"]) == 1
    assert "NOT USABLE: no record was accepted" in capsys.readouterr().out
    mixed = write("mixed.jsonl", jsonl([alpaca(1), {"instruction": "q"}]))
    assert main(["validate", str(mixed), "--no-tokenizer"]) == 0
    assert main(["validate", str(mixed), "--no-tokenizer", "--max-reject-ratio", "0"]) == 1


def test_whole_file_error_is_exit_2_without_traceback(write, capsys):
    trunc = write("t.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"')
    assert main(["validate", str(trunc), "--no-tokenizer"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "line 3, column 22" in err and "truncated" in err
    assert "Traceback" not in err


def test_validate_writes_nothing(write, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(write("g.jsonl", jsonl([alpaca(1)]))), "--no-tokenizer"]) == 0
    assert not (tmp_path / "data").exists()


def test_token_stats_and_samples_with_a_tokenizer_folder(write, tokenizer_dir, capsys):
    src = write("g.jsonl", jsonl([alpaca(1), alpaca(2)]))
    assert main(["validate", str(src), "--model", str(tokenizer_dir), "--show-samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "tokens (" in out and "p50" in out and "[[answer 1<|im_end|>" in out


def test_cli_modules_import_light():
    code = ("import sys, tunelab.cli, tunelab.cli.prepare, tunelab.cli.validate; "
            "print([m for m in ('torch', 'transformers', 'pandas', 'pyarrow', 'matplotlib', 'tunelab.data.prepare')"
            " if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_prepare_data_script_is_the_verb(write, tmp_path):
    src = write("my_data.json", [alpaca(1), alpaca(2), alpaca(3)])
    res = subprocess.run([sys.executable, str(REPO / "prepare_data.py"), "--input", str(src), "--format", "alpaca",
                          "--no-tokenizer"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "data" / "processed" / "my_data" / "train.jsonl").is_file()
