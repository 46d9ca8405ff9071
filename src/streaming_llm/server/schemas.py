"""Request and response bodies of the HTTP API (OpenAI conventions) as pydantic models.

Requests are validated strictly (a string where a number belongs is a 400, not a coercion);
unknown fields are accepted and ignored, as OpenAI-compatible servers usually do, except for the
OpenAI features this server does not implement (`n` > 1, tools), which get a
clear 400 from `unsupported_features`. `response_format` (both routes; an extension on
completions, as in vLLM) is checked and compiled by `structured.py`. `stop` (a string or up to 4) and logprobs (chat:
`logprobs` + `top_logprobs` 0..20; completions: `logprobs` 0..5) are validated here. Server-dependent bounds (max_tokens, the model name) are
checked by the routes, not here. Responses are plain dicts built by the helpers at the bottom.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from .stops import MAX_LEGACY_LOGPROBS, MAX_STOPS, MAX_TOP_LOGPROBS

ROLES = ("system", "developer", "user", "assistant")
SESSION_ID_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[TextPart]]
    name: StrictStr | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def as_dict(self) -> dict:
        # "developer" is OpenAI's newer name for the system role; templates only know "system".
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class _Generation(_Strict):
    """Fields shared by chat and text completions."""

    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(default=None, ge=0)  # extension (vLLM-style)
    # extension; below 0.01 the penalised logits overflow float32 (1e-300 made the sampler fail)
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=10.0)
    seed: StrictInt | None = Field(default=None, ge=-(1 << 63), le=(1 << 64) - 1)  # what torch's generator takes
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    # Session naming (see docs/server.md): X-Session-ID header > session_id > user.
    user: StrictStr | None = None
    session_id: StrictStr | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        if isinstance(v, list) and len(v) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences are allowed (got {len(v)})")
        return v

    def stop_list(self) -> tuple[str, ...]:
        """The stop sequences, empty ones dropped."""
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stops if s)

    @field_validator("session_id")
    @classmethod
    def _check_session_id(cls, v):
        if v is not None and not SESSION_ID_RE.match(v):
            raise ValueError("session_id must be 1-128 characters from A-Z a-z 0-9 . _ : @ -")
        return v


class ChatCompletionRequest(_Generation):
    messages: list[Message]
    max_completion_tokens: StrictInt | None = None  # OpenAI's newer name for max_tokens
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    response_format: Any = None
    session_append: StrictBool = False  # extension: messages are appended to the named session
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def logprob_count(self) -> int | None:
        """How many alternatives per token to report (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("messages")
    @classmethod
    def _non_empty(cls, v):
        if not v:
            raise ValueError("messages must contain at least one message")
        return v


class CompletionRequest(_Generation):
    prompt: Union[StrictStr, list[StrictStr]]
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None
    response_format: Any = None  # extension (vLLM-style): JSON mode on completions too
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LEGACY_LOGPROBS)

    def logprob_count(self) -> int | None:
        return self.logprobs

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ValueError("prompt: only a single prompt per request is supported")
        return self.prompt[0]


def unsupported_features(req: _Generation) -> tuple[str, str] | None:
    """(param, message) for the first OpenAI feature this server does not implement, if any."""
    if req.n not in (None, 1):
        return "n", "only n=1 is supported"
    if req.frequency_penalty not in (None, 0, 0.0) or req.presence_penalty not in (None, 0, 0.0):
        return "frequency_penalty", "frequency/presence penalties are not supported; use repetition_penalty"
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None and not req.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        if req.tools or req.functions or req.tool_choice not in (None, "none"):
            return "tools", "tools and function calling are not supported"
    if isinstance(req, CompletionRequest):
        if req.echo:
            return "echo", "echo is not supported"
        if req.suffix:
            return "suffix", "suffix is not supported"
        if req.best_of not in (None, 1):
            return "best_of", "only best_of=1 is supported"
    return None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """Every error response: `{"error": {message, type, param, code}}`."""

    error: ErrorDetail


# ---- responses --------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def chat_completion(rid: str, model: str, text: str, finish: str, use: dict, session: dict | None, logprobs=None) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": logprobs}
        ],
        "usage": use,
        "session": session,
    }


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None = None, logprobs=None, **extra) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}],
        **extra,
    }


def text_completion(rid: str, model: str, text: str, finish: str, use: dict, session: dict | None, logprobs=None) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}],
        "usage": use,
        "session": session,
    }


def text_chunk(rid: str, model: str, created: int, text: str, finish: str | None = None, logprobs=None, **extra) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}],
        **extra,
    }


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
