"""The worker's side of Redis while it generates: token frames out, cancel flags in.

The engine thread must not wait on Redis once per token per request, so frames
are queued here and written by one thread, a forward pass's frames in one
pipeline, in the order they were queued (a request's `done` always follows
its tokens). Cancel flags of the requests in flight are read by one thread,
all in one round trip.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import redis

from app.streams import FORGET_AFTER_S, cancel_key, stream_key

logger = logging.getLogger(__name__)

# A reply generated whose storing failed, kept until a retry of its task stores it.
FINISHED_PREFIX = "finished:"


class TokenRelay:
    """Writes frames to their request streams in batches, in order, retrying while Redis is away.

    Frames wait for :meth:`flush`, which the engine calls once after each
    forward pass: a pass's frames for every request then go out in one
    pipeline, one round trip, instead of one each as they are queued (which
    woke this thread, Redis and the readers once per frame). A frame sent
    with ``wait`` flushes at once; nothing waits longer than ``max_delay_s``.
    """

    def __init__(self, client: redis.Redis, ttl_s: int, maxlen: int, max_delay_s: float = 0.1):
        self.client = client
        self.ttl_s = ttl_s
        self.maxlen = maxlen
        self.max_delay_s = max_delay_s
        self._pending: list = []
        self._lock = threading.Lock()
        self._flush = threading.Event()
        self._thread = threading.Thread(target=self._run, name="token-relay", daemon=True)
        self._thread.start()

    def send(self, request_id: str, frame: dict, wait: bool = False, timeout: float | None = None) -> None:
        """Queue a frame; with ``wait``, write it (and all before it) now and return once it is in Redis,
        or after ``timeout`` s."""
        written = threading.Event() if wait else None
        with self._lock:
            self._pending.append((request_id, json.dumps(frame, ensure_ascii=False), written))
        if written is not None:
            self._flush.set()
            written.wait(timeout)

    def forget(self, request_id: str) -> None:
        """Let the request's stream go within :data:`app.streams.FORGET_AFTER_S` (its conversation was deleted)."""
        try:
            self.client.expire(stream_key(request_id), FORGET_AFTER_S)
        except redis.RedisError as exc:
            logger.warning("Could not shorten the stream of deleted request %s: %s", request_id, exc)

    def flush(self) -> None:
        """Write what is queued now (from the engine's thread: it does not wait for the write)."""
        self._flush.set()

    def sync(self, timeout: float | None = None) -> bool:
        """Write everything queued so far and wait until it is in Redis (or ``timeout`` s); whether it is."""
        written = threading.Event()
        with self._lock:
            self._pending.append((None, None, written))
        self._flush.set()
        return written.wait(timeout)

    def _run(self) -> None:
        while True:
            self._flush.wait(self.max_delay_s)
            self._flush.clear()
            with self._lock:
                batch, self._pending = self._pending, []
            if batch:
                self._write(batch)

    def _write(self, batch: list) -> None:
        delay = 0.1
        while True:
            try:
                pipe = self.client.pipeline(transaction=False)
                keys = set()
                for request_id, data, _ in batch:
                    if data is None:  # a mark of :meth:`sync`
                        continue
                    key = stream_key(request_id)
                    pipe.xadd(key, {"frame": data}, maxlen=self.maxlen, approximate=True)
                    keys.add(key)
                for key in keys:
                    pipe.expire(key, self.ttl_s)
                pipe.execute()
                break
            except redis.RedisError as exc:
                # Frames are never dropped: the engine's text would no longer match the stream.
                logger.error("Writing %d frames to Redis failed (%s); retrying in %.1fs", len(batch), exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        for _, _, written in batch:
            if written is not None:
                written.set()


class CancelWatcher:
    """Turns the cancel flags of in-flight requests into events the engine reads for free."""

    def __init__(self, client: redis.Redis, interval_s: float = 0.05):
        self.client = client
        self.interval_s = interval_s
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="cancel-watcher", daemon=True)
        self._thread.start()

    def watch(self, request_id: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._events[request_id] = event
        return event

    def unwatch(self, request_id: str) -> None:
        with self._lock:
            self._events.pop(request_id, None)

    def stop_all(self) -> None:
        """Stop every watched request at the engine's next pass, as a cancel flag would."""
        with self._lock:
            for event in self._events.values():
                event.set()

    def _run(self) -> None:
        while True:
            time.sleep(self.interval_s)
            with self._lock:
                watched = list(self._events.items())
            if not watched:
                continue
            try:
                pipe = self.client.pipeline(transaction=False)
                for request_id, _ in watched:
                    pipe.exists(cancel_key(request_id))
                flags = pipe.execute()
            except redis.RedisError as exc:
                logger.warning("Reading cancel flags failed: %s", exc)
                continue
            for (_, event), flag in zip(watched, flags):
                if flag:
                    event.set()


class FinishedReplies:
    """Replies generated in full but not yet stored (the primary failed), kept so that the retry of their task
    stores them instead of generating on after what looks like a partial reply."""

    def __init__(self, client: redis.Redis, ttl_s: int):
        self.client = client
        self.ttl_s = ttl_s

    def keep(self, request_id: str, reply: dict) -> None:
        """Keep it for the retry; where Redis fails too, the retry goes on after the streamed text instead."""
        try:
            self.client.set(FINISHED_PREFIX + request_id, json.dumps(reply, ensure_ascii=False), ex=self.ttl_s)
        except redis.RedisError as exc:
            logger.error("Could not keep the finished reply of %s for its retry: %s", request_id, exc)

    def get(self, request_id: str) -> dict | None:
        kept = self.client.get(FINISHED_PREFIX + request_id)
        return json.loads(kept) if kept else None

    def forget(self, request_id: str) -> None:
        self.client.delete(FINISHED_PREFIX + request_id)
