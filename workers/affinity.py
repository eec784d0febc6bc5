"""A worker's side of conversation affinity: its own queue, its load, and the conversations it served last.

The web tier sends a conversation's next turn to the worker that served the
turn before (:func:`app.streams.route`), where the engine kept that turn's
prompt; that worker's own queue, its load and the affinity records live in
Redis. Nothing depends on it for correctness: a turn served elsewhere is
computed whole, and tasks left on a gone worker's own queue are put back on the
shared one by any live worker (:func:`app.streams.rescue_orphans`).
"""

from __future__ import annotations

import logging

import redis

from app import streams

logger = logging.getLogger(__name__)


class Affinity:
    def __init__(self, client: redis.Redis, queue: str, worker: str, ttl_s: int):
        self.client = client
        self.queue = queue
        self.worker = worker
        self.own_queue = streams.own_queue(queue, worker)
        self.ttl_s = ttl_s

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0

    def start(self) -> None:
        """Announce the own queue and start the load count afresh (a restarted worker holds nothing)."""
        self.client.sadd(streams.OWN_QUEUES_PREFIX + self.queue, self.own_queue)
        self.client.set(streams.LOAD_PREFIX + self.worker, 0)

    def took(self) -> None:
        self._count(1)

    def ended(self) -> None:
        self._count(-1)

    def serves(self, conversation_id: str) -> None:
        """A turn of ``conversation_id`` is served here: its next turn may come here."""
        if self.enabled:
            try:
                self.client.set(streams.AFFINITY_PREFIX + conversation_id, self.worker, ex=self.ttl_s)
            except redis.RedisError as exc:  # the next turn goes to the shared queue: computed whole
                logger.warning("Affinity not recorded: %s", exc)

    def rescue(self) -> None:
        moved = streams.rescue_orphans(self.client, self.queue)
        if moved:
            logger.warning("%d task(s) left on the own queues of gone workers put back on %s", moved, self.queue)

    def _count(self, delta: int) -> None:
        try:
            self.client.incrby(streams.LOAD_PREFIX + self.worker, delta)
        except redis.RedisError as exc:
            logger.warning("Load not counted: %s", exc)
