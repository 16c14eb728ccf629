"""`tunelab serve --model models/merged [--adapter outputs/RUN] [--host 127.0.0.1 --port 8000] [--api-key KEY]`

An OpenAI-compatible API: point any OpenAI client at http://HOST:PORT/v1. Concurrent requests are batched;
`--max-batch-size`, `--max-queue` and the other limits below bound what the server takes on.
"""

from __future__ import annotations

import argparse
import os

from tunelab.cli import port_number

# The limits are `tunelab.serve.ServeSettings` fields, mirrored here so that `--help` imports neither fastapi nor
# torch; tests/test_serve_limits.py checks that the two agree.
LIMITS = {
    "max_tokens_limit": (2048, "largest max_tokens a request may ask for"),
    "context_length": (None, "prompt + answer tokens (default: the model's max_position_embeddings)"),
    "max_body_bytes": (1 << 20, "largest request body in bytes (larger: 413)"),
    "max_messages": (256, "most messages in one chat request"),
    "max_prompts": (16, "most prompts in one completions request"),
    "max_batch_size": (32, "requests decoded together in one step"),
    "max_queue": (64, "requests waiting for a batch row before new ones get 429"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder, hub id or bundled name (default with --adapter: "
                                                 "the adapter's base model)")
    p.add_argument("--adapter", default=None, help="run folder or adapter checkpoint to apply")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument("--api-key", default=os.environ.get("TUNELAB_API_KEY"),
                   help="require this bearer key on every route but /health (default: $TUNELAB_API_KEY, else none)")
    p.add_argument("--model-name", default=None, help="the model id clients ask for (default: the folder name)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.add_argument("--weights", choices=["model", "int8"], default="model",
                   help="decode with the model's own weights (default) or int8 copies of them (faster on CPU, "
                        "answers close to but not always the model's own)")
    for name, (default, text) in LIMITS.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default,
                       help=f"{text} (default: {default})" if default is not None else text)


def run(args: argparse.Namespace) -> int:
    from tunelab.errors import TunelabError

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise TunelabError("tunelab serve needs the serve extra: pip install 'tunelab[serve]'") from None
    from pydantic import ValidationError

    from tunelab.serve import ServeSettings, serve

    if not args.model and not args.adapter:
        raise TunelabError("give --model (a model folder, hub id or bundled name) and/or --adapter (a run folder)")
    try:
        settings = ServeSettings(api_key=args.api_key, **{name: getattr(args, name) for name in LIMITS})
    except ValidationError as e:
        problems = "; ".join(f"--{'.'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}"
                             for err in e.errors())
        raise TunelabError(f"invalid serve option: {problems}") from None
    serve(args.model, adapter=args.adapter, host=args.host, port=args.port, model_name=args.model_name,
          dtype=args.dtype, settings=settings, weights=args.weights)
    return 0
