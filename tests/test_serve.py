"""The OpenAI-compatible server, exercised with the official `openai` client against a real uvicorn server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

KEY = "test-key"
NAME = "tiny-tuned"
HELLO = [{"role": "user", "content": "Tell me a story about a dragon"}]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny model with larger random weights, so that answers differ by prompt (see test_infer)."""
    import torch

    from tunelab.infer import load

    model, tok = load(str(tiny_model_dir), dtype="fp32")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model, tok


@pytest.fixture(scope="module")
def server(tiny):
    from tunelab.serve import create_app

    model, tok = tiny
    app = create_app(model, tok, NAME, api_key=KEY, max_tokens_limit=64)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held open so nobody else takes it
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=30)
    sock.close()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


def expected(tiny, messages, n):
    from tunelab.infer import generate

    return generate(*tiny, [messages], max_new_tokens=n)[0]


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_completion_equals_library_generation(client, tiny):
    r = client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=10)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content.strip() == expected(tiny, HELLO, 10)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 10 and r.usage.prompt_tokens > 5


def test_chat_streaming_matches_non_streaming(client):
    full = client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=10).choices[0].message.content
    stream = client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10


def test_completions_stream_and_not(client):
    r = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=6)
    assert r.object == "text_completion" and r.choices[0].text and r.usage.completion_tokens == 6
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt="Once upon a time", max_tokens=6, stream=True) if c.choices)
    assert streamed == r.choices[0].text
    two = client.completions.create(model=NAME, prompt=["Once upon a time", "Hello"], max_tokens=3)
    assert [c.index for c in two.choices] == [0, 1]


def test_stop_strings_cut_the_answer(client, tiny):
    full = expected(tiny, HELLO, 12)
    word = full.split()[2]
    r = client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=12, stop=[word])
    assert r.choices[0].finish_reason == "stop"
    assert word not in r.choices[0].message.content and full.startswith(r.choices[0].message.content.strip())
    s = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=NAME, messages=HELLO, max_tokens=12, stop=word, stream=True) if c.choices)
    assert s == r.choices[0].message.content


def test_errors_are_openai_shaped_4xx_and_server_survives(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=100_000)
    assert "max_tokens" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[], max_tokens=3)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="x " * 5000, max_tokens=3)  # longer than the context
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    raw = httpx.post(server + "/v1/chat/completions", content=b'{"model": "tiny-tuned", "messages": [',
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    nokey = httpx.get(server + "/v1/models")
    assert nokey.status_code == 401 and nokey.json()["error"]["code"] == "invalid_api_key"
    wrong_type = httpx.post(server + "/v1/chat/completions", json={"model": NAME, "messages": "hi"},
                            headers={"Authorization": f"Bearer {KEY}"})
    assert wrong_type.status_code == 400 and "messages" in wrong_type.json()["error"]["message"]
    missing = httpx.get(server + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert missing.status_code == 404 and "error" in missing.json()
    assert client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=2).choices[0].message.content


def test_client_that_disconnects_mid_stream_does_not_block_the_next(client):
    stream = client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=60, stream=True)
    next(iter(stream))
    stream.close()
    t0 = time.time()
    r = client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=2)
    assert r.choices[0].message.content is not None and time.time() - t0 < 60


def test_twenty_concurrent_clients(server, tiny):
    want = expected(tiny, HELLO, 6)

    def one(i):
        c = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)
        if i % 2:
            return "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
                model=NAME, messages=HELLO, max_tokens=6, stream=True) if ch.choices).strip()
        return c.chat.completions.create(model=NAME, messages=HELLO, max_tokens=6).choices[0].message.content.strip()

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(one, range(20), timeout=240))
    assert answers == [want] * 20
    assert httpx.get(server + "/health").json()["status"] == "ok"


def test_cli_serve_subprocess(tiny_model_dir, tmp_path):
    """`tunelab serve` starts, answers with the key, refuses without it, and stops on SIGTERM."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", "--model", str(tiny_model_dir), "--port",
                             str(port), "--api-key", "k", "--model-name", "m", "--dtype", "fp32"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
            assert proc.poll() is None, proc.stdout.read()
        c = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0)
        assert c.chat.completions.create(model="m", messages=HELLO, max_tokens=3).usage.completion_tokens <= 3
        assert httpx.get(base + "/v1/models").status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)
