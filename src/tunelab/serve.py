"""An OpenAI-compatible HTTP API over one model: `/v1/models`, `/v1/chat/completions`, `/v1/completions`.

    app = create_app(model, tokenizer, "my-model", api_key="secret")
    uvicorn.run(app, host="127.0.0.1", port=8000)            # or: tunelab serve --model models/merged

Any OpenAI client works (`OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")`). Chat requests are
rendered with the model's own chat template (the one used in training) and stop on its end-of-turn token.
Differences from OpenAI, on purpose: `temperature` defaults to 0 (greedy, reproducible) when not sent; `n` must
be 1; logprobs, tools and penalties other than repetition are not supported.

One model answers one request at a time: a lock serialises generations, and concurrent requests wait their turn
(on CPU, running two generations at once is no faster than one after the other). Errors are JSON in OpenAI's
shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx status for every client mistake.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunelab.infer import StreamResult, stream_generate

DEFAULT_MAX_TOKENS_LIMIT = 2048


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status)


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we do not use; accept them

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    repetition_penalty: float = Field(1.0, gt=0)
    stream_options: dict[str, Any] | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


def _text_of(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise APIError(400, f"content parts of type {part.get('type')!r} are not supported (text only)",
                           param="messages")
        parts.append(part.get("text", ""))
    return "".join(parts)


def _stop_cut(pieces: Iterator[str], stops: list[str], result: StreamResult) -> Iterator[str]:
    """Pass text through until a stop string appears (which is not emitted); hold back a possible prefix."""
    if not stops:
        yield from pieces
        return
    hold = max(len(s) for s in stops) - 1
    full, sent = "", 0
    for piece in pieces:
        full += piece
        hits = [i for i in (full.find(s, max(0, sent - hold)) for s in stops) if i >= 0]
        if hits:
            if min(hits) > sent:
                yield full[sent:min(hits)]
            pieces.close()  # type: ignore[attr-defined] - stops the generation at the next token
            result.finish_reason = "stop"
            return
        safe = max(sent, len(full) - hold)
        if safe > sent:
            yield full[sent:safe]
            sent = safe
    if len(full) > sent:
        yield full[sent:]


def create_app(model, tokenizer, model_name: str, api_key: str | None = None,
               max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT, context_length: int | None = None) -> FastAPI:
    """A FastAPI app serving `model` as `model_name`. With `api_key`, every /v1 request needs that bearer key."""
    app = FastAPI(title="tunelab", description="OpenAI-compatible API over a tunelab model")
    lock = threading.Lock()  # one generation at a time; held by the generating thread only
    context = context_length or getattr(model.config, "max_position_embeddings", None) or 2048
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            return _error(400, "the request body is not valid JSON", code="invalid_json")
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msgs = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
                         for e in errs)
        return _error(400, f"invalid request: {msgs}", param=".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), type_)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            given = header[7:].strip() if header.lower().startswith("bearer ") else ""
            if not given:
                return _error(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
            if not secrets.compare_digest(given.encode(), api_key.encode()):
                return _error(401, "incorrect API key provided", code="invalid_api_key")
        return await call_next(request)

    def _model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "tunelab"}

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{name:path}")
    def get_model(name: str):
        if name != model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")
        return _model_card()

    def _check(req: _Request, prompt_ids: list[int], max_tokens: int | None) -> dict[str, Any]:
        if req.model != model_name:
            raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        if max_tokens is not None and max_tokens > max_tokens_limit:
            raise APIError(400, f"max_tokens={max_tokens} is more than this server allows ({max_tokens_limit})",
                           param="max_tokens", code="max_tokens_exceeded")
        room = context - len(prompt_ids)
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise APIError(400, f"this model's maximum context length is {context} tokens; the prompt has "
                                f"{len(prompt_ids)} and max_tokens asks for {max_tokens}",
                           param="messages" if isinstance(req, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        return dict(max_new_tokens=min(max_tokens or max_tokens_limit, room, max_tokens_limit),
                    temperature=req.temperature, top_p=req.top_p, repetition_penalty=req.repetition_penalty,
                    seed=req.seed)

    def _stops(req: _Request) -> list[str]:
        return [req.stop] if isinstance(req.stop, str) else [s for s in (req.stop or []) if s]

    def _pieces(prompt_ids: list[int], gen: dict[str, Any], stops: list[str], result: StreamResult):
        return _stop_cut(stream_generate(model, tokenizer, prompt_ids, result, **gen), stops, result)

    def _complete(prompt_ids: list[int], gen: dict[str, Any], stops: list[str]) -> StreamResult:
        result = StreamResult()
        with lock:
            text = "".join(_pieces(prompt_ids, gen, stops, result))
        result.text = text
        return result

    async def _stream(prompt_ids, gen, stops, chunk, final, usage_chunk):
        """Server-sent events: the generation runs in a thread (holding the lock) and hands pieces over."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        result = StreamResult()
        done = object()

        def work():
            try:
                with lock:
                    if result.cancel.is_set():
                        return
                    for piece in _pieces(prompt_ids, gen, stops, result):
                        loop.call_soon_threadsafe(queue.put_nowait, piece)
                        if result.cancel.is_set():
                            break
            except BaseException as e:  # noqa: BLE001 - reported in the stream
                loop.call_soon_threadsafe(queue.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        threading.Thread(target=work, daemon=True).start()
        try:
            yield f"data: {chunk(None, first=True)}\n\n"
            while (item := await queue.get()) is not done:
                if isinstance(item, BaseException):
                    yield f"data: {_json({'error': {'message': str(item), 'type': 'server_error'}})}\n\n"
                    break
                yield f"data: {chunk(item)}\n\n"
            else:
                yield f"data: {final(result)}\n\n"
                if usage_chunk is not None:
                    yield f"data: {usage_chunk(result)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            result.cancel.set()  # the client went away or we are done: stop generating

    def _usage(result: StreamResult) -> dict[str, int]:
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        messages = [{"role": m.role, "content": _text_of(m.content)} for m in req.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - the template rejected the conversation (e.g. roles out of order)
            raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from None
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        gen = _check(req, prompt_ids, req.max_completion_tokens or req.max_tokens)
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name}
        if req.stream:
            def chunk(piece, first=False):
                delta = {"role": "assistant", "content": ""} if first else {"content": piece}
                return _json({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})

            def final(result):
                return _json({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": result.finish_reason}]})

            include_usage = bool((req.stream_options or {}).get("include_usage"))
            usage_chunk = (lambda r: _json({**head, "choices": [], "usage": _usage(r)})) if include_usage else None
            return StreamingResponse(_stream(prompt_ids, gen, _stops(req), chunk, final, usage_chunk),
                                     media_type="text/event-stream")
        result = await run_in_threadpool(_complete, prompt_ids, gen, _stops(req))
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason, "logprobs": None}],
                "usage": _usage(result)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        encoded = [tokenizer(p)["input_ids"] for p in prompts]
        gens = [_check(req, ids, req.max_tokens) for ids in encoded]
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": now, "model": model_name}
        if req.stream:
            if len(prompts) != 1:
                raise APIError(400, "streaming supports one prompt per request", param="prompt")

            def chunk(piece, first=False):
                return _json({**head, "choices": [{"index": 0, "text": piece or "", "logprobs": None,
                                                   "finish_reason": None}]})

            def final(result):
                return _json({**head, "choices": [{"index": 0, "text": "", "logprobs": None,
                                                   "finish_reason": result.finish_reason}]})

            include_usage = bool((req.stream_options or {}).get("include_usage"))
            usage_chunk = (lambda r: _json({**head, "choices": [], "usage": _usage(r)})) if include_usage else None
            return StreamingResponse(_stream(encoded[0], gens[0], _stops(req), chunk, final, usage_chunk),
                                     media_type="text/event-stream")
        choices, total = [], StreamResult()
        for i, (ids, gen) in enumerate(zip(encoded, gens)):
            r = await run_in_threadpool(_complete, ids, gen, _stops(req))
            total.prompt_tokens += r.prompt_tokens
            total.completion_tokens += r.completion_tokens
            choices.append({"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason})
        return {**head, "choices": choices, "usage": _usage(total)}

    return app


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, ensure_ascii=False)


def serve(model: str | None, adapter: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, model_name: str | None = None, dtype: str = "auto",
          max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT) -> None:
    """Load the model (and adapter) and serve it until interrupted."""
    import logging
    from pathlib import Path

    import uvicorn

    from tunelab.infer import load

    log = logging.getLogger(__name__)
    m, tok = load(model, adapter=adapter, dtype=dtype)
    name = model_name
    if not name and adapter:
        folder = Path(adapter).resolve()
        name = folder.parent.name if folder.name == "checkpoint-final" else folder.name
    name = name or (Path(model).resolve().name if Path(model).exists() else model)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the model", host)
    app = create_app(m, tok, name, api_key=api_key, max_tokens_limit=max_tokens_limit)
    print(f"serving '{name}' at http://{host}:{port}/v1 (OpenAI-compatible){' with an API key' if api_key else ''}")
    uvicorn.run(app, host=host, port=port, log_level="info")
