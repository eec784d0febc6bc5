"""Prometheus metrics of the web tier.

Counted in each web process; where gunicorn runs several (``CHAT_WEB_WORKERS``),
prometheus_client's multiprocess mode adds them up (config/gunicorn.py sets
``PROMETHEUS_MULTIPROC_DIR``). The queue's depth and the live workers are read
from Redis at each scrape. The workers serve their own request metrics
(workers/metrics.py).
"""

from __future__ import annotations

import os

import redis
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from app import streams

OPEN_SOCKETS = Gauge("chat_open_sockets", "WebSocket connections open", multiprocess_mode="livesum")
FRAMES_IN = Counter("chat_frames_received_total", "Client frames received", ["type"])
ACCEPTED = Counter("chat_requests_accepted_total", "Chat requests accepted and enqueued (WebSocket and /v1)")
ERRORS = Counter("chat_errors_total", "Errors and refusals sent (frames and HTTP responses), by code", ["code"])


class QueueCollector(Collector):
    """The model's queue depth and its live workers, read from Redis when scraped."""

    def __init__(self, client: redis.Redis, queue: str, model: str):
        self.client, self.queue, self.model = client, queue, model

    def collect(self):
        depth = GaugeMetricFamily("chat_queue_depth", "Tasks waiting on the model's queue", labels=["model"])
        live = GaugeMetricFamily("chat_workers_live", "Workers with the model loaded and beating", labels=["model"])
        try:
            depth.add_metric([self.model], self.client.llen(self.queue))
            live.add_metric([self.model], len(streams.live_workers(self.client, self.queue)))
        except redis.RedisError:
            return  # Redis away: no figure rather than a wrong one
        yield depth
        yield live


def exposition(queue: QueueCollector) -> bytes:
    """This tier's metrics in Prometheus' text format: every process's where there are several."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    extra = CollectorRegistry()
    extra.register(queue)
    return generate_latest(registry) + generate_latest(extra)
