"""The servers around the path: health, readiness, the page, Flower, a broker that is down."""

from __future__ import annotations

import pytest
import requests

from scripts.services import free_port, start_web
from tests.conftest import second_web

pytestmark = pytest.mark.integration


def test_health_and_readiness(stack):
    assert requests.get(stack.base_url + "/healthz", timeout=5).json() == {"status": "ok"}
    for url in ("/readyz", "/readyz?workers=1"):
        res = requests.get(stack.base_url + url, timeout=5)
        assert res.status_code == 200
        assert res.json()["checks"] == {"redis": "ok", "primary": "ok", "replica": "ok", "worker": "ok"}


def test_readiness_does_not_wait_for_a_worker_unless_asked(stack):
    """A load balancer's check must pass with no worker yet, or scaling up from zero workers never begins."""
    with second_web(stack, model_queue="gen.nobody-serves-this") as (url, _):
        plain, asked = (requests.get(url + path, timeout=10) for path in ("/readyz", "/readyz?workers=1"))
    assert plain.status_code == 200 and plain.json()["checks"]["worker"].startswith("failed")
    assert asked.status_code == 503


def test_chat_page_is_served(stack):
    res = requests.get(stack.base_url + "/", timeout=5)
    assert res.status_code == 200 and "text/html" in res.headers["Content-Type"]
    assert "new WebSocket" in res.text


def test_metrics(stack, client):
    client.ask({"type": "ping"})
    text = requests.get(stack.base_url + "/metrics", timeout=5).text
    assert 'chat_frames_received_total{type="ping"}' in text


def test_flower_sees_the_worker_behind_basic_auth(stack):
    url = f"http://127.0.0.1:{stack.settings.flower_port}/api/workers?refresh=1"
    assert requests.get(url, timeout=30).status_code == 401
    assert requests.get(url, timeout=30, auth=("flower", "wrong")).status_code == 401
    workers = requests.get(url, timeout=30, auth=("flower", "test-pass")).json()
    assert any(name.startswith("cpu0@") for name in workers), workers


def test_broker_down_gives_unavailable_and_stores_nothing(stack):
    """A web server whose Redis is gone answers `unavailable` and keeps nothing."""
    from tests.conftest import Client

    settings = stack.settings.model_copy(update={"web_port": free_port(), "redis_port": free_port()})
    web = start_web(settings, stack.root / "logs")
    try:
        before = (stack.count("messages"), stack.count("conversations"), stack.count("chat_requests"))
        c = Client(f"http://127.0.0.1:{settings.web_port}")
        reply = c.ask({"type": "chat", "content": "Is anyone there?"})
        assert (reply["type"], reply["code"]) == ("error", "unavailable"), reply
        assert c.ask({"type": "ping"}) == {"type": "pong"}
        assert (stack.count("messages"), stack.count("conversations"), stack.count("chat_requests")) == before
        ready = requests.get(f"http://127.0.0.1:{settings.web_port}/readyz", timeout=30)
        assert ready.status_code == 503 and ready.json()["checks"]["redis"].startswith("failed")
        c.close()
    finally:
        web.stop()
