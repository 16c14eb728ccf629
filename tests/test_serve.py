"""The OpenAI-compatible server, exercised with the official `openai` client against a real uvicorn server."""

from __future__ import annotations

import os
import signal
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


def tiny_with_big_weights(tiny_model_dir):
    """The tiny model with larger random weights, so that answers differ by prompt (see test_infer); fp32 pinned."""
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
def tiny(tiny_model_dir):
    return tiny_with_big_weights(tiny_model_dir)


def start_server(app):
    """Run `app` under uvicorn in a thread on a free 127.0.0.1 port; returns (base url, stop function)."""
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

    def stop():
        srv.should_exit = True
        thread.join(timeout=30)
        sock.close()

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="module")
def served(tiny):
    """(base url, app) of a real uvicorn server over the tiny model, with an API key."""
    from tunelab.serve import create_app

    model, tok = tiny
    app = create_app(model, tok, NAME, api_key=KEY, max_tokens_limit=64)
    base, stop = start_server(app)
    yield base, app
    stop()


@pytest.fixture(scope="module")
def server(served):
    return served[0]


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


PROMPTS = ["Tell me a story about a dragon", "Hi", "What is the capital of France?", "2+2?",
           "Write a long poem about the sea, the wind and the lighthouse keeper's daughter, please", "Why?",
           "Name three colours", "Explain batching in one sentence, with an example from a bakery."]


def ask(base: str, i: int) -> tuple[str, str, int]:
    """Request number i: its own prompt length, max_tokens, stop string, streaming or not, greedy or seeded."""
    c = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
    kw: dict = dict(model=NAME, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    max_tokens=3 + (i * 7) % 20)
    if i % 4 == 3:
        kw.update(temperature=0.9, top_p=0.9, seed=i)  # sampled: the row's own generator, seeded
    if i % 5 == 4:
        kw.update(stop=[" the", "a"])
    if i % 2:
        chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
        return text, reasons[-1], chunks[-1].usage.completion_tokens
    r = c.chat.completions.create(**kw)
    return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens


def test_concurrent_requests_are_batched_and_answer_as_they_would_alone(served, tiny):
    """16 requests decoded together (left padding, per-row positions, max_tokens, stops, sampling) equal each alone."""
    base, app = served
    alone = [ask(base, i) for i in range(16)]
    engine = app.state.engine
    steps_before = engine.stats["steps"]
    # each forward a little slower, so that the 16 are surely in flight together on any machine
    hook = tiny[0].register_forward_pre_hook(lambda *args: time.sleep(0.005))
    try:
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda i: ask(base, i), range(16), timeout=240))
    finally:
        hook.remove()
    assert together == alone
    assert {a[1] for a in alone} >= {"length"} and all(a[2] >= 1 for a in alone)
    one_by_one_steps = sum(a[2] - 1 for a in alone)  # the first token of each comes from its prefill
    assert engine.stats["steps"] - steps_before < one_by_one_steps / 2  # rows shared decode steps


@pytest.fixture(scope="module")
def slow_served(tiny_model_dir):
    """A server whose model takes 20 ms per forward, 2 batch rows + 2 queue slots: easy to fill and keep full."""
    from tunelab.serve import create_app

    model, tok = tiny_with_big_weights(tiny_model_dir)
    model.register_forward_pre_hook(lambda *args: time.sleep(0.02))
    app = create_app(model, tok, NAME, max_tokens_limit=1000, max_batch_size=2, max_queue=2)
    base, stop = start_server(app)
    yield base, app
    stop()


def open_stream(base: str, max_tokens: int = 600):
    """A streaming request read up to its first data line (so it is queued or running): (line iterator, closer).

    The iterator must stay referenced: a garbage-collected one closes the connection, i.e. disconnects.
    """
    cm = httpx.stream("POST", base + "/v1/chat/completions", timeout=120,
                      json={"model": NAME, "messages": HELLO, "max_tokens": max_tokens, "stream": True})
    response = cm.__enter__()
    assert response.status_code == 200
    lines = response.iter_lines()
    next(lines)
    return lines, lambda: cm.__exit__(None, None, None)


def wait_until_idle(base: str) -> dict:
    deadline, load = time.time() + 60, {}
    while time.time() < deadline:
        load = httpx.get(base + "/health").json()
        if load["active"] == 0 and load["queued"] == 0:
            break
        time.sleep(0.05)
    return load


def test_full_queue_answers_429_and_health_stays_fast(slow_served):
    base, app = slow_served
    streams = [open_stream(base) for _ in range(4)]  # 2 decoding + 2 waiting: every slot taken
    try:
        full = httpx.post(base + "/v1/chat/completions", json={"model": NAME, "messages": HELLO, "max_tokens": 2})
        assert full.status_code == 429 and full.headers["Retry-After"] == "1"
        assert full.json()["error"]["code"] == "rate_limit_exceeded"
        with httpx.Client(base_url=base) as c:
            c.get("/health")  # connect once, so that the timing is the server's answer and not the handshake
            took = []
            for _ in range(5):
                t0 = time.perf_counter()
                load = c.get("/health").json()
                took.append(time.perf_counter() - t0)
                assert load["active"] + load["queued"] == load["capacity"] == 4  # still full while measured
        # the requirement itself (issue 14): a health check answers within 100 ms while the queue is full
        assert sorted(took)[2] < 0.1, took
    finally:
        for _, close in streams:
            close()
    assert wait_until_idle(base)["active"] == 0


def test_client_that_disconnects_mid_stream_frees_its_slot(slow_served):
    base, app = slow_served
    engine = app.state.engine
    assert wait_until_idle(base)["active"] == 0
    cancelled = engine.stats["cancelled"]
    lines, close = open_stream(base, max_tokens=900)  # 900 tokens x 20 ms: 18 s if nobody stopped it
    data = (line for line in lines if line.startswith("data: {"))
    next(data)  # the role chunk, sent before generation starts
    assert '"content"' in next(data)  # a generated piece: the job is decoding
    close()
    # the route frees the slot as soon as the disconnect is seen; the worker drops the row at its next step
    assert wait_until_idle(base)["active"] == 0
    deadline = time.time() + 60  # the row itself leaves the batch at the worker's next step (20 ms here)
    while engine.stats["cancelled"] == cancelled and time.time() < deadline:
        time.sleep(0.02)
    assert engine.stats["cancelled"] == cancelled + 1  # stopped early: 900 tokens would have ended as "finished"
    r = httpx.post(base + "/v1/chat/completions", json={"model": NAME, "messages": HELLO, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


def test_a_queued_client_that_disconnects_is_dropped_before_it_is_generated(slow_served, caplog):
    """A non-streaming client that left was noticed by a poll once a second: a request queued behind a busy batch
    was still admitted and generated to its end when the rows freed within that second, for nobody."""
    import gc
    import json

    base, app = slow_served
    engine = app.state.engine
    assert wait_until_idle(base)["active"] == 0
    streams = [open_stream(base) for _ in range(2)]  # both batch rows decoding
    body = json.dumps({"model": NAME, "messages": HELLO, "max_tokens": 3}).encode()
    host, port = base.removeprefix("http://").split(":")
    plain = socket.create_connection((host, int(port)))
    plain.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.time() + 30
    while httpx.get(base + "/health").json()["queued"] == 0 and time.time() < deadline:
        time.sleep(0.02)
    assert httpx.get(base + "/health").json()["queued"] == 1
    finished, prefills = engine.stats["finished"], engine.stats["prefills"]
    plain.close()  # gone while queued; then the rows free up at once
    for _, close in streams:
        close()
    assert wait_until_idle(base)["active"] == 0
    time.sleep(1.5)  # past the old poll, which would have noticed too late
    assert engine.stats["prefills"] == prefills and engine.stats["finished"] == finished
    gc.collect()
    assert "never retrieved" not in caplog.text  # the wait that was given up on leaves nothing to complain of


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
        code = proc.wait(timeout=30)
    assert code == 0, proc.stdout.read()[-2000:]  # a clean stop (systemd, k8s), not "interrupted" / 130


def shutdown_with_answers_in_flight(tiny, monkeypatch, grace: float, signals: int, log=None):
    """A server whose answers outlast `grace`, sent SIGINT `signals` times (what uvicorn's handler is called with)
    once a plain and a streamed request are both decoding: (the plain response, the stream's events). `log`: a
    logging handler given uvicorn's errors."""
    import json
    import logging

    from tunelab.serve import Engine, create_app, make_server

    slow_pick = Engine._pick
    monkeypatch.setattr(Engine, "_pick", lambda self, rows, logits: time.sleep(0.02) or slow_pick(self, rows, logits))
    app = create_app(*tiny, NAME, max_tokens_limit=900)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"
    srv = make_server(app, grace=grace, log_level="error" if log else "critical")
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started and thread.is_alive():
        time.sleep(0.05)
    if log:  # after uvicorn has configured its loggers (which do not propagate to pytest's)
        logging.getLogger("uvicorn.error").addHandler(log)
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 800}  # ~16 s of slowed decoding
    with ThreadPoolExecutor(1) as pool:
        plain = pool.submit(httpx.post, base, json=body, timeout=60)
        lines = []
        with httpx.stream("POST", base, json={**body, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 4:  # two events in; then wait for the other request to be decoding too
                    deadline = time.time() + 30
                    while app.state.engine.load()["active"] < 2 and time.time() < deadline:
                        time.sleep(0.05)
                    for _ in range(signals):
                        srv.handle_exit(signal.SIGINT, None)
                        time.sleep(0.3)  # uvicorn has begun its shutdown before the second one
        answer = plain.result()
    thread.join(timeout=30)
    logging.getLogger("uvicorn.error").removeHandler(log)
    assert not thread.is_alive()
    return answer, [json.loads(line.removeprefix("data: ")) if line != "data: [DONE]" else "[DONE]"
                    for line in lines if line]


def test_shutdown_fails_answers_in_flight_with_503_and_an_sse_error_not_a_cut_connection(tiny, monkeypatch):
    """SIGTERM / Ctrl-C with answers that outlast the grace period: they end as the docs promise, before uvicorn
    cancels their tasks (a non-streamed one with a 503, a stream with an error event and [DONE])."""
    # the engine stops after 0.5 s, uvicorn cancels at 1 s
    answer, events = shutdown_with_answers_in_flight(tiny, monkeypatch, grace=1, signals=1)
    assert answer.status_code == 503 and answer.json()["error"]["type"] == "server_error"
    assert answer.headers["Retry-After"] == "1"  # as a 429's: the openai client waits that long, then retries
    assert events[-1] == "[DONE]" and "shutting down" in events[-2]["error"]["message"]


def test_a_second_ctrl_c_fails_answers_in_flight_at_once_with_no_traceback(tiny, monkeypatch, caplog):
    """Ctrl-C twice (uvicorn's force quit) does not wait out the grace period, but the answers in flight still end
    as after one: uvicorn alone left them to be cancelled with the loop (a plain-text 500, a cut stream, and an
    'Exception in ASGI application' traceback per request)."""
    answer, events = shutdown_with_answers_in_flight(tiny, monkeypatch, grace=60, signals=2, log=caplog.handler)
    assert answer.status_code == 503 and answer.json()["error"]["type"] == "server_error"
    assert events[-1] == "[DONE]" and "shutting down" in events[-2]["error"]["message"]
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
