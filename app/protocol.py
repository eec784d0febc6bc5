"""Wire contract v1: client frames parsed into typed messages, server frames built.

Plain module shared by both tiers (no Flask, no torch).
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, TypeAdapter, ValidationError


class ErrorCode(str, enum.Enum):
    BAD_REQUEST = "bad_request"
    TOO_LARGE = "too_large"
    NOT_FOUND = "not_found"
    UNAUTHORIZED = "unauthorized"
    BUSY = "busy"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


HTTP_STATUS = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.INTERNAL: 500,
    ErrorCode.BUSY: 503,
    ErrorCode.UNAVAILABLE: 503,
}


class ProtocolError(Exception):
    """A client mistake or a refused request, carried to an `error` frame."""

    def __init__(self, code: ErrorCode, message: str, request_id: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """What one request asks of generation, whole: built by the web tier from a frame or an API body, stored with
    the request, read by the worker and handed to the engine as it is."""

    max_new_tokens: int
    temperature: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SamplingParams:
        return cls(max_new_tokens=int(data["max_new_tokens"]), temperature=float(data.get("temperature", 0.0)))


class _Frame(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Chat(_Frame):
    type: Literal["chat"]
    content: StrictStr
    conversation_id: StrictStr | None = None
    client_id: Annotated[StrictStr, Field(min_length=1, max_length=128)] | None = None
    max_new_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[StrictFloat | StrictInt, Field(ge=0)] | None = None


class Cancel(_Frame):
    type: Literal["cancel"]
    request_id: StrictStr


class Resume(_Frame):
    type: Literal["resume"]
    request_id: StrictStr
    after_seq: Annotated[StrictInt, Field(ge=-1)] = -1


class Ping(_Frame):
    type: Literal["ping"]


class Auth(_Frame):
    """Signs the socket in: the JWT that ``?token=`` would carry (answered ``authenticated``)."""

    type: Literal["auth"]
    token: Annotated[StrictStr, Field(min_length=1, max_length=8192)]


ClientFrame = Annotated[Chat | Cancel | Resume | Ping | Auth, Field(discriminator="type")]
_client_frame = TypeAdapter(ClientFrame)


def unstorable(text: str) -> str | None:
    """Why ``text`` cannot be stored or sent on as it is (a NUL, or half of a UTF-16 surrogate pair); None if it can.

    JSON may carry both as escapes; PostgreSQL's text takes neither, nor does UTF-8.
    """
    if "\x00" in text:
        return "must not contain NUL characters"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "must not contain lone surrogates"
    return None


def parse_client_frame(raw: str | bytes, max_content_chars: int) -> Chat | Cancel | Resume | Ping | Auth:
    """Parse one text frame or raise :class:`ProtocolError` with the contract's code."""
    if isinstance(raw, bytes):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "frames must be text (JSON), not binary")
    try:
        data = json.loads(raw)
    except ValueError:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "frame is not valid JSON") from None
    except RecursionError:  # arrays or objects nested thousands deep
        raise ProtocolError(ErrorCode.BAD_REQUEST, "frame is nested too deeply") from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "frame must be a JSON object")
    if "type" not in data:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "frame has no 'type'")
    if data["type"] not in ("chat", "cancel", "resume", "ping", "auth"):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"unknown frame type {str(data['type'])[:40]!r}")
    try:
        frame = _client_frame.validate_python(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"][1:]) or "frame"
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{where}: {err['msg']}") from None
    for field, value in frame:
        why = unstorable(value) if isinstance(value, str) else None
        if why:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{field}: {why}")
    if isinstance(frame, Chat):
        if not frame.content.strip():
            raise ProtocolError(ErrorCode.BAD_REQUEST, "content: must not be empty")
        if len(frame.content) > max_content_chars:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"content: over the limit of {max_content_chars} characters")
    return frame


def error_frame(exc: ProtocolError) -> dict:
    frame = {"type": "error", "code": exc.code.value, "message": exc.message}
    if exc.request_id is not None:
        frame["request_id"] = exc.request_id
    if exc.retry_after is not None:
        frame["retry_after"] = exc.retry_after
    return frame


def accepted_frame(request_id: str, conversation_id: str, user_message_id: str, queue_depth: int) -> dict:
    return {"type": "accepted", "request_id": request_id, "conversation_id": conversation_id,
            "user_message_id": user_message_id, "queue_depth": queue_depth}


def token_frame(request_id: str, seq: int, text: str) -> dict:
    return {"type": "token", "request_id": request_id, "seq": seq, "text": text}


def done_frame(request_id: str, message_id: str | None, finish_reason: str, prompt_tokens: int,
               completion_tokens: int, engine_first_token_ms: float | None = None,
               cached_tokens: int | None = None) -> dict:
    """``timing.engine_first_token_ms`` (optional): from the engine taking the request to its first token.
    ``usage.prompt_tokens_details.cached_tokens`` (optional, as OpenAI's): prompt tokens the worker did not
    compute, taken from keys and values it kept (the system prompt's, a conversation's earlier turns')."""
    frame = {"type": "done", "request_id": request_id, "message_id": message_id, "finish_reason": finish_reason,
             "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}}
    if cached_tokens is not None:
        frame["usage"]["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    if engine_first_token_ms is not None:
        frame["timing"] = {"engine_first_token_ms": round(engine_first_token_ms, 1)}
    return frame


def stored_done_frame(request_id: str, reply) -> dict:
    """`done` for a request whose token stream has expired, from its stored reply: ``content`` holds the
    whole reply, to stand in for the tokens the client missed."""
    frame = done_frame(request_id, reply.id, reply.finish_reason or "stop", reply.prompt_tokens or 0,
                       reply.completion_tokens or 0)
    frame["content"] = reply.content
    return frame
