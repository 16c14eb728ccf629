"""Nothing crashes on any input: damaged files end as located rejections or one clear DataError."""

from __future__ import annotations

import json
import random

import pytest

from tunelab.data.prepare import DataError, prepare_dataset

from data_helpers import alpaca, jsonl, quiet

VALID = {
    "json": json.dumps([alpaca(1), {"conversations": [{"from": "human", "value": "héllo"},
                                                      {"from": "gpt", "value": "hi ☕"}], "tools": "[]"},
                        alpaca(2, history=[["a", "b"]])], ensure_ascii=False, indent=1).encode(),
    "jsonl": jsonl([alpaca(1), {"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a"}]}]).encode(),
    "csv": "instruction,input,output\nq1,,a1\n\"multi\nline\",x,a2\n".encode(),
}


def run(path):
    try:
        r = prepare_dataset(str(path), check=True, console=quiet)
    except DataError as e:
        assert str(e)
        return None
    rep = r.report
    assert rep["records_read"] == rep["records_accepted"] + rep["records_rejected"] + rep["duplicates_removed"]
    return r


@pytest.mark.parametrize("kind", sorted(VALID))
def test_random_damage_never_crashes(write, kind):
    rng = random.Random(kind)
    data = VALID[kind]
    for i in range(60):
        b = bytearray(data)
        op = i % 4
        if op == 0:
            b = b[: rng.randrange(len(b))]  # truncated
        elif op == 1:
            for _ in range(3):
                b[rng.randrange(len(b))] = rng.randrange(256)  # flipped bytes (invalid UTF-8 too)
        elif op == 2:
            pos = rng.randrange(len(b))
            b[pos:pos] = rng.choice([b",", b"]", b"}", b'"', b"\n", b"\x00", b"\xff\xfe", b"{", b"\r\n"])
        else:
            pos = rng.randrange(len(b))
            del b[pos: pos + rng.randrange(1, 20)]
        run(write(f"f{i}.{kind}", bytes(b)))


@pytest.mark.parametrize("content", [
    b"[" * 100000, b'{"instruction": ' + b"[" * 100000,
    jsonl([{"instruction": "q", "output": "a", "tools": [[[[[[[[[[{"x": 1}]]]]]]]]]]}]).encode(),
    jsonl([{"conversations": [{"from": None, "value": 1}, {"role": ["x"], "content": {"a": 1}}]}]).encode(),
    jsonl([{"messages": "not a list"}, {"messages": [None]}, {"messages": [{"role": "user", "content": [1, 2]}]}]
          ).encode(),
    jsonl([{"instruction": "q", "output": float("nan")}, 42, "text", None, [], {}]).encode(),
    b'\xef\xbb\xbf', b"\xff\xfe", b"\xff\xfe{\x00", "instruction,output\n".encode(),
    b'"only a string"', b"123", b"null",
])
def test_nasty_inputs(write, content):
    run(write("nasty.json", content))
