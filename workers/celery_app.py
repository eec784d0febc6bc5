"""The workers' Celery app, built from settings; the model loads once the worker starts."""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time

import redis
from celery import Celery
from celery.signals import (
    celeryd_after_setup,
    task_postrun,
    task_received,
    worker_init,
    worker_shutdown,
    worker_shutting_down,
)

from app import streams
from app.storage import Store
from config.celery import celery_config
from config.heap import freeze_heap
from config.logging import configure_logging
from config.settings import Settings
from workers import metrics

logger = logging.getLogger(__name__)

settings = Settings()
celery = Celery("chat-workers", include=["workers.tasks"])
celery.conf.update(celery_config(settings))
# Tasks run on threads: each hands its request to the one engine of this process
# and waits, so there are as many task threads as the engine has batch slots.
celery.conf.update(worker_pool="threads", worker_concurrency=settings.resolved_worker_concurrency,
                   task_create_missing_queues=True)

_runtime: dict = {}


def runtime():
    """The handler of this worker process (built by :func:`_start`)."""
    if "handler" not in _runtime:
        raise RuntimeError("the worker has not loaded its model yet")
    return _runtime["handler"]


@celeryd_after_setup.connect
def _own_queue(sender=None, instance=None, **_):
    """Take tasks from this worker's own queue too: the next turns of the conversations it served last."""
    if instance is not None and sender:
        instance.app.amqp.queues.select_add(streams.own_queue(settings.queue, str(sender)))


@worker_init.connect
def _start(sender=None, **_):
    """Load the model in this process, after start-up, then say so every few seconds."""
    configure_logging(settings.log_level, settings.log_json)
    from workers.affinity import Affinity
    from workers.engine import build_engine
    from workers.handler import RequestHandler
    from workers.leases import Leases
    from workers.relay import CancelWatcher, FinishedReplies, TokenRelay

    redis_client = streams.connect(settings.resolved_redis_url)
    _runtime["redis"] = redis_client
    _runtime["leases"] = Leases(streams.connect(settings.resolved_broker_url), settings.task_lease_s / 5).start()
    relay = TokenRelay(redis_client, settings.stream_ttl_s, settings.stream_maxlen)
    engine = build_engine(settings, after_pass=relay.flush)
    loaded = engine.loaded
    logger.info("Engine %s: %d slots, %d task threads", settings.engine,
                settings.max_batch if settings.engine == "batching" else 1, settings.resolved_worker_concurrency)
    _runtime["engine"] = engine
    store = Store(settings.resolved_database_url, settings.resolved_replica_url,
                  pool_size=min(settings.resolved_worker_concurrency, 10) + 1)
    name = getattr(sender, "hostname", None) or f"worker@{socket.gethostname()}"
    affinity = Affinity(redis_client, settings.queue, name, settings.affinity_ttl_s)
    affinity.start()
    _runtime["handler"] = RequestHandler(
        store, functools.partial(streams.stream_events, redis_client),
        relay, CancelWatcher(redis_client), FinishedReplies(redis_client, settings.stream_ttl_s),
        engine, loaded.tokenizer, settings.system_prompt,
        metrics_model=settings.model_id if settings.metrics else None, affinity=affinity)
    if settings.metrics and settings.worker_metrics_port:
        metrics.serve(settings.worker_metrics_port, settings.resolved_bind)
    logger.info("%d long-lived objects taken out of full garbage collections", freeze_heap())
    info = {"name": name, "queue": settings.queue, "own_queue": affinity.own_queue,
            "slots": settings.max_batch if settings.engine == "batching" else 1, "model": settings.model_name, "device": str(loaded.device),
            "dtype": str(loaded.dtype).removeprefix("torch."), "dtype_reason": loaded.dtype_reason,
            "engine": settings.engine, "pid": os.getpid(), "since": time.time()}
    stop = threading.Event()
    _runtime["stop"] = stop

    def heartbeat():
        while not stop.is_set():
            try:
                streams.beat(redis_client, name, info, ttl_s=3 * settings.worker_heartbeat_s)
                affinity.rescue()  # tasks left on the own queue of a worker that is gone
            except Exception as exc:  # Redis away for a moment: try again next beat
                logger.warning("Heartbeat failed: %s", exc)
            stop.wait(settings.worker_heartbeat_s)

    threading.Thread(target=heartbeat, name="heartbeat", daemon=True).start()


@task_received.connect
def _hold(request=None, **_):
    """Renew this task's hold on its message while it waits and runs here (workers/leases.py)."""
    if "leases" in _runtime and request is not None:
        _runtime["leases"].hold(request.id, request.message.delivery_tag)
    if "redis" in _runtime:  # how fast the queue drains: the web tier's estimate of a new chat's wait
        try:
            streams.count_taken(_runtime["redis"], settings.queue)
        except redis.RedisError as exc:
            logger.warning("Could not count a task taken: %s", exc)


@task_postrun.connect
def _release(task_id=None, **_):
    if "leases" in _runtime:
        _runtime["leases"].release(task_id)


@worker_shutting_down.connect
def _drain(**_):
    """Stopping (SIGTERM): Celery takes no new task and waits for those in flight; what still runs after
    ``worker_drain_s`` is handed back to the queue, to go on elsewhere after the text already sent."""
    if "handler" not in _runtime:
        return
    logger.info("Stopping: finishing the requests in flight for up to %.0fs, then handing back the rest",
                settings.worker_drain_s)
    timer = threading.Timer(settings.worker_drain_s, _runtime["handler"].hand_back_all)
    timer.daemon = True
    timer.start()


@worker_shutdown.connect
def _stop(**_):
    if "stop" in _runtime:
        _runtime["stop"].set()
    if "leases" in _runtime:  # nothing is held any more: what ran here was finished or handed back
        _runtime["leases"].stop()
    if "engine" in _runtime:
        _runtime["engine"].stop()
