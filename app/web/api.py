"""HTTP: the chat page, health, readiness, conversation history, metrics."""

from __future__ import annotations

import logging

from flask import Blueprint, abort, current_app, jsonify, request, send_from_directory
from prometheus_client import CONTENT_TYPE_LATEST

from app import streams
from app.protocol import ErrorCode, unstorable
from app.storage import NotFound
from app.web.errors import error_response
from app.web.identity import Unauthorized, bearer_token, current_owner, origin_allowed
from app.web.metrics import QueueCollector, exposition

logger = logging.getLogger(__name__)

api = Blueprint("api", __name__, static_folder="static")


def _services():
    return current_app.extensions["chat"]


@api.url_value_preprocessor
def refuse_unstorable_ids(endpoint, values) -> None:
    """An id in the path with a NUL or a lone surrogate is bad input, answered before any query."""
    for name, value in (values or {}).items():
        why = unstorable(value) if isinstance(value, str) else None
        if why:
            abort(400, description=f"{name}: {why}")


@api.get("/")
def index():
    return send_from_directory(api.static_folder, "index.html")


@api.get("/widget.js")
def widget():
    """The chat widget: ``<script src="https://HOST/widget.js" async></script>`` on an allowed site."""
    return send_from_directory(api.static_folder, "widget.js", max_age=300)


@api.get("/api/widget-config")
def widget_config():
    """What the widget asks first, from any page: whether its page's origin may use this backend (if not, it
    says so once instead of reconnecting for ever), and whether guests may chat."""
    origin = request.headers.get("Origin")
    res = jsonify({"origin_allowed": origin is None or origin_allowed(origin), "guests": _services().settings.guests})
    res.headers["Access-Control-Allow-Origin"] = "*"
    return res


@api.post("/api/guest")
def guest():
    """``{"token", "expires_in"}``: a guest token, for a page of an allowed origin, where guests are allowed. A
    guest token sent as ``Authorization: Bearer`` (even expired) renews into one for the same guest."""
    svc = _services()
    if not svc.settings.guests:
        raise Unauthorized("guests are not allowed here: the site that embeds this backend signs its users in")
    if not request.headers.get("Origin"):
        abort(403, description="guest tokens are issued to pages of allowed origins (no Origin header)")
    wait = svc.guest_buckets.take(request.remote_addr or "unknown")
    if wait > 0:
        return error_response(ErrorCode.RATE_LIMITED, "too many guest tokens from this address; try later",
                              retry_after=wait)
    token, ttl = svc.identities.guest_token(bearer_token())
    return jsonify({"token": token, "expires_in": ttl})


@api.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@api.get("/readyz")
def readyz():
    """200 when Redis and the primary answer: the load balancer's check, which must not wait for a worker (scaling
    up from zero workers would then never begin). Live workers are reported; ``?workers=1`` also requires one.
    The replica is reported, but reads go to the primary while it is away, so its loss does not count."""
    svc = _services()
    checks: dict[str, str] = {}
    for name, probe in (("redis", svc.redis.ping), ("primary", lambda: svc.store.ping("primary")),
                        ("replica", lambda: svc.store.ping("replica"))):
        try:
            probe()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"failed: {type(exc).__name__}"
    try:
        workers = streams.live_workers(svc.redis, svc.settings.queue)
        checks["worker"] = "ok" if workers else f"failed: no worker with a loaded model on {svc.settings.queue}"
    except Exception as exc:
        checks["worker"] = f"failed: {type(exc).__name__}"
    counted = {"redis", "primary"} | ({"worker"} if request.args.get("workers") in ("1", "true") else set())
    ready = all(checks[name] == "ok" for name in counted)
    if checks["replica"] != "ok":
        checks["replica"] += " (reads go to the primary)"
    body = {"status": "ready" if ready else "unavailable", "checks": checks}
    return jsonify(body), 200 if ready else 503


@api.get("/api/conversations")
def conversations():
    return jsonify({"conversations": _services().store.list_conversations(current_owner())})


@api.get("/api/conversations/<conversation_id>/messages")
def messages(conversation_id: str):
    try:
        rows = _services().store.list_messages(current_owner(), conversation_id)
    except NotFound:
        return error_response(ErrorCode.NOT_FOUND, "no such conversation")
    return jsonify({"conversation_id": conversation_id, "messages": rows})


@api.delete("/api/conversations/<conversation_id>")
def delete_conversation(conversation_id: str):
    svc = _services()
    try:
        requests = svc.store.delete_conversation(current_owner(), conversation_id)
    except NotFound:
        return error_response(ErrorCode.NOT_FOUND, "no such conversation")
    streams.forget_requests(svc.redis, requests, svc.settings.stream_ttl_s)
    return "", 204


@api.get("/metrics")
def metrics():
    svc = _services()
    queue = QueueCollector(svc.redis, svc.settings.queue, svc.settings.model_id)
    return exposition(queue), 200, {"Content-Type": CONTENT_TYPE_LATEST}
