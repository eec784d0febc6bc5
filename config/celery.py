"""Celery configuration shared by the web tier's client and the workers."""

from __future__ import annotations

from config.settings import Settings

TASK_GENERATE = "chat.generate"


def celery_config(settings: Settings) -> dict:
    """Return the Celery config mapping for ``app.conf.update``."""
    return {
        "broker_url": settings.resolved_broker_url,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": settings.queue,
        "task_routes": {TASK_GENERATE: {"queue": settings.queue}},
        # A task is acknowledged only once its reply is stored: a worker that dies
        # mid-generation leaves it on the queue for another.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "broker_connection_retry_on_startup": True,
        # The web tier must answer `unavailable` quickly, not hang on a dead broker.
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        "broker_transport_options": {
            # A task taken by a worker goes back to the queue once its worker has not renewed its hold for
            # this long (workers/leases.py); every consumer looks for such tasks every fifth of it.
            "visibility_timeout": settings.task_lease_s,
            "unacked_restore_interval": settings.task_lease_s / 5,
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": 2,
            "socket_timeout": 5,
        },
        "worker_hijack_root_logger": False,
    }
