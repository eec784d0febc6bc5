"""Metrics an operator can alert on: each served request observed exactly once by its worker, token counters that
add up to the `usage` the clients were sent, the queue's depth while the worker is paused, and one sum over
several web processes."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Client, second_web

pytestmark = pytest.mark.integration


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics page: (name, sorted labels) -> value."""
    text = requests.get(url, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    """The sum of ``name``'s samples that carry ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def worker_url(stack) -> str:
    return f"http://127.0.0.1:{stack.settings.worker_metrics_port}/metrics"


def idle(stack) -> dict:
    """The worker's metrics once nothing is in flight or waiting."""
    model = stack.settings.model_id
    deadline = time.monotonic() + 60
    while True:
        samples = scrape(worker_url(stack))
        web = scrape(stack.base_url + "/metrics")
        if value(samples, "chat_requests_in_flight", model=model) == 0 and \
                value(web, "chat_queue_depth", model=model) == 0:
            return samples
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_each_request_is_observed_once_and_the_token_counters_add_up_to_the_usage_sent(stack, client):
    model = stack.settings.model_id
    before = idle(stack)
    dones, frames = [], 0
    for prompt in ("Say hello.", "Name a colour.", "Count to three."):
        _, tokens, done = client.chat(prompt, max_new_tokens=8)
        dones.append(done)
        frames += len(tokens)
    after = idle(stack)
    grown = {name: value(after, name, model=model) - value(before, name, model=model) for name in (
        "chat_time_to_first_token_seconds_count", "chat_request_duration_seconds_count",
        "chat_queue_wait_seconds_count", "chat_inter_token_latency_seconds_count", "chat_prompt_tokens_total",
        "chat_completion_tokens_total", "chat_requests_served_total", "chat_engine_wait_seconds_count",
        "chat_engine_first_token_seconds_count")}
    assert grown == {
        "chat_time_to_first_token_seconds_count": 3, "chat_request_duration_seconds_count": 3,
        "chat_queue_wait_seconds_count": 3, "chat_requests_served_total": 3,
        "chat_engine_wait_seconds_count": 3, "chat_engine_first_token_seconds_count": 3,
        "chat_inter_token_latency_seconds_count": frames - 3,  # between each reply's pieces
        "chat_prompt_tokens_total": sum(d["usage"]["prompt_tokens"] for d in dones),
        "chat_completion_tokens_total": sum(d["usage"]["completion_tokens"] for d in dones),
    }
    grew = {name: value(after, name, model=model) - value(before, name, model=model) for name in (
        "chat_time_to_first_token_seconds_sum", "chat_engine_wait_seconds_sum", "chat_engine_first_token_seconds_sum")}
    # Within the worker's time to first token (from acceptance): the engine's, and within that its wait for a row.
    assert grew["chat_time_to_first_token_seconds_sum"] > grew["chat_engine_first_token_seconds_sum"] > \
        grew["chat_engine_wait_seconds_sum"] >= 0


def test_the_queue_depth_shows_what_waits_while_the_worker_is_paused(stack, client):
    model = stack.settings.model_id
    idle(stack)
    os.kill(stack.worker.pid, signal.SIGSTOP)
    try:
        sockets = [client.connect() for _ in range(2)]  # a socket each: their replies may come in any order
        taken = [client.ask({"type": "chat", "content": f"Say {w}.", "max_new_tokens": 2}, ws)
                 for w, ws in zip("ab", sockets)]
        assert [t["type"] for t in taken] == ["accepted", "accepted"]
        depth = value(scrape(stack.base_url + "/metrics"), "chat_queue_depth", model=model)
    finally:
        os.kill(stack.worker.pid, signal.SIGCONT)
    # A stopped worker blocked in BRPOP may have one in its socket's buffer already: the rest wait in Redis.
    assert depth >= 1
    for t, ws in zip(taken, sockets):
        client.until_done(t["request_id"], ws)
    assert value(scrape(stack.base_url + "/metrics"), "chat_workers_live", model=model) == 1


def metrics_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("chat-web-metrics-*"))


def test_several_web_processes_report_one_sum(stack):
    before = metrics_folders()
    with second_web(stack, web_workers=2) as (url, _):
        made = metrics_folders() - before  # where its processes add up their metrics
        accepted_before = value(scrape(url + "/metrics"), "chat_requests_accepted_total")
        clients = [Client(url) for _ in range(6)]  # new connections: the kernel spreads them over the processes
        try:
            for c in clients:
                c.chat("Say yes.", max_new_tokens=1)
            counts = [value(scrape(url + "/metrics"), "chat_requests_accepted_total") for _ in range(6)]
        finally:
            for c in clients:
                c.close()
    assert counts == [accepted_before + 6] * 6
    assert len(made) == 1 and not any(folder.exists() for folder in made)  # gone with the server
