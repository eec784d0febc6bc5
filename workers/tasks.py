"""Thin Celery tasks: the logic lives in :mod:`workers.handler`."""

from __future__ import annotations

import redis
from celery.exceptions import Reject
from sqlalchemy.exc import OperationalError

from config.celery import TASK_GENERATE
from workers.celery_app import celery, runtime
from workers.handler import HandedBack


def is_repeat(request) -> bool:
    """Whether the task may have run before: restored to the queue (its worker died, or the
    visibility timeout passed; kombu marks such a message ``redelivered``) or retried after an error."""
    return bool((request.delivery_info or {}).get("redelivered")) or bool(request.retries)


@celery.task(name=TASK_GENERATE, bind=True, acks_late=True, autoretry_for=(OperationalError, redis.ConnectionError),
             retry_backoff=True, retry_backoff_max=30, max_retries=8)
def generate(self, request_id: str) -> str:
    """Generate, stream and store the reply to one accepted chat message."""
    try:
        return runtime().handle(request_id, repeat=is_repeat(self.request))
    except HandedBack:
        # Back to the queue, marked redelivered: another worker goes on after the streamed text.
        raise Reject("the worker is stopping", requeue=True) from None
