"""History is read from the replica; writes and prompt reads go to the primary; callers are kept apart."""

from __future__ import annotations

import time

import pytest
import redis

from app import streams
from scripts.services import free_port, start_web
from tests.conftest import Client

pytestmark = pytest.mark.integration


def test_history_is_served_by_the_replica(stack, client):
    accepted, tokens, done = client.chat("What is the capital of France?", max_new_tokens=16)
    conversation_id = accepted["conversation_id"]
    stack.pg.wait_replayed()
    body = client.messages(conversation_id).json()
    assert body["conversation_id"] == conversation_id
    assert [(m["role"], m["status"]) for m in body["messages"]] == [("user", "complete"), ("assistant", "complete")]
    assert body["messages"][1]["content"] == "".join(t["text"] for t in tokens)
    assert body["messages"][1]["id"] == done["message_id"]
    assert set(body["messages"][0]) == {"id", "role", "content", "status", "finish_reason", "created_at"}

    # Freeze the replica: new writes land on the primary but the replica does not show them yet.
    with stack.replica() as conn:
        conn.execute("SELECT pg_wal_replay_pause()")
    try:
        second, tokens2, done2 = client.chat("And of Italy?", conversation_id=conversation_id, max_new_tokens=16)
        # The worker built the prompt from the primary: the first turn was in it.
        assert done2["usage"]["prompt_tokens"] > done["usage"]["prompt_tokens"]
        with stack.primary() as conn:
            on_primary = conn.execute("SELECT count(*) FROM messages WHERE conversation_id = %s",
                                      (conversation_id,)).fetchone()[0]
        assert on_primary == 4
        assert len(client.messages(conversation_id).json()["messages"]) == 2  # served by the paused replica
    finally:
        with stack.replica() as conn:
            conn.execute("SELECT pg_wal_replay_resume()")
    stack.pg.wait_replayed()
    messages = client.messages(conversation_id).json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[3]["content"] == "".join(t["text"] for t in tokens2)


def test_conversations_list_newest_first_and_delete(stack, client):
    first, *_ = client.chat("First conversation.", max_new_tokens=4)
    second, *_ = client.chat("Second conversation.", max_new_tokens=4)
    stack.pg.wait_replayed()
    listed = client.http.get(client.base_url + "/api/conversations").json()["conversations"]
    assert [c["id"] for c in listed] == [second["conversation_id"], first["conversation_id"]]
    assert listed[0]["title"] == "Second conversation."

    res = client.http.delete(f"{client.base_url}/api/conversations/{first['conversation_id']}")
    assert res.status_code == 204
    stack.pg.wait_replayed()
    assert client.messages(first["conversation_id"]).status_code == 404
    assert client.http.delete(f"{client.base_url}/api/conversations/{first['conversation_id']}").status_code == 404
    with stack.primary() as conn:
        assert conn.execute("SELECT count(*) FROM messages WHERE conversation_id = %s",
                            (first["conversation_id"],)).fetchone()[0] == 0


def test_nobody_reaches_a_conversation_that_is_not_theirs(stack, client, other_client):
    accepted, *_ = client.chat("A private question.", max_new_tokens=4)
    conversation_id, request_id = accepted["conversation_id"], accepted["request_id"]
    stack.pg.wait_replayed()
    before = stack.count("messages")

    res = other_client.messages(conversation_id)
    assert res.status_code == 404 and res.json()["error"]["code"] == "not_found"
    assert other_client.http.get(other_client.base_url + "/api/conversations").json() == {"conversations": []}
    assert other_client.http.delete(f"{other_client.base_url}/api/conversations/{conversation_id}").status_code == 404
    for frame in ({"type": "chat", "content": "mine now", "conversation_id": conversation_id},
                  {"type": "resume", "request_id": request_id, "after_seq": -1},
                  {"type": "cancel", "request_id": request_id}):
        reply = other_client.ask(frame)
        assert (reply["type"], reply["code"]) == ("error", "not_found"), reply
    assert stack.count("messages") == before
    assert client.messages(conversation_id).status_code == 200


def test_deleting_a_conversation_mid_reply_stops_the_reply_and_its_text_leaves_redis(stack):
    settings = stack.settings.model_copy(update={"web_port": free_port(), "max_new_tokens_cap": 400})
    web = start_web(settings, stack.root / "logs")
    client = Client(f"http://127.0.0.1:{settings.web_port}")
    r = redis.Redis(port=settings.redis_port, decode_responses=True)
    try:
        first, _, _ = client.chat("Say hi.", max_new_tokens=4)
        conversation = first["conversation_id"]
        accepted = client.ask({"type": "chat", "content": "Write a long story about a robot who learns to paint.",
                               "conversation_id": conversation, "max_new_tokens": 400})
        assert client.recv()["type"] == "token"
        res = client.http.delete(f"{client.base_url}/api/conversations/{conversation}", timeout=10)
        assert res.status_code == 204
        _, done = client.until_done(accepted["request_id"])
        assert done["finish_reason"] == "cancelled" and done["message_id"] is None, done
        assert done["usage"]["completion_tokens"] < 400  # stopped, not run to its end
        # The text leaves Redis soon (the worker shortens its stream just after it writes its `done`).
        deadline = time.monotonic() + 10
        while not all(0 < r.ttl(streams.stream_key(rid)) <= streams.FORGET_AFTER_S
                      for rid in (first["request_id"], accepted["request_id"])):
            assert time.monotonic() < deadline, "the streams of the deleted conversation are kept"
            time.sleep(0.05)
        with stack.primary() as conn:
            assert conn.execute("SELECT count(*) FROM messages WHERE conversation_id = %s",
                                (conversation,)).fetchone()[0] == 0
    finally:
        client.close()
        web.stop()
        r.close()
