"""Token streams, cancel flags, worker heartbeats and conversation affinity in Redis.

Each request has a Redis Stream ``stream:<request_id>`` holding its `token`
frames (seq 0, 1, 2, ...) and one final `done` frame, kept for a while after
the last write so that a reconnecting client can resume. Workers write them
(workers/relay.py); the web tier follows them here.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import redis

logger = logging.getLogger(__name__)

STREAM_PREFIX = "stream:"
CANCEL_PREFIX = "cancel:"
WORKER_PREFIX = "worker:"
# The names of the workers that beat, each with the time of its last beat: where readers find the heartbeats
# without scanning the keyspace, which holds a stream and an affinity key per recent request.
WORKERS_KEY = "workers"
# A name whose last beat is older than this leaves the index (its heartbeat expired long before).
WORKERS_FORGET_S = 24 * 3600
# Per model queue: how many tasks workers have taken off it, ever (the web tier's admission reads its rate).
TAKEN_PREFIX = "taken:"
# Per conversation: the worker that served its last turn, which keeps that turn's prompt (workers/engine/prefix.py).
AFFINITY_PREFIX = "affinity:"
# Per worker: how many requests it holds now, counted by the worker as it takes and ends them.
LOAD_PREFIX = "load:"
# Per model queue: a set of the own queues of the workers that ever served it.
OWN_QUEUES_PREFIX = "own-queues:"


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


def has_stream(client: redis.Redis, request_id: str) -> bool:
    return bool(client.exists(stream_key(request_id)))


def request_cancel(client: redis.Redis, request_id: str, ttl_s: int) -> None:
    client.set(cancel_key(request_id), "1", ex=ttl_s)


# How long the stream of a deleted conversation's request is kept: long enough for a follower to read its end.
FORGET_AFTER_S = 10


def forget_requests(client: redis.Redis, request_ids: list[str], ttl_s: int) -> None:
    """The conversation of these requests was deleted: stop any still generating, and let their streams (and
    the text in them) go within :data:`FORGET_AFTER_S`."""
    if not request_ids:
        return
    pipe = client.pipeline(transaction=False)
    for request_id in request_ids:
        pipe.set(cancel_key(request_id), "1", ex=ttl_s)
        pipe.expire(stream_key(request_id), FORGET_AFTER_S)
    pipe.execute()


def _entry_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(eq=False)
class Subscription:
    """One follower of one stream: its frames (or the error that ended them) arrive on ``inbox``."""

    key: str
    last_id: str = "0-0"
    inbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)


class StreamHub:
    """One blocking XREAD for every stream a web process follows, on one thread.

    A follower per stream, each blocked in its own XREAD, woke itself, Redis
    and a round trip once per token; here one read returns the frames of a
    whole forward pass (the worker writes them in one pipeline) and hands each
    to its follower's queue. A new follower wakes the reader through the hub's
    own stream (``hub:<id>``), so it waits for no timeout. If a read fails,
    every follower gets the error and the hub starts again with those that
    come next.
    """

    def __init__(self, client: redis.Redis, block_ms: int = 1000, wake_ttl_s: int = 3600):
        self.client = client
        self.block_ms = block_ms
        self.wake_ttl_s = wake_ttl_s
        self._wake_key = f"hub:{uuid.uuid4().hex}"
        self._wake_id = "0-0"
        self._subs: dict[str, list[Subscription]] = {}
        self._lock = threading.Lock()
        self._followed = threading.Event()  # set when a follower comes
        self._thread: threading.Thread | None = None

    def subscribe(self, request_id: str) -> Subscription:
        """Follow the request's stream from its start; raises RedisError where Redis cannot be reached."""
        sub = Subscription(stream_key(request_id))
        with self._lock:
            self._subs.setdefault(sub.key, []).append(sub)
            self._followed.set()
            if self._thread is None:  # started in the process that serves (after any fork)
                self._thread = threading.Thread(target=self._run, name="stream-hub", daemon=True)
                self._thread.start()
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.xadd(self._wake_key, {"wake": "1"}, maxlen=1)
            pipe.expire(self._wake_key, self.wake_ttl_s)
            pipe.execute()
        except redis.RedisError:
            self.unsubscribe(sub)
            raise
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            subs = self._subs.get(sub.key, [])
            if sub in subs:
                subs.remove(sub)
            if not subs:
                self._subs.pop(sub.key, None)

    def _run(self) -> None:
        while True:
            with self._lock:
                # One read position per stream: the earliest of its followers'.
                wanted = {key: min((s.last_id for s in subs), key=_entry_id) for key, subs in self._subs.items()}
                if not wanted:
                    self._followed.clear()
            if not wanted:  # nothing to read until somebody follows a stream
                self._followed.wait()
                continue
            try:
                reply = self.client.xread({self._wake_key: self._wake_id, **wanted}, block=self.block_ms, count=256)
            except redis.RedisError as exc:
                logger.error("Reading token streams failed: %s", exc)
                with self._lock:
                    failed = [s for subs in self._subs.values() for s in subs]
                    self._subs.clear()
                for sub in failed:
                    sub.inbox.put(exc)
                time.sleep(0.5)
                continue
            for key, entries in reply or []:
                if key == self._wake_key:
                    self._wake_id = entries[-1][0]
                    continue
                with self._lock:
                    subs = list(self._subs.get(key, []))
                for entry_id, fields in entries:
                    frame = json.loads(fields["frame"])
                    for sub in subs:
                        if _entry_id(entry_id) > _entry_id(sub.last_id):
                            sub.last_id = entry_id
                            sub.inbox.put(frame)


def follow(hub: StreamHub, request_id: str, after_seq: int = -1, wait_s: float = 1.0,
           stop: Callable[[], bool] = lambda: False) -> Iterator[dict]:
    """Yield the request's frames with seq > ``after_seq``, live, until its `done`.

    ``stop()`` is asked at least every ``wait_s``: true ends the generator, as
    when the client's socket has gone. A failed read raises its RedisError.
    """
    sub = hub.subscribe(request_id)
    try:
        while not stop():
            try:
                item = sub.inbox.get(timeout=wait_s)
            except queue.Empty:
                continue
            if isinstance(item, Exception):
                raise item
            if item["type"] == "token" and item["seq"] <= after_seq:
                continue
            yield item
            if item["type"] == "done":
                return
    finally:
        hub.unsubscribe(sub)


def count_taken(client: redis.Redis, queue_name: str) -> None:
    """A worker took a task off ``queue_name``."""
    client.incr(TAKEN_PREFIX + queue_name)


def beat(client: redis.Redis, name: str, info: dict, ttl_s: int) -> None:
    """Say that worker ``name`` is alive with a loaded model, for ``ttl_s`` seconds; list its name in the index."""
    now = time.time()
    (client.pipeline(transaction=False).set(WORKER_PREFIX + name, json.dumps(info), ex=ttl_s)
     .zadd(WORKERS_KEY, {name: now}).zremrangebyscore(WORKERS_KEY, "-inf", now - WORKERS_FORGET_S).execute())


def live_workers(client: redis.Redis, queue: str | None = None) -> list[dict]:
    """The heartbeats of the workers alive with a loaded model: of those that serve ``queue``, where given.

    Two round trips however many keys Redis holds: the names from the index, then their heartbeats (a name
    whose heartbeat expired has none).
    """
    names = client.zrange(WORKERS_KEY, 0, -1)
    if not names:
        return []
    beats = [json.loads(v) for v in client.mget([WORKER_PREFIX + _text(n) for n in names]) if v]
    return beats if queue is None else [b for b in beats if b.get("queue") == queue]


def _text(value: str | bytes) -> str:
    """A reply's string, from a client that decodes replies or one that does not."""
    return value.decode() if isinstance(value, bytes) else value


def own_queue(queue: str, worker: str) -> str:
    """The queue only ``worker`` takes from: a conversation's next turn goes there, to the prompt it kept."""
    return f"{queue}.{worker}"


def route(client: redis.Redis, queue: str, conversation_id: str | None) -> str:
    """Where a conversation's next turn goes: the own queue of the worker that served its last turn, while that
    worker is alive, serves ``queue``, has a free slot and nothing waiting on its own queue; else ``queue``."""
    worker = client.get(AFFINITY_PREFIX + conversation_id) if conversation_id else None
    if not worker:
        return queue
    worker = _text(worker)
    beat, load, waiting = client.pipeline(transaction=False).get(WORKER_PREFIX + worker).get(
        LOAD_PREFIX + worker).llen(own_queue(queue, worker)).execute()
    info = json.loads(beat) if beat else None
    if info is None or info.get("queue") != queue or waiting or int(load or 0) >= int(info.get("slots", 1)):
        return queue
    return own_queue(queue, worker)


def rescue_orphans(client: redis.Redis, queue: str) -> int:
    """Put the tasks waiting on the own queues of workers that are gone back on ``queue`` (to be taken next);
    how many. Any live worker may call it, at any time: each task moves once."""
    moved = 0
    for name in client.smembers(OWN_QUEUES_PREFIX + queue):
        name = _text(name)
        worker = name[len(queue) + 1:]
        if client.exists(WORKER_PREFIX + worker):
            continue
        while client.lmove(name, queue, "RIGHT", "RIGHT") is not None:
            moved += 1
    return moved
