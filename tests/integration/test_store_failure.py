"""The primary refuses the worker just as its reply is done: the task retries and stores the reply it made,
without generating more after a reply that was complete."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from app import streams
from scripts.services import free_port, start_web, start_worker
from tests.conftest import Client
from workers.relay import FINISHED_PREFIX

pytestmark = pytest.mark.integration


def test_a_reply_the_primary_would_not_take_is_stored_by_the_retry_as_it_was_made(stack):
    role = f"w_{uuid.uuid4().hex[:8]}"  # the worker's own login, so that only it can be shut out
    with stack.primary() as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}")
    pg = stack.pg
    settings = stack.settings.model_copy(update={
        "model_queue": f"store-{uuid.uuid4().hex[:8]}", "web_port": free_port(), "max_new_tokens_cap": 200})
    worker = start_worker(settings.model_copy(update={
        "database_url": f"postgresql+psycopg://{role}@127.0.0.1:{pg.primary_port}/chat",
        "replica_url": f"postgresql+psycopg://{role}@127.0.0.1:{pg.replica_port}/chat"}),
        f"store-{uuid.uuid4().hex[:6]}@%h", stack.root / "logs")
    web = start_web(settings, stack.root / "logs")
    client = Client(f"http://127.0.0.1:{settings.web_port}")
    r = redis.Redis(port=settings.redis_port, decode_responses=True)
    try:
        accepted = client.ask({"type": "chat", "content": "Write a long story about a robot who learns to paint.",
                               "max_new_tokens": 200})
        rid = accepted["request_id"]
        assert client.recv()["type"] == "token"
        with stack.primary() as conn:  # shut the worker out while it decodes
            conn.execute(f"ALTER ROLE {role} NOLOGIN")
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
        deadline = time.monotonic() + 120
        while not r.exists(FINISHED_PREFIX + rid):  # the reply is made, and kept: storing it failed
            assert time.monotonic() < deadline, "the worker never failed to store the reply"
            time.sleep(0.05)
        made = [e for e in streams.stream_events(r, rid)]
        assert all(e["type"] == "token" for e in made)
        with stack.primary() as conn:
            conn.execute(f"ALTER ROLE {role} LOGIN")
        tokens, done = client.until_done(rid)
        tokens = [made[0], *tokens]
        assert done["finish_reason"] in ("stop", "length"), done
        assert [t["seq"] for t in tokens] == list(range(len(tokens)))
        assert len(tokens) == len(made)  # nothing generated after the reply was made
        with stack.primary() as conn:
            rows = conn.execute("SELECT content, completion_tokens FROM messages WHERE request_id = %s "
                                "AND role = 'assistant'", (rid,)).fetchall()
        assert rows == [("".join(t["text"] for t in tokens), done["usage"]["completion_tokens"])]
        assert not r.exists(FINISHED_PREFIX + rid)  # no longer kept once stored
    finally:
        client.close()
        web.stop()
        worker.stop()
        r.close()
        with stack.primary() as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")
