"""A worker killed mid-reply (SIGKILL, as the kernel's OOM killer or a lost machine would): its task comes back
to the queue within about one lease, the restarted worker goes on after the text already sent, and the client
gets one whole reply, stored once."""

from __future__ import annotations

import os
import signal
import time
import uuid

import psutil
import pytest
import redis

from app import streams
from scripts.services import free_port, start_launcher, start_web, start_worker
from tests.conftest import Client

pytestmark = pytest.mark.integration


def stream_events(settings, request_id: str) -> list[dict]:
    r = redis.Redis(port=settings.redis_port, decode_responses=True)
    try:
        return streams.stream_events(r, request_id)
    finally:
        r.close()


def worker_pids(launcher) -> list[int]:
    """The launcher's worker processes (by process, not by heartbeat: names may repeat across queues)."""
    return [c.pid for c in psutil.Process(launcher.pid).children() if c.is_running()]


def test_a_worker_killed_mid_reply_is_replaced_and_the_reply_goes_on_once(stack):
    # A launcher-managed worker of its own (the session's worker is left alone), and a web server for its queue.
    settings = stack.settings.model_copy(update={
        "model_queue": f"death-{uuid.uuid4().hex[:8]}", "web_port": free_port(), "cpu_workers": 1,
        "max_new_tokens_cap": 400})
    launcher = start_launcher(settings, stack.root / "logs", 1)
    web = start_web(settings, stack.root / "logs")
    client = Client(f"http://127.0.0.1:{settings.web_port}")
    try:
        [victim] = worker_pids(launcher)
        accepted = client.ask({"type": "chat", "content": "Write a long story about a robot who learns to paint.",
                               "max_new_tokens": 400})
        assert accepted["type"] == "accepted", accepted
        rid = accepted["request_id"]
        frames = [client.recv() for _ in range(3)]
        assert [f["type"] for f in frames] == ["token"] * 3, frames  # mid-reply
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        next_token_s = None
        deadline = killed + 180
        while frames[-1]["type"] != "done":
            assert time.monotonic() < deadline, "no done after the worker's death"
            frames.append(client.recv())
            assert frames[-1].get("request_id") == rid, frames[-1]
            if next_token_s is None and frames[-1]["type"] == "token" and frames[-1]["seq"] > 2:
                next_token_s = time.monotonic() - killed
        print(f"\nSIGKILL to the next token: {next_token_s:.1f} s")
        tokens, done = frames[:-1], frames[-1]
        assert all(f["type"] == "token" for f in tokens)
        assert [f["seq"] for f in tokens] == list(range(len(tokens)))  # no gap, no repeat
        assert done["finish_reason"] in ("stop", "length"), done
        assert len(worker_pids(launcher)) == 1 and victim not in worker_pids(launcher)  # restarted, and answered
        with stack.primary() as conn:
            rows = conn.execute("SELECT id, content FROM messages WHERE request_id = %s AND role = 'assistant'",
                                (rid,)).fetchall()
        assert len(rows) == 1 and rows[0] == (done["message_id"], "".join(f["text"] for f in tokens))
        assert sum(e["type"] == "done" for e in stream_events(settings, rid)) == 1
    finally:
        client.close()
        web.stop()
        launcher.stop()


def test_a_reply_that_outlasts_the_lease_on_a_live_worker_is_never_handed_back(stack):
    """The worker renews its hold on the task while it decodes: a reply many leases long runs once."""
    settings = stack.settings.model_copy(update={
        "model_queue": f"lease-{uuid.uuid4().hex[:8]}", "web_port": free_port(), "task_lease_s": 2,
        "max_new_tokens_cap": 400})
    worker = start_worker(settings, f"lease-{uuid.uuid4().hex[:6]}@%h", stack.root / "logs")
    web = start_web(settings, stack.root / "logs")
    client = Client(f"http://127.0.0.1:{settings.web_port}")
    try:
        started = time.monotonic()
        accepted, tokens, done = client.chat("Write a long story about a robot who learns to paint.",
                                             max_new_tokens=400)
        took = time.monotonic() - started
        assert took > 2 * settings.task_lease_s, f"the reply took {took:.1f}s: not longer than the lease"
        # Handed back while it ran, the task would have run twice beside itself: seqs repeated, two `done`s.
        assert [f["seq"] for f in tokens] == list(range(len(tokens)))
        events = stream_events(settings, accepted["request_id"])
        assert sum(e["type"] == "done" for e in events) == 1 and len(events) == len(tokens) + 1
    finally:
        client.close()
        web.stop()
        worker.stop()
