"""Prometheus metrics of the web tier."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

OPEN_SOCKETS = Gauge("chat_open_sockets", "WebSocket connections open in this process")
FRAMES_IN = Counter("chat_frames_received_total", "Client frames received", ["type"])
ACCEPTED = Counter("chat_requests_accepted_total", "Chat requests accepted and enqueued")
ERRORS = Counter("chat_errors_total", "Error frames and responses sent", ["code"])
