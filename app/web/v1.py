"""The OpenAI-compatible API: ``GET /v1/models`` and ``POST /v1/chat/completions`` (SSE when ``stream``).

Requests go through the same admission, storage, queue, workers and token
streams as the WebSocket: each is stored as a new conversation of the caller
(the owner of the API key or JWT) and answered from its request's stream.
Errors come in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``,
and nothing is stored or queued for a request that gets one.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from typing import Annotated, Literal

import redis
from flask import Blueprint, Response, current_app, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

from app import streams
from app.protocol import ErrorCode, ProtocolError, SamplingParams, unstorable
from app.web import metrics
from app.web.errors import retry_after_header
from app.web.identity import Unauthorized, bearer_token

logger = logging.getLogger(__name__)

v1 = Blueprint("v1", __name__, url_prefix="/v1")


class ApiError(Exception):
    """An OpenAI-shaped error: HTTP status, message, type, and the parameter and code where there are."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.retry_after = retry_after


def _error_response(exc: ApiError):
    headers = retry_after_header(exc.retry_after)
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="chat"'
    metrics.ERRORS.labels(_CODES.get(exc.status, ErrorCode.BAD_REQUEST).value).inc()
    body = {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
    return jsonify(body), exc.status, headers


_CODES = {401: ErrorCode.UNAUTHORIZED, 404: ErrorCode.NOT_FOUND, 413: ErrorCode.TOO_LARGE,
          429: ErrorCode.RATE_LIMITED, 500: ErrorCode.INTERNAL, 503: ErrorCode.UNAVAILABLE}


@v1.errorhandler(ApiError)
def _api_error(exc: ApiError):
    return _error_response(exc)


@v1.errorhandler(HTTPException)
def _http_error(exc: HTTPException):
    code = {413: "content_too_large", 405: "method_not_allowed"}.get(exc.code)
    return _error_response(ApiError(exc.code or 400, exc.description or exc.name, code=code))


@v1.errorhandler(Unauthorized)
def _unauthorized(exc: Unauthorized):
    return _error_response(ApiError(401, f"invalid credentials: {exc}", "authentication_error",
                                    code="invalid_api_key"))


@v1.errorhandler(OperationalError)
@v1.errorhandler(redis.RedisError)
def _unavailable(exc: Exception):
    logger.error("Backing service unavailable: %s", exc)
    return _error_response(ApiError(503, "a backing service is unavailable; nothing was stored, try again",
                                    "server_error", code="unavailable"))


@v1.errorhandler(Exception)
def _internal(exc: Exception):
    logger.exception("Unhandled error in the OpenAI API")
    return _error_response(ApiError(500, "internal error", "server_error"))


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    type: StrictStr
    text: StrictStr | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[_Part] | None = None


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    include_usage: StrictBool = False


class CompletionRequest(BaseModel):
    """The fields of OpenAI's chat completion request that this backend acts on; others are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    model: StrictStr
    messages: Annotated[list[_Message], Field(min_length=1, max_length=1000)]
    stream: StrictBool = False
    stream_options: _StreamOptions | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[StrictFloat | StrictInt, Field(ge=0)] | None = None
    n: StrictInt | None = None


def _services():
    return current_app.extensions["chat"]


def _caller() -> str:
    token = bearer_token()
    if not token or request.args.get("token"):  # the API takes its credentials in the header only
        raise ApiError(401, "missing credentials: send Authorization: Bearer <API key or JWT>",
                       "authentication_error", code="invalid_api_key")
    return _services().identities.owner(token)


def model_ready(svc) -> bool:
    return bool(streams.live_workers(svc.redis, svc.settings.queue))


@v1.get("/models")
def models():
    svc = _services()
    _caller()
    return jsonify({"object": "list", "data": [
        {"id": svc.settings.model_id, "object": "model", "created": 0, "owned_by": "chatqueue",
         "ready": model_ready(svc)}]})


def _parse(body: bytes, settings) -> tuple[CompletionRequest, list[tuple[str, str]], dict]:
    """The request, its messages as (role, text), and the engine's parameters; :class:`ApiError` if bad."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(400, "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        req = CompletionRequest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise ApiError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param) from None
    if req.n not in (None, 1):
        raise ApiError(400, "n: only one choice per request is supported", param="n")
    if req.model != settings.model_id:
        raise ApiError(404, f"the model {req.model[:100]!r} does not exist here; GET /v1/models lists them",
                       param="model", code="model_not_found")
    messages = []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, list):
            if any(p.type != "text" or p.text is None for p in m.content):
                raise ApiError(400, f"messages.{i}.content: only text parts are supported",
                               param=f"messages.{i}.content")
            text = "".join(p.text for p in m.content)
        else:
            text = m.content or ""
        why = unstorable(text)
        if why:
            raise ApiError(400, f"messages.{i}.content: {why}", param=f"messages.{i}.content")
        if len(text) > settings.max_content_chars:
            raise ApiError(413, f"messages.{i}.content: over the limit of {settings.max_content_chars} characters",
                           param=f"messages.{i}.content", code="content_too_large")
        messages.append(("system" if m.role == "developer" else m.role, text))
    if messages[-1][0] != "user" or not messages[-1][1].strip():
        raise ApiError(400, "the last message must be the user's, and not empty", param="messages")
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None and max_tokens > settings.max_new_tokens_cap:
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise ApiError(400, f"{param}: at most {settings.max_new_tokens_cap}", param=param)
    temperature = float(req.temperature or 0.0)
    if temperature > settings.max_temperature:
        raise ApiError(400, f"temperature: at most {settings.max_temperature}", param="temperature")
    params = SamplingParams(max_new_tokens=max_tokens or settings.default_max_new_tokens, temperature=temperature)
    return req, messages, params


@v1.post("/chat/completions")
def chat_completions():
    svc = _services()
    owner = _caller()
    req, messages, params = _parse(request.get_data(cache=False), svc.settings)
    if not model_ready(svc):
        raise ApiError(503, f"no worker serves {svc.settings.model_id} at the moment; try again",
                       "server_error", code="model_not_ready")
    try:
        svc.admission.admit(owner)
    except ProtocolError as exc:
        status = 429 if exc.code == ErrorCode.RATE_LIMITED else 503
        raise ApiError(status, exc.message, "rate_limit_error" if status == 429 else "server_error",
                       code=exc.code.value, retry_after=exc.retry_after) from None
    accepted = svc.store.accept_exchange(owner, messages, params)
    if not svc.queue.submit(svc.store, accepted.request_id, drop_conversation=True):
        raise ApiError(503, "the queue is unavailable; nothing was stored, try again", "server_error",
                       code="unavailable")
    reply = Reply(svc, accepted.request_id, svc.settings.model_id, _gone_check())
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return Response(reply.sse(usage), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return reply.whole()


def _gone_check():
    """A check, usable after the view returns, of whether the client has closed its connection."""
    sock = request.environ.get("gunicorn.socket")
    raw = getattr(sock, "_sock", sock)  # under gevent, the OS socket inside its cooperative wrapper

    def gone() -> bool:
        if raw is None:
            return False
        try:
            return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False  # open, nothing sent: still waiting for us
        except OSError:
            return True
    return gone


class Reply:
    """One request's answer, read from its token stream; the request is cancelled if its client goes."""

    def __init__(self, svc, request_id: str, model: str, gone):
        self.svc, self.request_id, self.model, self.gone = svc, request_id, model, gone
        self.id, self.created = f"chatcmpl-{request_id}", int(time.time())

    def frames(self) -> Iterator[dict]:
        """The request's frames until its `done`; a client that goes away cancels the request."""
        finished = False
        try:
            for frame in streams.follow(self.svc.hub, self.request_id, -1, stop=self.gone):
                finished = frame["type"] == "done"
                yield frame
        finally:
            if not finished:  # the client went away (or stopped reading): the worker stops, keeps what it made
                logger.info("Client of %s went away; cancelling it", self.request_id)
                streams.request_cancel(self.svc.redis, self.request_id, self.svc.settings.stream_ttl_s)

    def whole(self):
        parts, done = [], None
        for frame in self.frames():
            if frame["type"] == "token":
                parts.append(frame["text"])
            elif frame["type"] == "done":
                done = frame
        if done is None:
            return "", 499  # nobody is there to read it
        if done["finish_reason"] == "error":
            raise ApiError(500, "the model failed on this request", "server_error")
        return jsonify({
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                         "finish_reason": done["finish_reason"], "logprobs": None}],
            "usage": _usage(done),
        })

    def _chunk(self, delta: dict, finish_reason: str | None = None, **extra) -> str:
        return _event({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                       "model": self.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                                         "logprobs": None}], **extra})

    def sse(self, include_usage: bool) -> Iterator[str]:
        yield self._chunk({"role": "assistant", "content": ""})
        frames = self.frames()
        try:
            for frame in frames:
                if frame["type"] == "token":
                    yield self._chunk({"content": frame["text"]})
                elif frame["type"] == "done":
                    if frame["finish_reason"] == "error":
                        yield _event({"error": {"message": "the model failed on this request",
                                                "type": "server_error", "param": None, "code": None}})
                    else:  # with the engine's own time to its first token, as the WebSocket's `done` has it
                        yield self._chunk({}, frame["finish_reason"], **({"timing": frame["timing"]}
                                                                         if "timing" in frame else {}))
                    if include_usage:
                        yield _event({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                      "model": self.model, "choices": [], "usage": _usage(frame)})
        except redis.RedisError as exc:
            logger.error("Lost the token stream of %s: %s", self.request_id, exc)
            yield _event({"error": {"message": "token stream interrupted", "type": "server_error", "param": None,
                                    "code": "unavailable"}})
        finally:
            frames.close()  # at once, also when the server stops this generator because the client went away
        yield "data: [DONE]\n\n"


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _usage(done: dict) -> dict:
    prompt, completion = done["usage"]["prompt_tokens"], done["usage"]["completion_tokens"]
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if "prompt_tokens_details" in done["usage"]:
        usage["prompt_tokens_details"] = done["usage"]["prompt_tokens_details"]
    return usage
