"""The web tier's side of Celery: enqueue by task name, never import the workers."""

from __future__ import annotations

import logging
import time

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from app import streams
from app.web import metrics
from config.celery import TASK_GENERATE, celery_config
from config.settings import Settings

logger = logging.getLogger(__name__)


class QueueUnavailable(Exception):
    """The broker could not take the task."""


class QueueClient:
    """Sends `chat.generate` tasks to the model's queue and measures its depth."""

    def __init__(self, settings: Settings, redis_client):
        self.celery = Celery("chat-web")
        self.celery.conf.update(celery_config(settings))
        self.queue = settings.queue
        self.redis = redis_client
        self.affinity = settings.affinity_ttl_s > 0

    def depth(self) -> int:
        """Tasks waiting on the queue, not yet taken by a worker."""
        return int(self.redis.llen(self.queue))

    def submit(self, store, request_id: str, drop_conversation: bool, conversation_id: str | None = None) -> bool:
        """Enqueue a request just accepted (a later turn of ``conversation_id`` to the worker that served the turn
        before, where it can take it: :func:`app.streams.route`); where the broker cannot take it, undo what was
        stored for it (no request is left stored without its task) and return False."""
        try:
            self.enqueue(request_id, conversation_id)
        except (QueueUnavailable, redis.RedisError) as exc:
            logger.error("Could not enqueue request %s: %s", request_id, exc)
            store.forget_request(request_id, drop_conversation=drop_conversation)
            return False
        metrics.ACCEPTED.inc()
        return True

    def enqueue(self, request_id: str, conversation_id: str | None = None) -> None:
        started = time.monotonic()
        queue = self.queue
        if self.affinity and conversation_id:
            try:
                queue = streams.route(self.redis, self.queue, conversation_id)
            except redis.RedisError as exc:  # the shared queue, then: any worker computes the turn whole
                logger.warning("No affinity for conversation %s: %s", conversation_id, exc)
        try:
            self.celery.send_task(TASK_GENERATE, args=[request_id], queue=queue, task_id=request_id)
        except (OperationalError, OSError) as exc:
            logger.error("Broker unavailable after %.2fs: %s", time.monotonic() - started, exc)
            raise QueueUnavailable(str(exc)) from exc
