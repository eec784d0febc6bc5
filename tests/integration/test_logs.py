"""No log line carries what callers say, what the model answers, or their tokens: every server's log of the
stack (web, worker, Flower, Redis, both PostgreSQL servers) is read after a conversation and a failed
statement."""

from __future__ import annotations

import stat
import uuid

import pytest
import websocket

from tests.conftest import Client, site_token

pytestmark = pytest.mark.integration


def test_no_message_text_reply_or_token_reaches_any_log(stack):
    marker = f"zebra{uuid.uuid4().hex[:12]}"
    client = Client(stack.base_url, site_token(f"logged-{marker}"))
    try:
        accepted, tokens, done = client.chat(f"Tell me about the word {marker}.", max_new_tokens=24,
                                             client_id=f"cid-{marker}")
        reply = "".join(t["text"] for t in tokens)
        # The same client_id again: answered from the first (the unique key of owner and client_id holds).
        again = client.ask({"type": "chat", "content": f"Tell me about the word {marker}.",
                            "client_id": f"cid-{marker}"})
        assert again["request_id"] == accepted["request_id"]
        client.until_done(accepted["request_id"])
        # A bad token in the URL, answered unauthorized.
        bad = site_token(f"bad-{marker}", secret="not-the-site-secret-but-long-enough!!")
        ws = websocket.create_connection(f"{stack.base_url.replace('http', 'ws', 1)}/ws?token={bad}", timeout=30)
        assert '"unauthorized"' in ws.recv()
        ws.close()
    finally:
        client.close()
    # A statement that fails with the caller's id in its values: the same key inserted twice, on the primary.
    with stack.primary() as conn:
        owner = conn.execute("SELECT owner, client_id, conversation_id, user_message_id, params "
                             "FROM chat_requests WHERE id = %s", (accepted["request_id"],)).fetchone()
        with pytest.raises(Exception):
            conn.execute("INSERT INTO chat_requests (id, owner, client_id, conversation_id, user_message_id, "
                         "params) VALUES (%s, %s, %s, %s, %s, %s)",
                         (uuid.uuid4().hex, owner[0], owner[1], owner[2], owner[3], '{}'))
    secrets = {"message": marker, "token": client.token, "bad token": bad}
    if len(reply.strip()) >= 16:
        secrets["reply"] = reply
    logs = sorted(p for p in stack.root.rglob("*.log") if p.is_file())
    assert {p.name for p in logs} >= {"web.log", "cpu0.log", "flower.log", "redis.log", "primary.log",
                                      "replica.log"}, logs
    # The failure is logged (its values are what must not be).
    assert "duplicate key" in next(p for p in logs if p.name == "primary.log").read_text(errors="replace")
    for path in logs:
        text = path.read_text(errors="replace")
        found = [what for what, value in secrets.items() if value in text]
        assert not found, f"{path.name} holds the {found}"
    for name in ("web.log", "cpu0.log", "flower.log", "redis.log"):  # the stack's servers' own logs
        assert stat.S_IMODE(stack.root.joinpath("logs", name).stat().st_mode) == 0o600, name
