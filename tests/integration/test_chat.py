"""One message along the whole real path: WebSocket, primary, Celery, model, stream, primary."""

from __future__ import annotations

import threading

import pytest

pytestmark = pytest.mark.integration


def stored_reply(stack, request_id: str):
    with stack.primary() as conn:
        return conn.execute("SELECT id, content, status, finish_reason, completion_tokens FROM messages "
                            "WHERE request_id = %s AND role = 'assistant'", (request_id,)).fetchall()


def assert_seqs(tokens: list[dict], start: int = 0) -> None:
    assert [t["seq"] for t in tokens] == list(range(start, start + len(tokens)))


def test_reply_streams_and_is_stored_once(stack, client):
    accepted, tokens, done = client.chat("What is the capital of France?", max_new_tokens=24)
    assert accepted["queue_depth"] >= 0 and accepted["conversation_id"] and accepted["user_message_id"]
    assert done["finish_reason"] == "stop"
    assert_seqs(tokens)
    text = "".join(t["text"] for t in tokens)
    assert "Paris" in text  # the real model, greedy

    rows = stored_reply(stack, accepted["request_id"])
    assert len(rows) == 1
    message_id, content, status, finish_reason, completion_tokens = rows[0]
    assert content == text  # joined token texts equal the stored reply
    assert (message_id, status, finish_reason) == (done["message_id"], "complete", "stop")
    assert done["usage"]["completion_tokens"] == completion_tokens > 0
    assert done["usage"]["prompt_tokens"] > 0
    assert 0 < done["timing"]["engine_first_token_ms"] < 60_000


def test_length_limit_and_follow_up_turn_uses_history(stack, client):
    # One token cannot be a whole answer to this (nor the end of one) in any dtype: the reply is cut.
    first, tokens, done = client.chat("Write a long story about a dragon.", max_new_tokens=1)
    assert done["finish_reason"] == "length"
    assert done["usage"]["completion_tokens"] == 1 and len(tokens) <= 1
    second, _, done2 = client.chat("And now say hello.", conversation_id=first["conversation_id"],
                                   max_new_tokens=5)
    assert second["conversation_id"] == first["conversation_id"]
    assert done2["finish_reason"] in ("stop", "length") and done2["usage"]["completion_tokens"] <= 5
    # The second prompt holds the first turn and its reply, then the new turn.
    assert done2["usage"]["prompt_tokens"] > done["usage"]["prompt_tokens"] + done["usage"]["completion_tokens"]


def test_max_new_tokens_is_capped_by_settings(stack, client):
    _, tokens, done = client.chat("Write a very long story about a dragon.", max_new_tokens=10_000)
    assert done["usage"]["completion_tokens"] <= stack.settings.max_new_tokens_cap


def test_cancel_stops_generation_and_stores_what_was_made(stack, client):
    accepted = client.ask({"type": "chat", "content": "Write a long poem about the sea.", "max_new_tokens": 48})
    request_id = accepted["request_id"]
    first = client.recv()
    assert first["type"] == "token"
    client.send({"type": "cancel", "request_id": request_id})
    tokens, done = client.until_done(request_id)
    tokens = [first, *tokens]
    assert done["finish_reason"] == "cancelled"
    assert done["usage"]["completion_tokens"] < 48
    (message_id, content, status, finish_reason, _), = stored_reply(stack, request_id)
    assert (status, finish_reason, message_id) == ("cancelled", "cancelled", done["message_id"])
    assert content == "".join(t["text"] for t in tokens)


def test_resume_on_a_new_socket_gets_every_later_event_once(stack, client):
    accepted = client.ask({"type": "chat", "content": "Describe a busy morning at a city market.",
                           "max_new_tokens": 32})
    request_id = accepted["request_id"]
    seen = [client.recv(), client.recv()]
    assert [f["seq"] for f in seen] == [0, 1]
    client.ws.close()  # the browser lost its connection

    ws = client.connect()
    client.send({"type": "resume", "request_id": request_id, "after_seq": 1}, ws)
    rest, done = client.until_done(request_id, ws)
    assert_seqs(rest, start=2)
    (_, content, *_), = stored_reply(stack, request_id)
    assert "".join(f["text"] for f in seen + rest) == content

    # After the end, resume from -1 replays the whole request.
    client.send({"type": "resume", "request_id": request_id, "after_seq": -1}, ws)
    replay, done_again = client.until_done(request_id, ws)
    assert_seqs(replay)
    assert "".join(f["text"] for f in replay) == content
    assert done_again == done


def test_same_client_id_gives_the_same_request(stack, client):
    accepted, tokens, done = client.chat("Say hi.", client_id="key-1", max_new_tokens=8)
    again, tokens_again, done_again = client.chat("Say hi.", client_id="key-1", max_new_tokens=8)
    assert again["request_id"] == accepted["request_id"]
    assert done_again["message_id"] == done["message_id"]
    assert tokens_again == tokens
    with stack.primary() as conn:
        roles = conn.execute("SELECT role FROM messages WHERE request_id = %s ORDER BY role",
                             (accepted["request_id"],)).fetchall()
    assert roles == [("assistant",), ("user",)]


def test_concurrent_chats_each_end_in_exactly_one_reply(stack):
    from tests.conftest import Client

    clients = [Client(stack.base_url) for _ in range(3)]
    results: dict[int, tuple] = {}

    def run(i: int) -> None:
        results[i] = clients[i].chat(f"Give me one tip number {i} for learning a language.", max_new_tokens=8)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(results) == 3
    for accepted, tokens, done in results.values():
        rows = stored_reply(stack, accepted["request_id"])
        assert len(rows) == 1
        assert rows[0][1] == "".join(t["text"] for t in tokens)
    for c in clients:
        c.close()


def test_ping(client):
    assert client.ask({"type": "ping"}) == {"type": "pong"}


def test_accepted_queue_depth_counts_waiting_requests(stack, client):
    # More requests than the worker has slots: the later ones wait on the queue.
    count = stack.settings.max_batch + 3
    ids = []
    depths = []
    for i in range(count):
        client.send({"type": "chat", "content": f"Name a colour, number {i}.", "max_new_tokens": 8})
    pending = {}
    while len(pending) < count or any(v is None for v in pending.values()):
        frame = client.recv()
        if frame["type"] == "accepted":
            ids.append(frame["request_id"])
            depths.append(frame["queue_depth"])
            pending[frame["request_id"]] = None
        elif frame["type"] == "done":
            pending[frame["request_id"]] = frame
    assert all(isinstance(d, int) and d >= 0 for d in depths)
    assert max(depths) >= 1
    for request_id in ids:
        assert len(stored_reply(stack, request_id)) == 1
