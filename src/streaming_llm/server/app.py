"""The FastAPI application: OpenAI-style routes over a `SessionManager`.

Routes: POST /v1/chat/completions, POST /v1/completions (both streaming over SSE or not;
`response_format` JSON mode / JSON schema through `structured.py`),
GET /v1/models[/{id}], GET /health, GET /metrics (Prometheus, see metrics.py), and
GET/DELETE /v1/sessions[/{id}] to inspect and remove stored sessions. Every error is an
OpenAI-style object `{"error": {message, type, param, code}}` with a 4xx status for bad input. Two pure-ASGI middlewares guard every route: the API key
(`Authorization: Bearer`, all routes but /health, when a key is set) and the request body size.
This module parses, validates and formats; generation and state live in `sessions.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from ..core.sampling import DEFAULT_REPETITION_PENALTY, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P, SamplingParams
from ..models import native
from . import schemas as S
from .metrics import CONTENT_TYPE, Metrics, RequestCounter
from .replicas import SessionBusy
from .sessions import SessionConflict, SessionManager
from .stops import LogprobReport
from .structured import BadResponseFormat, LazyStructuredOutputs
from .redis_store import LeaseLost
from .store import CorruptRecord

log = logging.getLogger("streaming_llm.server")


@dataclass(frozen=True)
class Settings:
    model_name: str
    api_key: str | None = None
    max_tokens_limit: int = 2048
    default_max_tokens: int = 256
    max_body_bytes: int = 1 << 20
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


class BodyTooLarge(Exception):
    pass


def error_response(status: int, message: str, type_="invalid_request_error", param=None, code=None) -> JSONResponse:
    return JSONResponse(S.error_body(message, type_, param, code), status_code=status)


# ---- middlewares (pure ASGI: they also cover unknown routes and streaming) ------------------------
class AuthMiddleware:
    def __init__(self, app, api_key: str | None, open_paths=("/health",)):
        self.app, self.key, self.open = app, api_key, set(open_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.key is None or scope["path"] in self.open:
            return await self.app(scope, receive, send)
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key.encode()):
            msg = "Incorrect or missing API key: send 'Authorization: Bearer <key>'"
            return await error_response(401, msg, code="invalid_api_key")(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int):
        self.app, self.max = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max:
            return await self._too_large(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max:
                    raise BodyTooLarge()
            return message

        return await self.app(scope, limited, send)

    async def _too_large(self, scope, receive, send):
        msg = f"request body exceeds this server's limit of {self.max} bytes (--max-body-bytes)"
        return await error_response(413, msg, code="request_too_large")(scope, receive, send)


class SSEResponse(StreamingResponse):
    """A streaming response that always closes its turn, even if the client left early."""

    def __init__(self, content, turn, on_close):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.turn, self.on_close = turn, on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.turn.close()  # no awaits inside: safe even while being cancelled
                self.on_close(self.turn)
            finally:
                await self.body_iterator.aclose()


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---- the app ---------------------------------------------------------------------------------
def create_app(manager: SessionManager, settings: Settings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        janitor = asyncio.ensure_future(_expire_periodically(manager)) if manager.session_ttl else None
        yield
        if janitor is not None:
            janitor.cancel()

    app = FastAPI(title="streaming-llm", docs_url=None, redoc_url=None, lifespan=lifespan)
    metrics = Metrics(manager)
    app.state.manager, app.state.settings, app.state.metrics = manager, settings, metrics
    started = int(time.time())
    structured = LazyStructuredOutputs(manager.model, manager.tokenizer)

    @app.exception_handler(SessionBusy)
    async def _busy(request, e: SessionBusy):
        return error_response(409, str(e), "invalid_request_error", "session_id", "session_busy")

    @app.exception_handler(LeaseLost)
    async def _lease_lost(request, e: LeaseLost):
        return error_response(409, f"{e}; the turn was not stored, retry it", "invalid_request_error", "session_id",
                              "session_busy")

    async def _store_down(request, e: Exception):
        log.error("session store error on %s %s: %s", request.method, request.url.path, e)
        return error_response(503, f"the session store is unavailable ({type(e).__name__}: {e}); retry later",
                              "server_error", None, "store_unavailable")

    for cls in _store_errors():
        app.add_exception_handler(cls, _store_down)

    @app.exception_handler(CorruptRecord)
    async def _corrupt(request, e: CorruptRecord):
        log.error("%s", e)
        return error_response(409, str(e), "invalid_request_error", "session_id", "session_corrupt")

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _bad_params(request, e: RequestValidationError):  # query/path parameters
        param, msg = _describe(list(e.errors()))
        return error_response(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request, e):
        msg = f"request body exceeds this server's limit of {settings.max_body_bytes} bytes (--max-body-bytes)"
        return error_response(413, msg, code="request_too_large")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        response = error_response(e.status_code, f"{e.detail}: {request.method} {request.url.path}", param=None, code=code)
        response.headers.update(e.headers or {})  # Allow on 405
        return response

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error ({type(e).__name__})", "server_error")

    # ---- parsing helpers ---------------------------------------------------------------------
    async def parse(request: Request, cls):
        raw = await request.body()
        if not raw.strip():
            raise ApiError(400, "request body is empty; send a JSON object")
        try:
            req = cls.model_validate_json(raw)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            if err["type"] == "json_invalid":
                raise ApiError(400, f"malformed JSON body: {err.get('ctx', {}).get('error', err['msg'])}", code="invalid_json")
            if err["type"] in ("model_type", "model_attributes_type") and not err["loc"]:
                raise ApiError(400, "request body must be a JSON object")
            param, msg = _describe(e.errors(include_url=False))
            raise ApiError(400, f"{param}: {msg}" if param else msg, param=param, code=err["type"])
        bad = S.unsupported_features(req)
        if bad:
            raise ApiError(400, bad[1], param=bad[0], code="unsupported_parameter")
        if req.model != settings.model_name:
            raise ApiError(404, f"The model '{req.model}' does not exist; this server serves '{settings.model_name}'",
                           param="model", code="model_not_found")
        return req

    def session_id(request: Request, req) -> str | None:
        header = request.headers.get("x-session-id")
        if header is not None and not S.SESSION_ID_RE.match(header):
            raise ApiError(400, "X-Session-ID must be 1-128 characters from A-Z a-z 0-9 . _ : @ -", param="X-Session-ID")
        sid = header or req.session_id or req.user or None  # an empty user field names nothing
        if sid is not None and not S.SESSION_ID_RE.match(sid):
            raise ApiError(400, "user (used as the session id) must be 1-128 characters from A-Z a-z 0-9 . _ : @ -", param="user")
        return sid

    def generation_args(req, max_tokens: int | None) -> tuple[int, SamplingParams]:
        n = settings.default_max_tokens if max_tokens is None else max_tokens
        n = min(n, settings.max_tokens_limit) if max_tokens is None else n
        if n < 1:
            raise ApiError(400, f"max_tokens must be at least 1 (got {n})", param="max_tokens", code="invalid_value")
        if n > settings.max_tokens_limit:
            raise ApiError(400, f"max_tokens {n} exceeds this server's limit of {settings.max_tokens_limit} (--max-tokens-limit)",
                           param="max_tokens", code="invalid_value")
        try:
            sampling = SamplingParams(
                temperature=settings.temperature if req.temperature is None else req.temperature,
                top_p=settings.top_p if req.top_p is None else req.top_p,
                top_k=req.top_k or DEFAULT_TOP_K,
                repetition_penalty=req.repetition_penalty or DEFAULT_REPETITION_PENALTY,
                seed=req.seed,
            )
        except UserError as e:
            raise ApiError(400, str(e), code="invalid_value")
        return n, sampling

    async def constrained(req, sampling: SamplingParams) -> SamplingParams:
        """`sampling` with the grammar of `req.response_format` (structured.py), if any."""
        if req.response_format is None:
            return sampling
        try:
            constraint = await asyncio.to_thread(structured.constraint, req.response_format)
        except BadResponseFormat as e:
            raise ApiError(400, str(e), param=e.param, code="invalid_response_format")
        return sampling if constraint is None else dataclasses.replace(sampling, constraint=constraint)

    async def open_turn(sid, kind, payload, n, sampling, req):
        try:
            return await manager.open_turn(sid, kind, payload, n, sampling, req.stop_list(), req.logprob_count())
        except SessionBusy:
            raise
        except SessionConflict as e:
            raise ApiError(409, str(e), param="session_id", code="session_kind_conflict")
        except UserError as e:
            raise ApiError(400, str(e))

    # ---- routes ------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        stats = await manager.io.call(manager.store.stats)
        return {"status": "ok", "model": settings.model_name, "sessions_in_memory": len(manager.live),
                "queued_model_jobs": manager.worker.pending, "batch": manager.batch_info(), **stats, **manager.counters,
                "recall": _recall_info(manager.config), "decode_attention": native.status(),
                "quantized_linear": native.linear_status()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics():
        return Response(await metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(settings.model_name, started)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != settings.model_name:
            raise ApiError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return _model_card(settings.model_name, started)

    @app.get("/v1/sessions")
    async def list_sessions(limit: int = 100):
        data = await manager.io.call(manager.store.list, max(1, min(limit, 10000)))
        return {"object": "list", "data": data}

    @app.get("/v1/sessions/{sid}")
    async def get_session(sid: str):
        info = await manager.describe(sid)
        if info is None:
            raise ApiError(404, f"no session {sid!r}", param="session_id", code="session_not_found")
        return info

    @app.delete("/v1/sessions/{sid}")
    async def delete_session(sid: str):
        if not await manager.delete(sid):
            raise ApiError(404, f"no session {sid!r}", param="session_id", code="session_not_found")
        return {"id": sid, "object": "session", "deleted": True}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        request.state.t0 = time.perf_counter()
        req = await parse(request, S.ChatCompletionRequest)
        messages = [m.as_dict() for m in req.messages]
        if messages[-1]["role"] != "user":
            raise ApiError(400, f"the last message must have role 'user' (got '{req.messages[-1].role}')",
                           param=f"messages.{len(messages) - 1}.role")
        sid = session_id(request, req)
        if req.session_append and sid is None:
            raise ApiError(400, "session_append needs a named session (X-Session-ID, session_id or user)", param="session_append")
        n, sampling = generation_args(req, req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens)
        sampling = await constrained(req, sampling)
        turn = await open_turn(sid, "chat", {"messages": messages, "append": req.session_append}, n, sampling, req)
        return await _respond(request, turn, req, "chatcmpl", _chat_events, S.chat_completion)

    async def _respond(request, turn, req, id_prefix, events, build):
        """The reply to a completion request: an SSE stream of `events`, or the whole turn `build`-ed."""
        metrics.ttft.observe(time.perf_counter() - request.state.t0)
        rid, created = S.new_id(id_prefix), int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            report = _report(turn, req)
            return SSEResponse(events(turn, metrics, rid, req.model, created, include_usage, report), turn, metrics.closed)
        text, info, use, logprobs = await _collect(turn, _report(turn, req), id_prefix == "chatcmpl")
        return build(rid, req.model, text, turn.finish_reason or "length", use, info, logprobs)

    def _report(turn, req):
        return LogprobReport(manager.tokenizer, turn.starts) if req.logprob_count() is not None else None

    async def _collect(turn, report, is_chat):
        """Run a non-streaming turn to its end: (text, commit info, usage, logprobs or None)."""
        try:
            toks = [tok async for tok in metrics.tokens(turn)]
            text = "".join(tok.text for tok in toks)
            logprobs = None
            if report is not None:
                chosen = [t for tok in toks for t in report.add(tok)]
                logprobs = report.chat(chosen) if is_chat else report.legacy(chosen)
            info = await turn.commit()
            metrics.committed(info)
        finally:
            await turn.close()
            metrics.closed(turn)
        return text, info, S.usage(turn.prompt_tokens, turn.completion_tokens, turn.reused_tokens), logprobs

    @app.post("/v1/completions")
    async def completions(request: Request):
        request.state.t0 = time.perf_counter()
        req = await parse(request, S.CompletionRequest)
        try:
            prompt = req.prompt_text()
        except ValueError as e:
            raise ApiError(400, str(e), param="prompt")
        if not prompt:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        sid = session_id(request, req)
        n, sampling = generation_args(req, req.max_tokens)
        sampling = await constrained(req, sampling)
        turn = await open_turn(sid, "text", prompt, n, sampling, req)
        return await _respond(request, turn, req, "cmpl", _text_events, S.text_completion)

    app.openapi = lambda: _openapi(app, settings)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    from .web import mount_web  # the chat page at / (its files need no key; the API it calls does)

    app.add_middleware(AuthMiddleware, api_key=settings.api_key, open_paths=("/health", *mount_web(app, settings.model_name, manager.config)))
    app.add_middleware(RequestCounter, metrics=metrics, routes=app.routes)  # added last = runs first
    return app


def _store_errors() -> tuple[type[Exception], ...]:
    """The store's environment failures (disk full, locked, Redis gone): 503, not a bug's 500."""
    import sqlite3

    errors: tuple[type[Exception], ...] = (sqlite3.OperationalError,)
    try:
        import redis

        errors += (redis.ConnectionError, redis.TimeoutError)
    except ImportError:
        pass
    return errors


# The statuses each route really sends (besides 200); FastAPI's automatic 422 is never sent.
_ERRORS = {
    ("post", "/v1/chat/completions"): (400, 404, 409, 413, 503),
    ("post", "/v1/completions"): (400, 404, 409, 413, 503),
    ("get", "/v1/models/{model_id}"): (404,),
    ("get", "/v1/sessions"): (400, 503),
    ("get", "/v1/sessions/{sid}"): (404, 409, 503),
    ("delete", "/v1/sessions/{sid}"): (404, 409, 503),
    ("get", "/health"): (503,),
    ("get", "/metrics"): (503,),
}
_WHY = {503: "the session store is unavailable", 400: "invalid request", 401: "missing or wrong API key", 404: "unknown model, session or route",
        409: "session of the other kind, busy on another replica, or unreadable", 413: "body over --max-body-bytes"}


def _openapi(app: FastAPI, settings: Settings) -> dict:
    """FastAPI's document, corrected to what the server does: request bodies of the completion
    routes (they parse the body themselves), the error statuses it sends, no 422."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    comps = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        comps.pop(name, None)
    for cls in (S.ChatCompletionRequest, S.CompletionRequest, S.ErrorBody):
        js = cls.model_json_schema(ref_template="#/components/schemas/{model}")
        comps.update(js.pop("$defs", {}))
        comps[cls.__name__] = js
    ref = lambda name: {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}  # noqa: E731
    for path, cls in (("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest")):
        doc["paths"][path]["post"]["requestBody"] = {"required": True, "content": ref(cls)}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            responses = op["responses"]
            responses.pop("422", None)
            codes = _ERRORS.get((method, path), ()) + ((401,) if settings.api_key and path != "/health" else ())
            for status in sorted(codes):
                responses[str(status)] = {"description": _WHY[status], "content": ref("ErrorBody")}
    if settings.api_key:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
        doc["paths"]["/health"]["get"]["security"] = []  # open: liveness probes send no key
    app.openapi_schema = doc
    return doc


async def _expire_periodically(manager: SessionManager) -> None:
    """--session-ttl also applies to a server that gets no requests."""
    while True:
        await asyncio.sleep(min(60.0, max(0.5, manager.session_ttl / 4)))
        await manager.prune()


_UNION_TAGS = {"str": "a string", "list[str]": "a list of strings", "list[TextPart]": "a list of text parts",
               "int": "an integer", "float": "a number", "bool": "a boolean", "dict": "an object"}


def _describe(errors: list[dict]) -> tuple[str | None, str]:
    """(param, message) for the first validation error; a union's alternatives are merged."""
    first = errors[0]
    loc = [str(p) for p in first["loc"]]
    cut = next((i for i, p in enumerate(loc) if p in _UNION_TAGS or "[" in p), None)
    if cut is None:
        return ".".join(loc) or None, first["msg"].removeprefix("Value error, ")
    base = loc[:cut]
    tags = [str(e["loc"][cut]) for e in errors if [str(p) for p in e["loc"][:cut]] == base and len(e["loc"]) > cut]
    kinds = list(dict.fromkeys(_UNION_TAGS.get(t, t) for t in tags))
    return ".".join(base) or None, f"expected {' or '.join(kinds)}"


def _recall_info(config) -> dict:
    """Recall of evicted tokens at a glance: a session's snapshot holds its whole memory."""
    if not config.recall_blocks:
        return {"enabled": False}
    return {"enabled": True, "recall_blocks": config.recall_blocks, "block_size": config.block_size,
            "memory_tokens": config.recall_memory_tokens, "dtype": config.recall_dtype,
            "select": config.recall_select, "every": config.recall_every, "score": config.recall_score, "batched": False,
            "persisted_with_session": True}


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "streaming-llm"}


async def _chat_events(turn, metrics, rid, model, created, include_usage, report=None):
    try:
        yield sse(S.chat_chunk(rid, model, created, {"role": "assistant", "content": ""}))
        async for tok in metrics.tokens(turn):
            ready = report.add(tok) if report is not None else None
            if tok.text:
                lp = report.chat(ready) if report is not None else None
                yield sse(S.chat_chunk(rid, model, created, {"content": tok.text}, logprobs=lp))
        info = await turn.commit()  # durable before the client sees the end of the reply
        metrics.committed(info)
        yield sse(S.chat_chunk(rid, model, created, {}, turn.finish_reason or "length", session=info))
        if include_usage:
            use = S.usage(turn.prompt_tokens, turn.completion_tokens, turn.reused_tokens)
            yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": use})
        yield "data: [DONE]\n\n"
    except Exception as e:  # the status line is gone: report in-band, then end the stream
        log.exception("error while streaming %s", rid)
        yield sse(S.error_body(f"internal error while generating ({type(e).__name__})", "server_error"))


async def _text_events(turn, metrics, rid, model, created, include_usage, report=None):
    try:
        async for tok in metrics.tokens(turn):
            ready = report.add(tok) if report is not None else None
            if tok.text:
                lp = report.legacy(ready) if report is not None else None
                yield sse(S.text_chunk(rid, model, created, tok.text, logprobs=lp))
        info = await turn.commit()
        metrics.committed(info)
        yield sse(S.text_chunk(rid, model, created, "", turn.finish_reason or "length", session=info))
        if include_usage:
            use = S.usage(turn.prompt_tokens, turn.completion_tokens, turn.reused_tokens)
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [], "usage": use})
        yield "data: [DONE]\n\n"
    except Exception as e:
        log.exception("error while streaming %s", rid)
        yield sse(S.error_body(f"internal error while generating ({type(e).__name__})", "server_error"))
