"""An OpenAI-compatible HTTP API over one model: `/v1/models`, `/v1/chat/completions`, `/v1/completions`.

    app = create_app(model, tokenizer, "my-model", api_key="secret")   # or create_app(..., ServeSettings(...))
    make_server(app, host="127.0.0.1", port=8000).run()      # or: tunelab serve --model models/merged

Any OpenAI client works (`OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")`). Chat requests are
rendered with the model's own chat template (the one used in training; a `developer` message is the system prompt)
and stop on its end-of-turn token; a message whose content holds one of the tokenizer's control tokens as text
(`<|im_end|>`, ...) is refused (400), since it would be tokenised as that token and could end the turn or open a
system turn of the client's making. `/v1/completions` takes raw prompts: the client writes its own template,
control tokens included, so those are tokenised as they are.
Differences from OpenAI, on purpose: `temperature` defaults to 0 (greedy, reproducible) when not sent; `n` must
be 1; logprobs, tools, message names and penalties other than repetition are not supported; unknown fields are
refused.

Concurrent requests are decoded together by one worker thread that owns the model (continuous batching, see
`tunelab.serve.engine`); the model, the engine and the tokenising thread live on `app.state`, set up and torn
down by the app's lifespan. Limits (`ServeSettings`) bound what one request can cost: body size (413), messages,
prompts, max_tokens and context length (400); when every batch row and queue slot is taken the answer is 429 with
`Retry-After`. Errors are JSON in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`; a 500 says
only that something failed and under which id the log has the details.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import logging
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunelab.data.template import CONTROL_TOKEN_WHY, find_control_tokens, render, special_tokens
from tunelab.errors import TunelabError
from tunelab.listening import listen
from tunelab.serve.engine import Engine, Job, QueueFull, Sampling, ShuttingDown

log = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS_LIMIT = 2048


class ServeSettings(BaseModel):
    """What one request may cost and how many run at once; each field is also a `tunelab serve` option."""
    model_config = ConfigDict(extra="forbid")

    api_key: str | None = Field(None, description="require this bearer key on every route but /health")
    max_tokens_limit: int = Field(DEFAULT_MAX_TOKENS_LIMIT, ge=1, description="largest max_tokens a request may "
                                                                              "ask for")
    context_length: int | None = Field(None, ge=2, description="prompt + answer tokens (default: the model's "
                                                               "max_position_embeddings)")
    # 1 MiB holds ~250k tokens of English text: far more than any context this server runs, so only abuse hits it
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body in bytes (larger: 413)")
    max_messages: int = Field(256, ge=1, description="most messages in one chat request")
    max_prompts: int = Field(16, ge=1, description="most prompts in one completions request")
    max_batch_size: int = Field(32, ge=1, description="requests decoded together in one step")
    max_queue: int = Field(64, ge=0, description="requests waiting for a batch row before new ones get 429")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def _safe(text: str | None) -> str | None:
    # a lone surrogate from a JSON "\ud800" escape cannot be encoded as UTF-8; echoing it would turn a 400 into a 500
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": _safe(message), "type": type_, "param": _safe(param), "code": code}}
    return JSONResponse(body, status, headers=headers)


# ---------------------------------------------------------------- request bodies


class _Strict(BaseModel):
    # strict: "5" is not a number and 1.5 not an integer; forbid: a misspelt field is an error, not silently ignored
    model_config = ConfigDict(extra="forbid", strict=True)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # image parts carry other keys; they are refused below
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class _Request(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None  # OpenAI's limit: 4 stop strings
    seed: int | None = None
    n: int | None = 1
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    # OpenAI fields accepted for compatibility: ignored, or (penalties, logprobs) refused unless left at default
    user: str | None = None
    metadata: dict[str, str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | int | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # clients send these by default; an empty list and parallel_tool_calls ask for nothing, any tool is refused
    tools: list[dict[str, Any]] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    service_tier: str | None = None


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False


_KNOWN_FIELDS = sorted(set(ChatRequest.model_fields) | set(CompletionRequest.model_fields)
                       | set(ChatMessage.model_fields))


# ---------------------------------------------------------------- middleware and error handlers


class _Guard:
    """The key check and the body-size cap, before any route runs.

    Every route but /health needs `Authorization: Bearer KEY` (the docs and the OpenAPI schema included). A body
    over `max_body_bytes` gets a 413 in OpenAI's shape, whether its Content-Length says so or it arrives chunked;
    FastAPI's own `max_body_size` answers a too-long Content-Length in plain text, which OpenAI clients cannot read.
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refuse_key(scope)
        if refusal is None and scope["method"] in ("POST", "PUT", "PATCH"):
            refusal, receive = await self._read_body(scope, receive)
        if refusal is not None:
            return await refusal(scope, receive, send)
        await self.app(scope, receive, send)

    def _refuse_key(self, scope) -> JSONResponse | None:
        if not self.api_key or scope["path"] == "/health":
            return None
        header = Headers(scope=scope).get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not given:
            return _error(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not secrets.compare_digest(given.encode(), self.api_key.encode()):
            return _error(401, "incorrect API key provided", code="invalid_api_key")
        return None

    async def _read_body(self, scope, receive):
        """(413 response or None, a receive that replays the body and then passes on, e.g. the disconnect)."""
        too_large = _error(413, f"the request body is larger than this server accepts ({self.max_body_bytes} "
                                f"bytes)", code="request_too_large")
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return too_large, receive
        chunks, size, first = [], 0, None
        while True:
            message = await receive()
            if message["type"] != "http.request":
                first = message  # the client left while sending: let the route see it
                break
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return too_large, receive
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replay = [first or {"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replaying():
            return replay.pop() if replay else await receive()

        return None, replaying


async def _api_error(request: Request, exc: APIError):
    return _error(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


_FIELDS = {name for m in (ChatRequest, CompletionRequest, ChatMessage, ContentPart, StreamOptions)
           for name in m.model_fields}


def _where(e: dict[str, Any]) -> str:
    """The field an error is about (`messages.0.content`), without the union branches pydantic puts in its path
    (`stop.str`, `stop.list[str]`, `messages.0.content.list[ContentPart].0.type`), which name no field."""
    loc = [x for x in e.get("loc", ()) if x != "body"]
    unknown = e.get("type") == "extra_forbidden"  # the last element is the client's own (unknown) field name
    return ".".join(str(x) for i, x in enumerate(loc) if isinstance(x, int) or x in _FIELDS
                    or (unknown and i == len(loc) - 1)) or "body"


# OpenAI request fields this server has no model field for: "not supported" says more than "unknown field"
_UNSUPPORTED = {"top_logprobs", "logit_bias", "response_format", "tool_choice", "functions", "function_call",
                "modalities", "audio", "prediction", "reasoning_effort", "web_search_options", "best_of", "suffix"}


def _describe(e: dict[str, Any]) -> str:
    where = _where(e)
    if e.get("type") == "extra_forbidden":
        name = str(e.get("loc", ("",))[-1])
        if name in _UNSUPPORTED and len(e.get("loc", ())) == 2:  # a request field, not one inside a message
            return f"{where}: not supported by this server"
        near = difflib.get_close_matches(name, _KNOWN_FIELDS, n=1)
        return f"{where}: unknown field" + (f" (did you mean '{near[0]}'?)" if near else "")
    return f"{where}: {e.get('msg')}"


async def _validation_error(request: Request, exc: RequestValidationError):
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        return _error(400, "the request body is not valid JSON", code="invalid_json")
    kind = request.headers.get("content-type", "")
    mime = kind.split(";")[0].strip().lower()
    json_type = mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))
    if not json_type and all(_where(e) == "body" for e in errs):
        # not read as JSON at all (curl -d sends a form's type); a page in a browser cannot send this type unasked
        return _error(400, f"send the request body as JSON with 'Content-Type: application/json' (this one "
                           f"{'was ' + repr(kind) if kind else 'had none'})", code="invalid_content_type")
    param = _where(errs[0]) if errs else None  # the whole body ([] or a string) names no field: null, as OpenAI
    param = None if param == "body" else param
    return _error(400, "invalid request: " + "; ".join(dict.fromkeys(_describe(e) for e in errs[:10])), param=param)


async def _http_error(request: Request, exc: StarletteHTTPException):
    type_ = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
    return _error(exc.status_code, str(exc.detail), type_)


async def _server_error(request: Request, exc: Exception):
    ref = uuid.uuid4().hex[:12]
    log.error("error %s while answering %s %s", ref, request.method, request.url.path, exc_info=exc)
    return _error(500, f"the server had an error processing this request (log reference {ref})", "server_error")


# ---------------------------------------------------------------- the app and its lifespan


@asynccontextmanager
async def _lifespan(app: FastAPI):
    """Start the engine (worker thread + queue) and the tokenising thread; stop both when the server stops."""
    state = app.state
    state.engine = Engine(state.model, state.tokenizer, state.settings.max_batch_size, state.settings.max_queue,
                          threads=getattr(state, "torch_threads", None))
    # one thread: a fast tokenizer must not be used from several threads at once, and this keeps it off the loop
    state.encoder = ThreadPoolExecutor(1, thread_name_prefix="tunelab-tokenize")
    state.engine.start()
    try:
        yield
    finally:
        state.engine.stop()
        state.encoder.shutdown(wait=False, cancel_futures=True)


def create_app(model, tokenizer, model_name: str, settings: ServeSettings | None = None, **fields: Any) -> FastAPI:
    """A FastAPI app serving `model` as `model_name`; `fields` override `settings` (e.g. api_key="secret").

    The engine starts with the app's lifespan: under uvicorn, or `with TestClient(app)` in tests.
    """
    settings = ServeSettings.model_validate({**(settings or ServeSettings()).model_dump(), **fields})
    app = FastAPI(title="tunelab", description="OpenAI-compatible API over a tunelab model", lifespan=_lifespan)
    app.state.model, app.state.tokenizer, app.state.model_name = model, tokenizer, model_name
    app.state.settings = settings
    app.state.specials = special_tokens(tokenizer)  # by their text: a stop string may name one
    most = getattr(model.config, "max_position_embeddings", None)
    if settings.context_length and most and settings.context_length > most:  # past it, the answers are garbage
        raise TunelabError(f"context_length={settings.context_length} is more than this model's "
                           f"max_position_embeddings ({most}); give at most {most}")
    app.state.context = settings.context_length or most or 2048
    app.state.created = int(time.time())
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    app.add_middleware(_Guard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)
    app.include_router(router)
    return app


# ---------------------------------------------------------------- checks, tokenising, jobs

router = APIRouter()


def _check_request(state, req: _Request) -> None:
    if req.model != state.model_name:
        raise APIError(404, f"the model {req.model!r} does not exist; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")
    if req.n not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise APIError(400, f"{name} is not supported; use repetition_penalty", param=name)
    if req.logprobs is not None and req.logprobs is not False:  # completions' logprobs=0 asks for them too
        raise APIError(400, "logprobs are not supported", param="logprobs")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")


def _clean(text: str, param: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "the text holds an invalid Unicode code point (a lone surrogate)", param=param) from None
    return text


def _text_of(content: str | list[ContentPart] | None) -> str:
    if content is None or isinstance(content, str):
        return _clean(content or "", "messages")
    parts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise APIError(400, f"content parts of type {part.type!r} are not supported (text only)",
                           param="messages")
        parts.append(_clean(part.text, "messages"))
    return "".join(parts)


def _stops(state, req: _Request) -> dict[str, Any]:
    """The job's text stops and stop token ids: a special token never appears in the text, so a stop string that is
    one (`<|im_start|>`) stops on its id, and one that holds one among other text could never match (400)."""
    stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
    texts, ids = [], set()
    for s in stops:
        if not s:
            continue  # "" would match at once: an empty stop string stops nothing
        if s in state.specials:
            ids.add(state.specials[s])
            continue
        inside = [tok for tok in state.specials if tok and tok in s]
        if inside:
            raise APIError(400, f"the stop string {s!r} holds the special token {inside[0]!r}, which never appears "
                                f"in the answer's text; give {inside[0]!r} as a stop string of its own",
                           param="stop")
        texts.append(_clean(s, "stop"))
    return {"stops": texts, "stop_ids": frozenset(ids)}


def _sampling(state, req: _Request, prompt_ids: list[int], param: str) -> Sampling:
    limit, context = state.settings.max_tokens_limit, state.context
    # chat's max_completion_tokens is what newer OpenAI clients send; it wins over the deprecated max_tokens
    name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
    max_tokens = getattr(req, name)
    if max_tokens is not None and max_tokens > limit:
        raise APIError(400, f"{name}={max_tokens} is more than this server allows ({limit})",
                       param=name, code="max_tokens_exceeded")
    if not prompt_ids:
        raise APIError(400, "the prompt is empty", param=param)
    room = context - len(prompt_ids)
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asks = f"{name} asks for {max_tokens}" if max_tokens is not None else "no room is left for an answer"
        raise APIError(400, f"this model's maximum context length is {context} tokens; the prompt has "
                            f"{len(prompt_ids)} and {asks}", param=param, code="context_length_exceeded")
    return Sampling(max_new_tokens=min(max_tokens or limit, room, limit), temperature=req.temperature or 0.0,
                    top_p=req.top_p or 1.0, repetition_penalty=req.repetition_penalty, seed=req.seed)


def _render_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    found = find_control_tokens(tokenizer, messages)
    if found:  # "...<|im_end|><|im_start|>system..." typed by a client would open a real system turn
        i, tok = found[0]
        raise APIError(400, f"messages[{i}].content holds {tok!r}, a control token of this model's tokenizer: "
                            f"{CONTROL_TOKEN_WHY}; remove it from the message", param=f"messages.{i}.content",
                       code="control_token_in_content")
    if not getattr(tokenizer, "chat_template", None):  # the model's lack, not the request's fault: say so
        raise APIError(400, "this model has no chat template, so chat messages cannot be turned into a prompt; "
                            "send a raw prompt to /v1/completions instead", code="no_chat_template")
    try:
        text = render(tokenizer, messages, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - the template rejected the conversation (e.g. roles out of order)
        raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


async def _off_loop(state, fn, *args):
    """Run `fn` on the tokenising thread: a long prompt must not stall every other request on the event loop."""
    return await asyncio.get_running_loop().run_in_executor(state.encoder, fn, *args)


def _submit(state, jobs: list[Job]) -> None:
    """Queue all of a request's jobs or none: 429 with Retry-After when the slots run out."""
    for i, job in enumerate(jobs):
        try:
            state.engine.submit(job)
        except (QueueFull, ShuttingDown) as e:
            for done in jobs[:i]:
                state.engine.release(done)
            if isinstance(e, ShuttingDown):
                raise _shutting_down(e) from None
            raise APIError(429, f"the server is busy ({e}); retry shortly", "rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None


def _usage(jobs: list[Job]) -> dict[str, int]:
    p, c = sum(j.prompt_tokens for j in jobs), sum(j.completion_tokens for j in jobs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _shutting_down(e: ShuttingDown) -> APIError:
    # Retry-After: the client may retry (the server restarting, or another replica behind a load balancer)
    return APIError(503, str(e), "server_error", headers={"Retry-After": "1"})


def _raise_if_failed(job: Job) -> None:
    if isinstance(job.error, ShuttingDown):
        raise _shutting_down(job.error)
    if job.error is not None:  # the engine logged the traceback
        raise APIError(500, "the server had an error while generating this answer (see the server log)",
                       "server_error")


async def _answer(request: Request, prompts: list[list[int]], samplings: list[Sampling],
                  stops: dict[str, Any]) -> list[Job] | None:
    """Run the jobs to the end; None if the client went away first (its jobs are then cancelled)."""
    state, loop = request.app.state, asyncio.get_running_loop()
    events = [asyncio.Event() for _ in prompts]
    jobs = [Job(ids, s, **stops, sink=lambda piece, ev=ev: piece is None and loop.call_soon_threadsafe(ev.set))
            for ids, s, ev in zip(prompts, samplings, events)]
    _submit(state, jobs)
    answered = asyncio.ensure_future(_all_set(events))  # a task, not a gather: cancelled, it logs nothing
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait((answered, gone), return_when=asyncio.FIRST_COMPLETED)
        if not answered.done():
            return None
    finally:
        answered.cancel()
        gone.cancel()
        for job in jobs:
            state.engine.release(job)
    for job in jobs:
        _raise_if_failed(job)
    return jobs


async def _all_set(events: list[asyncio.Event]) -> None:
    for ev in events:
        await ev.wait()


async def _disconnect(request: Request) -> None:
    """Return when the client has closed its connection: its request is then dropped at once, queued or decoding."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _stream(request: Request, prompt_ids: list[int], sampling: Sampling, stops: dict[str, Any], chunk, final,
            include_usage: bool) -> StreamingResponse:
    """Server-sent events, one per text piece; the job is queued now, so a full queue is a 429, not a broken stream."""
    state, loop = request.app.state, asyncio.get_running_loop()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()
    job = Job(prompt_ids, sampling, **stops, sink=lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece))
    _submit(state, [job])

    async def events():
        try:
            yield f"data: {chunk(None, first=True)}\n\n"
            while (piece := await pieces.get()) is not None:
                yield f"data: {chunk(piece)}\n\n"
            if job.error is not None:
                message = str(job.error) if isinstance(job.error, ShuttingDown) else \
                    "the server had an error while generating this answer (see the server log)"
                error = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
                yield f"data: {_json(error)}\n\n"
            else:
                yield f"data: {final(job)}\n\n"
                if include_usage:
                    yield f"data: {chunk(None, usage=_usage([job]))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            state.engine.release(job)  # done, or the client went away: its batch row and slot are free now

    return StreamingResponse(events(), media_type="text/event-stream")


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


# ---------------------------------------------------------------- routes


@router.get("/health")
async def health(request: Request):
    state = request.app.state
    return {"status": "ok", "model": state.model_name, **state.engine.load()}


def _model_card(state) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "tunelab"}


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [_model_card(request.app.state)]}


@router.get("/v1/models/{name:path}")
async def get_model(name: str, request: Request):
    state = request.app.state
    if name != state.model_name:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")
    return _model_card(state)


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatRequest, request: Request):
    state = request.app.state
    _check_request(state, req)
    if len(req.messages) > state.settings.max_messages:
        raise APIError(400, f"{len(req.messages)} messages is more than this server accepts in one request "
                            f"({state.settings.max_messages})", param="messages", code="too_many_messages")
    if req.tools:
        raise APIError(400, "tools are not supported by this server", param="tools")
    named = next((i for i, m in enumerate(req.messages) if m.name is not None), None)
    if named is not None:  # the chat template has no place for it: refused rather than silently dropped
        raise APIError(400, "messages[].name is not supported", param=f"messages.{named}.name")
    # "developer" is what newer OpenAI clients send for the system prompt; templates know only "system"
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text_of(m.content)}
                for m in req.messages]
    prompt_ids = await _off_loop(state, _render_chat, state.tokenizer, messages)
    sampling = _sampling(state, req, prompt_ids, "messages")
    rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    head = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": state.model_name}
    if req.stream:
        def chunk(piece, first=False, usage=None):
            if usage is not None:
                return _json({**head, "choices": [], "usage": usage})
            delta = {"role": "assistant", "content": ""} if first else {"content": piece}
            return _json({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})

        def final(job):
            return _json({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": job.finish_reason}]})

        return _stream(request, prompt_ids, sampling, _stops(state, req), chunk, final,
                       bool(req.stream_options and req.stream_options.include_usage))
    jobs = await _answer(request, [prompt_ids], [sampling], _stops(state, req))
    if jobs is None:
        return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
    return {"id": rid, "object": "chat.completion", "created": now, "model": state.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": jobs[0].text},
                         "finish_reason": jobs[0].finish_reason, "logprobs": None}],
            "usage": _usage(jobs)}


def _encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    # Raw prompts, not checked for control tokens: a client of /v1/completions formats its own template and
    # means the "<|im_start|>" it sends (chat requests are checked, in `_render_chat`).
    return [tokenizer(p)["input_ids"] for p in prompts]


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    state = request.app.state
    _check_request(state, req)
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not prompts:
        raise APIError(400, "prompt must not be empty", param="prompt")
    # each prompt takes a slot: more than all of them would be a 429 however long the client waited
    most = min(state.settings.max_prompts, state.engine.capacity)
    if len(prompts) > most:
        raise APIError(400, f"{len(prompts)} prompts is more than this server accepts in one request ({most})",
                       param="prompt", code="too_many_prompts")
    if req.echo:
        raise APIError(400, "echo is not supported", param="echo")
    encoded = await _off_loop(state, _encode_prompts, state.tokenizer, [_clean(p, "prompt") for p in prompts])
    samplings = [_sampling(state, req, ids, "prompt") for ids in encoded]
    rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": now, "model": state.model_name}
    if req.stream:
        if len(prompts) != 1:
            raise APIError(400, "streaming supports one prompt per request", param="prompt")

        def chunk(piece, first=False, usage=None):
            if usage is not None:
                return _json({**head, "choices": [], "usage": usage})
            return _json({**head, "choices": [{"index": 0, "text": piece or "", "logprobs": None,
                                               "finish_reason": None}]})

        def final(job):
            return _json({**head, "choices": [{"index": 0, "text": "", "logprobs": None,
                                               "finish_reason": job.finish_reason}]})

        return _stream(request, encoded[0], samplings[0], _stops(state, req), chunk, final,
                       bool(req.stream_options and req.stream_options.include_usage))
    jobs = await _answer(request, encoded, samplings, _stops(state, req))
    if jobs is None:
        return Response(status_code=499)
    choices = [{"index": i, "text": j.text, "logprobs": None, "finish_reason": j.finish_reason}
               for i, j in enumerate(jobs)]
    return {**head, "choices": choices, "usage": _usage(jobs)}


# ---------------------------------------------------------------- the command behind `tunelab serve`


def serve(model: str | None, adapter: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          model_name: str | None = None, dtype: str = "auto", settings: ServeSettings | None = None,
          weights: str = "model", **fields: Any) -> None:
    """Load the model (and adapter) and serve it until interrupted; `fields` override `settings`; `weights`: what
    decode steps multiply with (`tunelab.decode.set_decode_weights`: "model" or opt-in "int8")."""
    settings = ServeSettings.model_validate({**(settings or ServeSettings()).model_dump(), **fields})
    if host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the model", host)
    # a port in use is said now, not after loading the model and claiming to serve; closed however serving ends
    with listen(host, port) as sock:
        app, described = _load_app(model, adapter, model_name, dtype, settings, weights)
        port = sock.getsockname()[1]  # the one picked, for --port 0
        print(f"serving {described} at http://{host}:{port}/v1 (OpenAI-compatible)"
              f"{' with an API key' if settings.api_key else ''}")
        try:
            make_server(app, host=host, port=port, log_level="info").run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises the signal it shut down on (uvicorn.run catches it too): done
            pass


def _load_app(model: str | None, adapter: str | None, model_name: str | None, dtype: str, settings: ServeSettings,
              weights: str) -> tuple[FastAPI, str]:
    """The app over the loaded model, and how `serve` describes it ("'name' (bf16, up to 32 requests per batch)")."""
    from pathlib import Path

    from tunelab.decode import set_decode_weights
    from tunelab.infer import load
    from tunelab.model.loading import no_chat_template

    import torch

    # torch computes in the engine's thread; load with one thread here, so that this thread keeps no team of
    # OpenMP workers next to the engine's: with both, one-client decoding ran ~35% slower (bench/README.md)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    m, tok = load(model, adapter=adapter, dtype=dtype)
    no_template = no_chat_template(tok, adapter or model)
    if no_template:  # /v1/completions still serves raw prompts; chat clients learn it now, not per request
        log.warning("%s: /v1/chat/completions will refuse every request; /v1/completions serves raw prompts",
                    no_template.split(", so ")[0])
    set_decode_weights(m, weights)
    name = model_name
    if not name and adapter:
        folder = Path(adapter).resolve()
        name = folder.parent.name if folder.name == "checkpoint-final" else folder.name
    name = name or (Path(model).resolve().name if Path(model).exists() else model)
    app = create_app(m, tok, name, settings)
    app.state.torch_threads = threads  # the engine's worker decodes with these
    dtype_name = str(next(m.parameters()).dtype).removeprefix("torch.")
    dtype_name += ", int8 decode weights" if weights == "int8" else ""
    return app, f"'{name}' ({dtype_name}, up to {settings.max_batch_size} requests per batch)"


def make_server(app: FastAPI, grace: float = 10, **config: Any):
    """A uvicorn server for `app` (`config`: uvicorn.Config's options) that on SIGTERM / Ctrl-C gives the answers in
    flight about `grace` seconds to finish and then fails the rest: a 503, or an SSE error event and [DONE]."""
    return _Server(uvicorn.Config(app, timeout_graceful_shutdown=grace, **config), app)


class _Server(uvicorn.Server):
    """uvicorn cancels the requests still running when timeout_graceful_shutdown runs out and only then runs the
    lifespan's shutdown (which stops the engine), so those clients would get a cut connection. This server stops
    the engine a little before that: its jobs fail with ShuttingDown and their answers go out while it waits.

    A second Ctrl-C (uvicorn's force quit) stops the engine at once too; uvicorn itself would stop waiting and leave
    the requests to be cancelled when the loop closes: a plain-text 500 or a cut stream for each client, and a
    traceback per request in the log."""

    def __init__(self, config, app: FastAPI):
        super().__init__(config)
        self.app = app

    async def shutdown(self, sockets=None) -> None:
        grace = self.config.timeout_graceful_shutdown
        stop = None
        if grace is not None:  # None: uvicorn waits for every request, however long
            # the worker ends its current step before failing the batch; the answers need a moment to be written
            stop = asyncio.get_running_loop().call_later(
                grace - min(2, grace / 2), lambda: self.app.state.engine.stop(timeout=0))  # timeout=0: no join
        try:
            await super().shutdown(sockets)
        finally:
            if stop is not None:
                stop.cancel()
        if self.force_exit:  # fail every job now and let those answers go out before the loop closes
            self.app.state.engine.stop(timeout=0)
            deadline = time.monotonic() + 2
            while self.server_state.tasks and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await self.lifespan.shutdown()
