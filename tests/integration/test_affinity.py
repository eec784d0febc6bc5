"""Conversation affinity against the real stack: a conversation's next turn goes to the worker that served the
turn before, which kept its prompt and computes only what is new; once that worker is gone, the next turn, even
one already sent to its own queue, is served whole by another."""

from __future__ import annotations

import signal
import time
import uuid

import pytest
import redis

from app import streams
from scripts.services import free_port, start_web, start_worker, wait_until
from tests.conftest import Client

pytestmark = pytest.mark.integration

QUESTION = ("I am planning a long cycling trip along the rivers of Europe next summer, starting in the Netherlands "
            "and riding south through Germany, Switzerland and France over about six weeks. I have a steel touring "
            "bicycle, panniers, a small tent and a stove, but I have never ridden more than two days in a row. What "
            "should I think about before I go, how should I train in the months before, and what should I carry so "
            "that I can fix the bicycle by myself on the road? I would also like to know how to plan the route: "
            "whether to follow the marked long-distance cycle paths or make my own way on small roads, how to find "
            "places to eat and shop for food, and whether I should book anything in advance or just ride each day "
            "as far as I feel like going.")
FOLLOW_UPS = ["And what about the weather in the mountains?", "Which of those matters most?",
              "Thank you. One last thing: what should I eat on the way?"]


def cached(done: dict) -> int:
    return done["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_next_turns_go_to_the_worker_that_kept_the_prompt_and_to_another_once_it_is_gone(stack):
    settings = stack.settings.model_copy(update={"model_queue": f"affinity-{uuid.uuid4().hex[:8]}",
                                                 "web_port": free_port(), "worker_metrics_port": 0})
    logs = stack.root / "logs"
    workers = {}
    web = None
    r = redis.Redis(port=settings.redis_port, decode_responses=True)
    try:
        for name in ("a@affinity", "b@affinity"):
            workers[name] = start_worker(settings, name, logs)
        web = start_web(settings, logs)
        client = Client(f"http://127.0.0.1:{settings.web_port}")
        accepted, _, done = client.chat(QUESTION, max_new_tokens=8)
        conversation = accepted["conversation_id"]
        served = r.get(streams.AFFINITY_PREFIX + conversation)
        assert served in workers
        system = kept = cached(done)  # the system prompt's tokens
        for follow_up in FOLLOW_UPS[:2]:
            _, tokens, done = client.chat(follow_up, conversation_id=conversation, max_new_tokens=8)
            assert tokens and done["finish_reason"] in ("stop", "length")
            assert r.get(streams.AFFINITY_PREFIX + conversation) == served  # the same worker again
            assert cached(done) >= max(kept, system + 128)  # it started from the turns before
            kept = cached(done)

        # The worker that kept the conversation dies; the next turn comes before its heartbeat has lapsed,
        # so the web tier still sends it to that worker's own queue, where it waits for nobody.
        workers[served].stop(sig=signal.SIGKILL)
        other = next(name for name in workers if name != served)
        own = streams.own_queue(settings.queue, served)
        accepted = client.ask({"type": "chat", "content": FOLLOW_UPS[2], "conversation_id": conversation,
                               "max_new_tokens": 8})
        assert accepted["type"] == "accepted", accepted
        assert r.llen(own) == 1
        sent = time.monotonic()
        tokens, done = client.until_done(accepted["request_id"])
        print(f"turn left on a dead worker's own queue: done {time.monotonic() - sent:.1f}s after it was sent")
        assert tokens and r.llen(own) == 0
        assert r.get(streams.AFFINITY_PREFIX + conversation) == other  # served by the other worker
        assert cached(done) < kept  # which computed it whole
        wait_until(lambda: streams.route(r, settings.queue, conversation) == streams.own_queue(settings.queue, other),
                   30, "affinity to the other worker")
        stack.pg.wait_replayed()
        history = client.messages(conversation).json()
        assert [m["role"] for m in history["messages"]] == ["user", "assistant"] * 4
    finally:
        r.close()
        if web is not None:
            web.stop()
        for proc in workers.values():
            proc.stop()
