"""Token streams, cancel flags and worker heartbeats in Redis.

Each request has a Redis Stream ``stream:<request_id>`` holding its `token`
frames (seq 0, 1, 2, ...) and one final `done` frame, kept for a while after
the last write so that a reconnecting client can resume. Workers write them
(workers/relay.py); the web tier follows them here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import redis

STREAM_PREFIX = "stream:"
CANCEL_PREFIX = "cancel:"
WORKER_PREFIX = "worker:"


def stream_key(request_id: str) -> str:
    return STREAM_PREFIX + request_id


def cancel_key(request_id: str) -> str:
    return CANCEL_PREFIX + request_id


def connect(url: str, max_connections: int | None = None) -> redis.Redis:
    """A client that fails fast when Redis is down instead of hanging a request."""
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections or 200, timeout=5, socket_connect_timeout=2, decode_responses=True)
    return redis.Redis(connection_pool=pool)


def stream_events(client: redis.Redis, request_id: str) -> list[dict]:
    """Every frame of the request's stream so far, oldest first."""
    return [json.loads(f["frame"]) for _, f in client.xrange(stream_key(request_id))]


def request_cancel(client: redis.Redis, request_id: str, ttl_s: int) -> None:
    client.set(cancel_key(request_id), "1", ex=ttl_s)


def follow(client: redis.Redis, request_id: str, after_seq: int = -1, block_ms: int = 1000,
           stop: Callable[[], bool] = lambda: False) -> Iterator[dict]:
    """Yield the request's frames with seq > ``after_seq``, live, until its `done`.

    ``stop()`` is asked between blocking reads (at least every ``block_ms``):
    true ends the generator, as when the client's socket has gone.
    """
    key = stream_key(request_id)
    last_id = "0-0"
    while not stop():
        reply = client.xread({key: last_id}, block=block_ms, count=256)
        if not reply:
            continue
        for entry_id, fields in reply[0][1]:
            last_id = entry_id
            frame = json.loads(fields["frame"])
            if frame["type"] == "token" and frame["seq"] <= after_seq:
                continue
            yield frame
            if frame["type"] == "done":
                return


def beat(client: redis.Redis, name: str, info: dict, ttl_s: int) -> None:
    """Say that worker ``name`` is alive with a loaded model, for ``ttl_s`` seconds."""
    client.set(WORKER_PREFIX + name, json.dumps(info), ex=ttl_s)


def live_workers(client: redis.Redis) -> list[dict]:
    keys = list(client.scan_iter(match=WORKER_PREFIX + "*", count=100))
    if not keys:
        return []
    return [json.loads(v) for v in client.mget(keys) if v]
