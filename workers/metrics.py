"""Prometheus metrics of a worker process, served on a port of its own (``CHAT_WORKER_METRICS_PORT`` plus the
worker's index under the launcher).

Each request is observed once, when its reply is stored: a request handed to
another worker, or retried, counts where it ends. Times run from the request's
acceptance by the web tier (its row's ``created_at``), so the time to first
token and the queue wait are the ones its user lived.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

# Seconds: from a few milliseconds (a GPU's next token) to minutes (a long reply behind a queue).
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_STEP = (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5)

TTFT = Histogram("chat_time_to_first_token_seconds", "From acceptance to the reply's first token", ["model"],
                 buckets=_LATENCY)
ITL = Histogram("chat_inter_token_latency_seconds", "Between a reply's consecutive pieces of text", ["model"],
                buckets=_STEP)
DURATION = Histogram("chat_request_duration_seconds", "From acceptance to the reply stored", ["model"],
                     buckets=_LATENCY)
QUEUE_WAIT = Histogram("chat_queue_wait_seconds", "From acceptance to a worker starting on the request", ["model"],
                       buckets=_LATENCY)
# Where the time to first token goes inside a worker, from its engine's taking the request.
ENGINE_WAIT = Histogram("chat_engine_wait_seconds", "From the engine's taking a request to a cache row for it: a "
                        "free slot, and the pass under way ended", ["model"], buckets=_LATENCY)
ENGINE_FIRST_TOKEN = Histogram("chat_engine_first_token_seconds", "From the engine's taking a request to its first "
                               "token: that wait, then the passes that compute its prompt", ["model"],
                               buckets=_LATENCY)
PROMPT_TOKENS = Counter("chat_prompt_tokens_total", "Prompt tokens of the requests served", ["model"])
CACHED_TOKENS = Counter("chat_prompt_cached_tokens_total", "Prompt tokens taken from kept keys and values, not "
                        "computed (the system prompt's, a conversation's earlier turns')", ["model"])
COMPLETION_TOKENS = Counter("chat_completion_tokens_total", "Tokens generated for the requests served", ["model"])
REQUESTS = Counter("chat_requests_served_total", "Requests whose reply was stored, by finish reason",
                   ["model", "finish_reason"])
IN_FLIGHT = Gauge("chat_requests_in_flight", "Requests this worker is generating or storing now", ["model"])


@dataclass
class Timing:
    """What one request's serving measured on the way; observed when its reply is stored."""

    queue_wait_s: float | None = None
    first_token_s: float | None = None  # from acceptance
    engine_wait_s: float | None = None  # from the engine's taking it to a cache row
    engine_first_token_s: float | None = None  # from the engine's taking it to its first token
    cached_tokens: int = 0  # prompt tokens the engine did not compute


def serve(port: int, host: str) -> bool:
    """Expose this process's metrics on ``host:port``; False (and a warning) where the port is taken."""
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        logger.warning("Metrics not served on %s:%d: %s", host, port, exc)
        return False
    logger.info("Metrics on http://%s:%d/metrics", host, port)
    return True


def observe_served(model: str, timing: Timing | None, duration_s: float | None, finish_reason: str,
                   prompt_tokens: int, completion_tokens: int) -> None:
    REQUESTS.labels(model, finish_reason).inc()
    PROMPT_TOKENS.labels(model).inc(prompt_tokens)
    if timing is not None:
        CACHED_TOKENS.labels(model).inc(timing.cached_tokens)
    COMPLETION_TOKENS.labels(model).inc(completion_tokens)
    if duration_s is not None:
        DURATION.labels(model).observe(duration_s)
    if timing is not None and timing.queue_wait_s is not None:
        QUEUE_WAIT.labels(model).observe(timing.queue_wait_s)
    if timing is not None and timing.first_token_s is not None:
        TTFT.labels(model).observe(timing.first_token_s)
    if timing is not None and timing.engine_wait_s is not None:
        ENGINE_WAIT.labels(model).observe(timing.engine_wait_s)
    if timing is not None and timing.engine_first_token_s is not None:
        ENGINE_FIRST_TOKEN.labels(model).observe(timing.engine_first_token_s)
