"""The OpenAI-compatible server: `create_app` (the FastAPI app), `serve` (what `tunelab serve` runs), `Engine`.

    from tunelab.serve import create_app, serve, ServeSettings
"""

from tunelab.serve.app import (
    DEFAULT_MAX_TOKENS_LIMIT,
    APIError,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    ServeSettings,
    create_app,
    make_server,
    serve,
)
from tunelab.serve.engine import Engine, Job, QueueFull, Sampling

__all__ = ["DEFAULT_MAX_TOKENS_LIMIT", "APIError", "ChatMessage", "ChatRequest", "CompletionRequest", "Engine",
           "Job", "QueueFull", "Sampling", "ServeSettings", "create_app", "make_server",
           "serve"]
