"""`tunelab serve --model models/merged [--adapter outputs/RUN] [--host 127.0.0.1 --port 8000] [--api-key KEY]`

An OpenAI-compatible API: point any OpenAI client at http://HOST:PORT/v1.
"""

from __future__ import annotations

import argparse
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder, hub id or bundled name (default with --adapter: "
                                                 "the adapter's base model)")
    p.add_argument("--adapter", default=None, help="run folder or adapter checkpoint to apply")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("TUNELAB_API_KEY"),
                   help="require this bearer key on every /v1 request (default: $TUNELAB_API_KEY, else none)")
    p.add_argument("--model-name", default=None, help="the model id clients ask for (default: the folder name)")
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask for")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto")


def run(args: argparse.Namespace) -> int:
    from tunelab.errors import TunelabError

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise TunelabError("tunelab serve needs the serve extra: pip install 'tunelab[serve]'") from None
    from tunelab.serve import serve

    if not args.model and not args.adapter:
        raise TunelabError("give --model (a model folder, hub id or bundled name) and/or --adapter (a run folder)")
    serve(args.model, adapter=args.adapter, host=args.host, port=args.port, api_key=args.api_key,
          model_name=args.model_name, dtype=args.dtype, max_tokens_limit=args.max_tokens_limit)
    return 0
