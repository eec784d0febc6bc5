"""The primary lost and its replica promoted (`pg_ctl promote`): while no server takes writes a `chat` gets
`unavailable` and nothing is stored; once the replica is promoted, writes resume on it, without restarting the
web tier or the workers (libpq's multi-host URL with `target_session_attrs=read-write`)."""

from __future__ import annotations

import os
import shutil
import signal
import time
import uuid

import psycopg
import pytest

from scripts.services import PostgresPair, free_port, migrate, start_web, start_worker
from tests.conftest import Client

pytestmark = pytest.mark.integration


def answers(port: int) -> bool:
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user="chat", dbname="chat", connect_timeout=1):
            return True
    except psycopg.OperationalError:
        return False


def count(port: int, table: str) -> int:
    with psycopg.connect(host="127.0.0.1", port=port, user="chat", dbname="chat", autocommit=True) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_writes_resume_on_the_promoted_replica_and_nothing_is_half_written_meanwhile(stack):
    # A pair of its own: this one is broken for good.
    pair = PostgresPair(stack.root / f"pg-{uuid.uuid4().hex[:6]}", free_port(), free_port(), durable=False)
    settings = stack.settings.model_copy(update={
        "primary_port": pair.primary_port, "replica_port": pair.replica_port, "web_port": free_port(),
        "model_queue": f"failover-{uuid.uuid4().hex[:8]}"})
    started = []
    try:
        pair.start()
        migrate(settings.resolved_database_url)
        started.append(start_worker(settings, f"failover-{uuid.uuid4().hex[:6]}@%h", stack.root / "logs"))
        started.append(start_web(settings, stack.root / "logs"))
        client = Client(f"http://127.0.0.1:{settings.web_port}")
        accepted, _, done = client.chat("Say one.", max_new_tokens=4)
        assert done["finish_reason"] in ("stop", "length")
        pair.wait_replayed()

        os.kill(pair.pid("primary"), signal.SIGQUIT)  # the primary crashes
        deadline = time.monotonic() + 30
        while answers(pair.primary_port):
            assert time.monotonic() < deadline, "the primary still answers"
            time.sleep(0.05)
        reply = client.ask({"type": "chat", "content": "Anyone?", "conversation_id": accepted["conversation_id"],
                            "max_new_tokens": 4})
        assert (reply["type"], reply["code"]) == ("error", "unavailable"), reply
        stored = (count(pair.replica_port, "messages"), count(pair.replica_port, "chat_requests"))
        assert client.ask({"type": "ping"}) == {"type": "pong"}

        promoted = time.monotonic()
        pair.promote()
        while True:  # a user trying again
            reply = client.ask({"type": "chat", "content": "Still there?", "max_new_tokens": 4})
            if reply["type"] == "accepted":
                break
            assert reply["code"] == "unavailable" and time.monotonic() < promoted + 60, reply
            time.sleep(0.2)
        writes_back_s = time.monotonic() - promoted
        _, done = client.until_done(reply["request_id"])
        assert done["finish_reason"] in ("stop", "length") and done["message_id"]  # stored by the worker too
        # Nothing of the refused chats was kept: the new primary holds only what was accepted.
        assert count(pair.replica_port, "chat_requests") == stored[1] + 1
        assert count(pair.replica_port, "messages") == stored[0] + 2
        print(f"\nwrites back {writes_back_s:.1f} s after pg_ctl promote")
        client.close()
    finally:
        for proc in reversed(started):
            proc.stop()
        pair.stop()
        shutil.rmtree(pair.root, ignore_errors=True)
