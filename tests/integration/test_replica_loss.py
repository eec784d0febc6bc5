"""The replica lost (its server crashes): history reads go to the primary, and the web tier stays ready."""

from __future__ import annotations

import os
import signal
import time

import psycopg
import pytest
import requests

from app.storage import Store

pytestmark = pytest.mark.integration


def replica_answers(stack) -> bool:
    try:
        with psycopg.connect(host="127.0.0.1", port=stack.pg.replica_port, user="chat", dbname="chat",
                             connect_timeout=1):
            return True
    except psycopg.OperationalError:
        return False


def test_with_the_replica_gone_history_is_read_from_the_primary_and_the_web_stays_ready(stack, client):
    accepted, _, _ = client.chat("Say hi.", max_new_tokens=4)
    conversation = accepted["conversation_id"]
    stack.pg.wait_replayed()
    want = client.messages(conversation).json()
    os.kill(stack.pg.pid("replica"), signal.SIGQUIT)  # immediate shutdown, as in a crash
    try:
        deadline = time.monotonic() + 30
        while replica_answers(stack):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        res = client.messages(conversation)
        assert res.status_code == 200 and res.json() == want
        listed = client.http.get(stack.base_url + "/api/conversations", timeout=10)
        assert listed.status_code == 200 and conversation in [c["id"] for c in listed.json()["conversations"]]
        ready = requests.get(stack.base_url + "/readyz", timeout=30)
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["replica"].startswith("failed") and "primary" in ready.json()["checks"]["replica"]
        # Chats go on, and their history is read at once.
        again, _, done = client.chat("And again.", conversation_id=conversation, max_new_tokens=4)
        messages = client.messages(conversation).json()["messages"]
        assert [m["id"] for m in messages][-1] == done["message_id"]
    finally:
        stack.pg.start()  # the replica back, streaming, for the tests after this one
        time.sleep(Store.REPLICA_RETRY_S)  # and the web tier reading from it again
