"""The server's limits and failure modes, in process (FastAPI's TestClient): caps, auth, generic 500s, a fuzzer."""

from __future__ import annotations

import gc
import json
import random
import tracemalloc

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

KEY = "k"
NAME = "tiny"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 2}
COMPLETE = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 2}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from tunelab.infer import load

    return load(str(tiny_model_dir), dtype="fp32")


@pytest.fixture(scope="module")
def client(tiny):
    from tunelab.serve import create_app

    app = create_app(*tiny, NAME, api_key=KEY, max_tokens_limit=32, max_body_bytes=4096, max_messages=4,
                     max_prompts=3, context_length=256)
    with TestClient(app, headers=AUTH) as c:  # `with`: runs the lifespan, which starts the engine
        yield c


def is_openai_error(r, status: int) -> bool:
    err = r.json()["error"]
    return r.status_code == status and set(err) == {"message", "type", "param", "code"} and err["message"]


def test_cli_limits_mirror_the_settings():
    from tunelab.cli.serve import LIMITS
    from tunelab.serve import ServeSettings

    fields = ServeSettings.model_fields
    assert set(LIMITS) == set(fields) - {"api_key"}
    for name, (default, text) in LIMITS.items():
        assert (default, text) == (fields[name].default, fields[name].description), name


def test_limits_answer_400_or_413_in_openai_shape(client):
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    r = client.post("/v1/chat/completions", json={**CHAT, "messages": CHAT["messages"] * 5})
    assert is_openai_error(r, 400) and r.json()["error"]["code"] == "too_many_messages"
    r = client.post("/v1/completions", json={**COMPLETE, "prompt": ["a", "b", "c", "d"]})
    assert is_openai_error(r, 400) and r.json()["error"]["code"] == "too_many_prompts"
    r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 33})
    assert is_openai_error(r, 400) and r.json()["error"]["code"] == "max_tokens_exceeded"
    r = client.post("/v1/completions", json={**COMPLETE, "prompt": "word " * 300, "max_tokens": 1})
    assert is_openai_error(r, 400) and r.json()["error"]["code"] == "context_length_exceeded"
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    r = client.post("/v1/chat/completions", json=big)
    assert is_openai_error(r, 413) and r.json()["error"]["code"] == "request_too_large"
    chunked = client.post("/v1/chat/completions", content=iter([json.dumps(big).encode()]),  # no Content-Length
                          headers={"Content-Type": "application/json"})
    assert is_openai_error(chunked, 413)
    r = client.post("/v1/chat/completions", json={**CHAT, "temprature": 0.5})
    assert is_openai_error(r, 400) and "did you mean 'temperature'" in r.json()["error"]["message"]
    assert client.post("/v1/completions", json={**COMPLETE, "prompt": ["a", "b", "c"]}).status_code == 200


def test_api_key_guards_every_route_but_health(client):
    for path in ("/docs", "/redoc", "/openapi.json", "/v1/models", f"/v1/models/{NAME}", "/v1/nothing"):
        r = client.get(path, headers={"Authorization": ""})
        assert is_openai_error(r, 401) and r.json()["error"]["code"] == "invalid_api_key", path
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
    assert client.get("/openapi.json").status_code == 200 and client.get("/docs").status_code == 200
    assert client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": ""}).status_code == 401
    assert client.get("/health", headers={"Authorization": ""}).json()["status"] == "ok"


class _Exploding:
    """A tokenizer stand-in that fails in a way no client can cause, with a detail that must not leak."""

    def __init__(self, tok):
        self.tok = tok

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __call__(self, *args, **kwargs):
        raise RuntimeError("secret detail: /home/someone/model.bin")


def test_500_bodies_are_generic_and_details_go_to_the_log(tiny, caplog):
    from tunelab.serve import create_app

    model, tok = tiny
    app = create_app(model, tok, NAME)
    with TestClient(app, raise_server_exceptions=False) as c:
        app.state.tokenizer = _Exploding(tok)
        r = c.post("/v1/completions", json=COMPLETE)
        assert is_openai_error(r, 500) and r.json()["error"]["type"] == "server_error"
        assert "secret" not in r.text and "RuntimeError" not in r.text
        assert "secret detail" in caplog.text  # the log has what the client does not
        app.state.tokenizer = tok
        assert c.post("/v1/completions", json=COMPLETE).status_code == 200


def test_a_failing_model_fails_its_requests_not_the_server(tiny):
    from tunelab.serve import create_app

    model, tok = tiny

    def explode(*args):
        raise RuntimeError("secret detail")

    app = create_app(model, tok, NAME)
    with TestClient(app, raise_server_exceptions=False) as c:
        hook = model.register_forward_pre_hook(explode)
        try:
            r = c.post("/v1/chat/completions", json=CHAT)
            s = c.post("/v1/chat/completions", json={**CHAT, "stream": True})
        finally:
            hook.remove()
        assert is_openai_error(r, 500) and "secret" not in r.text
        assert s.status_code == 200 and '"server_error"' in s.text and "secret" not in s.text
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200


# ---------------------------------------------------------------- fuzzing

# values of the wrong type, or out of range, for each field (every one of them must be refused)
BAD_VALUES = {
    "model": [1, None, [], {"a": 1}, True],
    "messages": ["hi", 3, [], [1], [{"role": "user"} for _ in range(9)], [{"role": "wizard", "content": "x"}],
                 [{"role": "user", "content": 5}], [{"role": "user", "content": "x", "tool_calls": []}],
                 [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]],
    "prompt": [3, None, [], [1, 2], {"p": "x"}, ["a"] * 9, ""],
    "max_tokens": [-1, 0, 10**30, 2.5, "5", True, [], 1e308],
    "temperature": [-0.1, 3, 1e308, "hot", []],
    "top_p": [0, -1, 1.5, "x"],
    "n": [2, 0, -3, 10**20, "1"],
    "stream": ["yes", 1, {}],
    "stop": [5, [1], ["a", "b", "c", "d", "e"], {"x": 1}],
    "repetition_penalty": [0, -1, 1e300, "x"],
    "presence_penalty": [0.5, "x"],
    "logprobs": [True, "x"],
    "stream_options": ["x", {"include_usage": "yes"}, {"bogus": 1}],
    "seed": ["x", 1.5],
}


def _fuzz_case(rng: random.Random) -> tuple[str, bytes]:
    chat = rng.random() < 0.5
    path, body = ("/v1/chat/completions", dict(CHAT)) if chat else ("/v1/completions", dict(COMPLETE))
    kind = rng.choice(["malformed", "wrong", "unknown", "utf8", "nested"])
    if kind == "malformed":
        text = json.dumps(body)
        return path, rng.choice([text[:rng.randrange(len(text))], text + ",", "{" * rng.randint(1, 50), "",
                                 "nul", "[1, 2", text.replace(":", "=", 1), "\x00" * 5]).encode()
    if kind == "wrong":
        field = rng.choice([f for f in BAD_VALUES if f != ("prompt" if chat else "messages")])
        body[field] = rng.choice(BAD_VALUES[field])
    elif kind == "unknown":
        body["".join(rng.choice("abcxyz_") for _ in range(rng.randint(1, 12))) + "_x"] = rng.random()
    elif kind == "nested":
        body = {"model": NAME} if rng.random() < 0.5 else [body]
    else:  # invalid UTF-8 inside an otherwise good body
        text = json.dumps(body).encode()
        cut = rng.randrange(1, len(text) - 1)
        return path, text[:cut] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80"]) + text[cut:]
    return path, json.dumps(body).encode()


def test_fuzzed_requests_get_4xx_json_and_memory_stays_flat(client):
    """1,000 malformed requests after a warm-up: every answer is a 4xx OpenAI error, Python memory does not grow."""
    rng = random.Random(1234)
    headers = {**AUTH, "Content-Type": "application/json"}

    def send(n):
        for _ in range(n):
            path, raw = _fuzz_case(rng)
            r = client.post(path, content=raw, headers=headers)
            assert 400 <= r.status_code < 500 and is_openai_error(r, r.status_code), (path, raw, r.text)

    send(200)  # warm-up: first-use caches of pydantic, FastAPI and the tokenizer
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        send(1000)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 1 << 20, f"{grown} bytes more after 1,000 bad requests"
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200  # still serving
    assert client.get("/health").json()["active"] == 0
