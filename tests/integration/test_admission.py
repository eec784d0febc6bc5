"""Admission before storage: a full queue gets `busy`, a caller over its rate `rate_limited`, at once, with
`retry_after`, and nothing is stored or queued; what was accepted is still answered."""

from __future__ import annotations

import uuid
from contextlib import contextmanager

import pytest
import redis

from scripts.services import free_port, start_web
from tests.conftest import Client

pytestmark = pytest.mark.integration


@contextmanager
def web_with(stack, **overrides):
    """A second web server on the session's Redis and databases, with other admission settings."""
    settings = stack.settings.model_copy(update={"web_port": free_port(), **overrides})
    web = start_web(settings, stack.root / "logs")
    clients: list[Client] = []
    try:
        yield settings, lambda: clients.append(Client(f"http://127.0.0.1:{settings.web_port}")) or clients[-1]
    finally:
        for c in clients:
            c.close()
        web.stop()


def counts(stack) -> tuple[int, int, int]:
    return stack.count("messages"), stack.count("conversations"), stack.count("chat_requests")


def test_a_full_queue_refuses_busy_at_once_and_keeps_nothing_and_what_was_taken_is_answered(stack):
    # A queue no worker reads, so that what is accepted waits there; then handed to the worker's queue.
    waiting = f"admission-{uuid.uuid4().hex[:8]}"
    r = redis.Redis(port=stack.settings.redis_port)
    with web_with(stack, model_queue=waiting, max_queue_depth=2, busy_retry_after_s=3.5) as (_, new_client):
        senders = [new_client(), new_client()]
        taken = [c.ask({"type": "chat", "content": f"Say {word}.", "max_new_tokens": 2})
                 for c, word in zip(senders, ("one", "two"))]
        assert [a["type"] for a in taken] == ["accepted", "accepted"] and r.llen(waiting) == 2
        before = counts(stack)
        refused = new_client().ask({"type": "chat", "content": "And me?"})
        assert (refused["type"], refused["code"], refused["retry_after"]) == ("error", "busy", 3.5), refused
        assert counts(stack) == before and r.llen(waiting) == 2  # nothing stored, nothing queued
        assert senders[0].ask({"type": "ping"}) == {"type": "pong"}
        # The queued ones are not lost: moved to the worker's queue, they are answered.
        while r.lmove(waiting, stack.settings.queue, "LEFT", "RIGHT"):
            pass
        for c, accepted in zip(senders, taken):
            _, done = c.until_done(accepted["request_id"])
            assert done["finish_reason"] in ("stop", "length")


def test_a_caller_over_its_rate_is_refused_while_others_are_not(stack):
    with web_with(stack, rate_limit_per_minute=6, rate_limit_burst=2) as (_, new_client):
        eager, other = new_client(), new_client()
        for word in ("one", "two"):  # the burst
            _, _, done = eager.chat(f"Say {word}.", max_new_tokens=1)
            assert done["finish_reason"] in ("stop", "length")
        before = counts(stack)
        refused = eager.ask({"type": "chat", "content": "Say three.", "max_new_tokens": 1})
        assert (refused["type"], refused["code"]) == ("error", "rate_limited"), refused
        assert 0 < refused["retry_after"] <= 10  # one token comes back every 10 s
        assert counts(stack) == before
        assert eager.ask({"type": "ping"}) == {"type": "pong"}
        _, _, done = other.chat("Say four.", max_new_tokens=1)  # a bucket per caller
        assert done["finish_reason"] in ("stop", "length")
