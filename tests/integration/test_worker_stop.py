"""A worker told to stop (SIGTERM: a deploy, a scale-down) while it decodes: what ends within its drain time
ends there; what does not is handed back and goes on at another worker after the text already sent. No reply
ends as `error`."""

from __future__ import annotations

import signal
import uuid

import pytest

from scripts.services import free_port, start_web, start_worker
from tests.conftest import Client

pytestmark = pytest.mark.integration

LONG = "Write a long story about a robot who learns to paint."


def test_a_worker_stopped_mid_reply_finishes_what_it_can_and_hands_on_the_rest(stack):
    settings = stack.settings.model_copy(update={
        "model_queue": f"stop-{uuid.uuid4().hex[:8]}", "web_port": free_port(), "max_new_tokens_cap": 400,
        "worker_drain_s": 2})
    logs = stack.root / "logs"
    leaving = start_worker(settings, f"leaving-{uuid.uuid4().hex[:6]}@%h", logs)
    web = start_web(settings, logs)
    short, long = Client(f"http://127.0.0.1:{settings.web_port}"), Client(f"http://127.0.0.1:{settings.web_port}")
    successor = None
    try:
        asked = [(short, short.ask({"type": "chat", "content": "Say hello.", "max_new_tokens": 8})),
                 (long, long.ask({"type": "chat", "content": LONG, "max_new_tokens": 400}))]
        first = [c.recv() for c, _ in asked]
        assert all(f["type"] == "token" for f in first), first
        leaving.proc.send_signal(signal.SIGTERM)
        assert leaving.proc.wait(60) == 0  # drained, within its drain time and a little more
        # The next worker of a rolling deploy, started once the old one has gone.
        successor = start_worker(settings, f"successor-{uuid.uuid4().hex[:6]}@%h", logs)
        for (c, accepted), f in zip(asked, first):
            rest, done = c.until_done(accepted["request_id"])
            tokens = [f, *rest]
            assert done["finish_reason"] in ("stop", "length"), done
            assert [t["seq"] for t in tokens] == list(range(len(tokens)))
            with stack.primary() as conn:
                rows = conn.execute("SELECT content, finish_reason FROM messages WHERE request_id = %s "
                                    "AND role = 'assistant'", (accepted["request_id"],)).fetchall()
            assert rows == [("".join(t["text"] for t in tokens), done["finish_reason"])]
        # The short reply ended at the leaving worker; the long one went on at its successor.
        long_id = asked[1][1]["request_id"]
        assert asked[0][1]["request_id"] not in successor.tail(400) and long_id in successor.tail(400)
    finally:
        for c in (short, long):
            c.close()
        web.stop()
        leaving.stop()
        if successor is not None:
            successor.stop()
