"""`tunelab serve` under load: aggregate tokens/s, latency and time to first token at 1 / 4 / 16 / 32 clients.

    python bench/serve.py                            # bundled model, auto dtype, 64 tokens per answer (~5 min)
    python bench/serve.py --quick                    # 24 tokens per answer, fewer requests at low concurrency
    python bench/serve.py --dtype fp32 --clients 1,16 --max-tokens 128 --json serve.json

A real server (`python -m tunelab serve`, uvicorn on 127.0.0.1, its own process) answers the official `openai`
client: streaming chat completions, greedy, `stream_options.include_usage` for the token counts. First the
sequential baseline (16 requests one after another, one client), then each concurrency level (N clients sending
their requests at once; a client sends its next request when its answer is complete). tokens/s is the sum of
completion tokens over the wall time of the level; latency is request start to last chunk; TTFT is request start
to the first chunk that carries text. "vs seq" compares with the baseline of the same run (the machine is shared:
compare rows of one run only).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

try:
    from bench.infer import PROMPTS
except ImportError:  # run as a script: bench/ is first on sys.path
    from infer import PROMPTS

KEY = "bench"


@dataclass
class Answer:
    tokens: int
    latency_s: float
    ttft_s: float


def cpu_kind() -> str:
    out = subprocess.run(["grep", "-o", "-w", "-E", "avx512_bf16|amx_bf16", "/proc/cpuinfo"], capture_output=True,
                         text=True).stdout.split()
    return ", ".join(sorted(set(out))) or "no bf16 instructions (AVX2 or older)"


def start_server(args) -> tuple[subprocess.Popen, str, str]:
    """`tunelab serve` on a free 127.0.0.1 port; returns (process, base url, the dtype line it printed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "tunelab", "serve", "--model", args.model, "--host", "127.0.0.1", "--port",
           str(port), "--api-key", KEY, "--model-name", "m", "--dtype", args.dtype,
           "--max-batch-size", str(args.max_batch_size)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.threads:  # torch reads it at start-up; on a loaded machine 1 thread can beat 2 (no OpenMP barriers)
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base, banner, deadline = f"http://127.0.0.1:{port}", "", time.time() + 600
    import httpx

    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stdout.read()}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.5)
    while "serving" not in banner:  # printed before uvicorn starts, so it is already in the pipe
        banner = proc.stdout.readline()
    return proc, base, banner.strip()


def ask(base: str, i: int, max_tokens: int) -> Answer:
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=1800)
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - t0
    return Answer(tokens, latency, ttft if ttft is not None else latency)


def run_level(base: str, clients: int, requests: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda i: ask(base, i, max_tokens), range(requests)))
    wall = time.perf_counter() - t0
    lat = sorted(a.latency_s for a in answers)
    ttft = sorted(a.ttft_s for a in answers)
    tokens = sum(a.tokens for a in answers)
    return {"clients": clients, "requests": requests, "tokens": tokens, "seconds": wall, "tok_s": tokens / wall,
            "p50_latency_s": statistics.median(lat), "p95_latency_s": _p95(lat),
            "p50_ttft_s": statistics.median(ttft), "p95_ttft_s": _p95(ttft)}


def _p95(values: list[float]) -> float:
    return values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]


def print_table(rows: list[dict], baseline: float) -> None:
    print("| clients | requests | tokens | seconds | tok/s | vs seq | p50 latency s | p95 latency s | p50 TTFT s "
          "| p95 TTFT s |")
    print("| --- | --: | --: | --: | --: | --: | --: | --: | --: | --: |")
    for r in rows:
        print(f"| {r['label']} | {r['requests']} | {r['tokens']} | {r['seconds']:.1f} | {r['tok_s']:.1f} | "
              f"{r['tok_s'] / baseline:.2f}x | {r['p50_latency_s']:.2f} | {r['p95_latency_s']:.2f} | "
              f"{r['p50_ttft_s']:.2f} | {r['p95_ttft_s']:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled:smollm2-135m-instruct")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--clients", default="1,4,16,32")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="the server's torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="24 tokens per answer; 4 requests at 1 client")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args()
    max_tokens = 24 if args.quick else args.max_tokens
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` or kill: still stop the server below

    proc, base, banner = start_server(args)
    try:
        print(f"CPU: {cpu_kind()}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {banner}")
        ask(base, 0, 4)  # warm-up: first-call allocations and kernel selection
        seq = run_level(base, 1, 16, max_tokens)
        rows = [{**seq, "label": "sequential (16 in a row)"}]
        print(f"sequential baseline: {seq['tok_s']:.1f} tok/s", flush=True)
        for clients in [int(c) for c in args.clients.split(",")]:
            # 1 client: a few requests (the baseline already measured 16); more clients: at least one each
            requests = 4 if clients == 1 else max(clients, 16)
            row = run_level(base, clients, requests, max_tokens)
            rows.append({**row, "label": f"{clients} concurrent"})
            print(f"{clients} clients: {row['tok_s']:.1f} tok/s ({row['tok_s'] / seq['tok_s']:.2f}x)", flush=True)
        dtype = banner.split("(")[1].split(",")[0]
        print(f"\n`python bench/serve.py {' '.join(sys.argv[1:])}`: {args.model}, {dtype}, {max_tokens} tokens per "
              f"answer, CPU: {cpu_kind()}\n")
        print_table(rows, seq["tok_s"])
        print(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"cpu": cpu_kind(), "server": banner, "max_tokens": max_tokens, "rows": rows}, f, indent=1)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
