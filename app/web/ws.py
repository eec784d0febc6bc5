"""The WebSocket protocol at ``/ws``: parse frames, dispatch on type, answer in contract frames."""

from __future__ import annotations

import json
import logging
import threading

import redis
from flask import abort, current_app, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed
from sqlalchemy.exc import OperationalError

from app import streams
from app.protocol import (
    Auth,
    Cancel,
    Chat,
    ErrorCode,
    Ping,
    ProtocolError,
    Resume,
    SamplingParams,
    accepted_frame,
    error_frame,
    parse_client_frame,
    stored_done_frame,
)
from app.storage import NotFound
from app.web import metrics
from app.web.errors import error_response
from app.web.identity import Unauthorized, bearer_token, origin_allowed

logger = logging.getLogger(__name__)

sock = Sock()

UNAVAILABLE = "a backing service is unavailable; nothing was stored, try again"


class Connection:
    """One client's socket: the receive loop here, one follower thread per request it watches."""

    def __init__(self, ws, services, owner: str | None):
        self.ws = ws
        self.svc = services
        self.owner = owner
        self._send_lock = threading.Lock()
        self._followers: dict[str, threading.Event] = {}
        self._followers_lock = threading.Lock()

    def send(self, frame: dict, follower: threading.Event | None = None) -> None:
        with self._send_lock:
            # A follower replaced by a newer `resume` must not send any more.
            if follower is not None and follower.is_set():
                return
            self.ws.send(json.dumps(frame, ensure_ascii=False))
        if frame["type"] == "error":
            metrics.ERRORS.labels(frame["code"]).inc()

    def serve(self, auth_error: str | None = None) -> None:
        if auth_error:
            self.send(error_frame(ProtocolError(ErrorCode.UNAUTHORIZED, auth_error)))
        try:
            while True:
                raw = self.ws.receive()
                if raw is None:
                    continue
                self.handle(raw)
        finally:
            with self._followers_lock:
                for stop in self._followers.values():
                    stop.set()

    def handle(self, raw: str | bytes) -> None:
        frame = None
        try:
            frame = parse_client_frame(raw, self.svc.settings.max_content_chars)
            metrics.FRAMES_IN.labels(frame.type).inc()
            if isinstance(frame, Auth):
                self.auth(frame)
            elif isinstance(frame, Ping):
                self.send({"type": "pong"})
            elif self.owner is None:
                raise ProtocolError(ErrorCode.UNAUTHORIZED, "not signed in: connect with ?token=<JWT> or send "
                                    "an auth frame first", getattr(frame, "request_id", None))
            elif isinstance(frame, Chat):
                self.chat(frame)
            elif isinstance(frame, Cancel):
                self.cancel(frame)
            elif isinstance(frame, Resume):
                self.resume(frame)
        except ProtocolError as exc:
            self.send(error_frame(exc))
        except (OperationalError, redis.RedisError) as exc:
            logger.error("Backing service unavailable: %s", exc)
            self.send(error_frame(ProtocolError(ErrorCode.UNAVAILABLE, UNAVAILABLE, getattr(frame, "request_id", None))))
        except ConnectionClosed:
            raise
        except Exception:
            logger.exception("Unhandled error on a %s frame", getattr(frame, "type", "malformed"))
            self.send(error_frame(ProtocolError(ErrorCode.INTERNAL, "internal error")))

    def auth(self, frame: Auth) -> None:
        """Sign the socket in (or renew its token): the caller may not change on an open socket."""
        try:
            owner = self.svc.identities.owner(frame.token)
        except Unauthorized as exc:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, str(exc)) from None
        if self.owner is not None and owner != self.owner:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "this socket is signed in as another caller; open a new one")
        self.owner = owner
        self.send({"type": "authenticated"})

    def chat(self, frame: Chat) -> None:
        settings = self.svc.settings
        params = SamplingParams(
            max_new_tokens=min(frame.max_new_tokens or settings.default_max_new_tokens, settings.max_new_tokens_cap),
            temperature=float(frame.temperature or 0.0))
        if params.temperature > settings.max_temperature:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"temperature: at most {settings.max_temperature}")
        self.svc.admission.admit(self.owner)
        try:
            accepted = self.svc.store.accept_chat(self.owner, frame.content, frame.conversation_id,
                                                  frame.client_id, params)
        except NotFound:
            raise ProtocolError(ErrorCode.NOT_FOUND, "no such conversation") from None
        if accepted.created:
            if not self.svc.queue.submit(self.svc.store, accepted.request_id,
                                         drop_conversation=frame.conversation_id is None,
                                         conversation_id=frame.conversation_id):
                raise ProtocolError(ErrorCode.UNAVAILABLE, UNAVAILABLE)
            # Counted after the push, which is what a worker waits for: the others on the queue.
            depth = max(self.svc.queue.depth() - 1, 0)
        else:
            depth = self.svc.queue.depth()
        self.send(accepted_frame(accepted.request_id, accepted.conversation_id, accepted.user_message_id, depth))
        self.follow(accepted.request_id, -1)

    def cancel(self, frame: Cancel) -> None:
        if not self.svc.store.owns_request(self.owner, frame.request_id):
            raise ProtocolError(ErrorCode.NOT_FOUND, "no such request", frame.request_id)
        streams.request_cancel(self.svc.redis, frame.request_id, self.svc.settings.stream_ttl_s)

    def resume(self, frame: Resume) -> None:
        if not self.svc.store.owns_request(self.owner, frame.request_id):
            raise ProtocolError(ErrorCode.NOT_FOUND, "no such request", frame.request_id)
        if not streams.has_stream(self.svc.redis, frame.request_id):
            # No stream: not started yet (then it comes), or long done and expired: answered from storage.
            reply = self.svc.store.stored_reply(frame.request_id)
            if reply is not None:
                self.send(stored_done_frame(frame.request_id, reply))
                return
        self.follow(frame.request_id, frame.after_seq)

    def follow(self, request_id: str, after_seq: int) -> None:
        """Forward the request's stream from ``after_seq`` on a thread of its own."""
        stop = threading.Event()
        with self._followers_lock:
            previous = self._followers.get(request_id)
            if previous is not None:
                previous.set()
            self._followers[request_id] = stop
        threading.Thread(target=self._forward, args=(request_id, after_seq, stop),
                         name=f"follow-{request_id[:8]}", daemon=True).start()

    def _forward(self, request_id: str, after_seq: int, stop: threading.Event) -> None:
        try:
            for frame in streams.follow(self.svc.hub, request_id, after_seq, stop=stop.is_set):
                self.send(frame, follower=stop)
        except ConnectionClosed:
            pass
        except redis.RedisError as exc:
            logger.error("Lost the token stream of %s: %s", request_id, exc)
            try:
                self.send(error_frame(ProtocolError(
                    ErrorCode.UNAVAILABLE, "token stream interrupted; send resume to continue", request_id)),
                    follower=stop)
            except ConnectionClosed:
                pass
        finally:
            with self._followers_lock:
                if self._followers.get(request_id) is stop:
                    del self._followers[request_id]


@sock.route("/ws")
def websocket(ws):
    svc = current_app.extensions["chat"]
    metrics.OPEN_SOCKETS.inc()
    try:
        Connection(ws, svc, request.environ.get("chat.owner")).serve(request.environ.get("chat.auth_error"))
    finally:
        metrics.OPEN_SOCKETS.dec()


# Requests that change something: a foreign page must not send them.
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def check_origin_and_identify():
    """Before the handshake, and before any request that changes something: refuse foreign origins. Then, for
    the handshake: refuse it at once (503) past the process's socket limit, and find the caller of its token."""
    if request.path != "/ws" and request.method not in UNSAFE_METHODS:
        return
    origin = request.headers.get("Origin")
    svc = current_app.extensions["chat"]
    if origin and not origin_allowed(origin):
        abort(403, description="origin not allowed")
    if request.path != "/ws":
        return
    if not svc.sockets.acquire():
        metrics.ERRORS.labels(ErrorCode.BUSY.value).inc()
        return error_response(ErrorCode.BUSY, f"this web process holds its limit of {svc.settings.max_sockets} "
                              f"sockets; try again later", retry_after=svc.settings.busy_retry_after_s)
    request.environ["chat.socket_slot"] = True
    token = bearer_token()
    if token:
        try:
            request.environ["chat.owner"] = svc.identities.owner(token)
        except Unauthorized as exc:
            request.environ["chat.auth_error"] = str(exc)


def release_socket_slot(_exc=None) -> None:
    """After the handshake's request ends (its socket closed, or refused before it opened): free its slot."""
    if request.environ.pop("chat.socket_slot", False):
        current_app.extensions["chat"].sockets.release()


def allow_cross_origin(response):
    """CORS: the widget's modules for any page; the API's answers for pages of allowed origins only (others
    get no CORS headers, so their browser keeps the answer from them)."""
    origin = request.headers.get("Origin")
    if request.path.startswith("/static/"):
        response.headers["Access-Control-Allow-Origin"] = "*"
    elif origin and request.path.startswith("/api/") and origin_allowed(origin):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE"
        response.headers["Access-Control-Max-Age"] = "600"
        response.vary.add("Origin")
    return response
