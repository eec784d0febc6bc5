"""Thin Celery tasks: the logic lives in :mod:`workers.handler`."""

from __future__ import annotations

import redis
from sqlalchemy.exc import OperationalError

from config.celery import TASK_GENERATE
from workers.celery_app import celery, runtime


@celery.task(name=TASK_GENERATE, acks_late=True, autoretry_for=(OperationalError, redis.ConnectionError),
             retry_backoff=True, retry_backoff_max=30, max_retries=8)
def generate(request_id: str) -> str:
    """Generate, stream and store the reply to one accepted chat message."""
    return runtime().handle(request_id)
