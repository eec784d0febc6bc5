"""The store's single-statement accept and prompt read, on the real PostgreSQL primary."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import DataError

from app.protocol import SamplingParams
from app.storage import NotFound, Store, hung_up

pytestmark = pytest.mark.integration

PARAMS = SamplingParams(8)


@pytest.fixture(scope="module")
def store(stack):
    s = Store(stack.settings.resolved_database_url, stack.settings.resolved_replica_url, pool_size=2)
    yield s
    s.dispose()


def rows_of(stack, conversation_id: str) -> tuple[int, int, int]:
    with stack.primary() as conn:
        return conn.execute(
            "SELECT (SELECT count(*) FROM conversations WHERE id = %(c)s),"
            " (SELECT count(*) FROM chat_requests WHERE conversation_id = %(c)s),"
            " (SELECT count(*) FROM messages WHERE conversation_id = %(c)s)", {"c": conversation_id}).fetchone()


def test_accept_stores_conversation_request_and_message_together(stack, store):
    first = store.accept_chat("owner-a", "Hello there", None, None, SamplingParams(8))
    assert first.created and rows_of(stack, first.conversation_id) == (1, 1, 1)
    req = store.prompt_request(first.request_id)
    assert req.conversation_id == first.conversation_id
    assert req.params == SamplingParams(8)
    assert req.history == [{"role": "user", "content": "Hello there"}] and req.reply is None
    with stack.primary() as conn:
        title, owner = conn.execute("SELECT title, owner FROM conversations WHERE id = %s",
                                    (first.conversation_id,)).fetchone()
        role, status, request_id = conn.execute("SELECT role, status, request_id FROM messages WHERE id = %s",
                                                (first.user_message_id,)).fetchone()
    assert (title, owner, role, status, request_id) == ("Hello there", "owner-a", "user", "complete", first.request_id)


def test_prompt_has_the_turns_before_it_and_a_stored_reply(stack, store):
    first = store.accept_chat("owner-b", "One", None, None, PARAMS)
    store.store_reply(first.request_id, first.conversation_id, "Reply one", "stop", 5, 2)
    second = store.accept_chat("owner-b", "Two", first.conversation_id, None, PARAMS)
    failed = store.accept_chat("owner-b", "Three", first.conversation_id, None, PARAMS)
    store.store_reply(failed.request_id, first.conversation_id, "", "error", 9, 0)
    fourth = store.accept_chat("owner-b", "Four", first.conversation_id, None, PARAMS)

    req = store.prompt_request(second.request_id)
    assert req.history == [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Reply one"},
                           {"role": "user", "content": "Two"}]
    assert req.reply is None
    # A redelivered request finds its stored reply; its history still ends at its own message.
    again = store.prompt_request(first.request_id)
    assert again.history == [{"role": "user", "content": "One"}]
    assert (again.reply.content, again.reply.finish_reason, again.reply.prompt_tokens,
            again.reply.completion_tokens) == ("Reply one", "stop", 5, 2)
    # A failed reply stays out of later prompts.
    assert [m["content"] for m in store.prompt_request(fourth.request_id).history] == [
        "One", "Reply one", "Two", "Three", "Four"]
    assert store.prompt_request("no-such-request") is None


def test_an_exchange_sent_whole_is_one_statement_and_reads_back_in_its_order(stack, store):
    # The OpenAI API's messages: a system message, earlier turns, a repeated text; the last is the user's.
    messages = [("system", "Answer briefly."), ("user", "Two"), ("assistant", "Reply one"), ("user", "Two"),
                ("assistant", "Reply two"), ("user", "Two")]
    statements = []

    def count(conn, cursor, statement, *_):
        statements.append(statement)

    event.listen(store.primary, "before_cursor_execute", count)
    try:
        accepted = store.accept_exchange("owner-x", messages, PARAMS)
    finally:
        event.remove(store.primary, "before_cursor_execute", count)
    assert len(statements) == 1 and accepted.created
    assert rows_of(stack, accepted.conversation_id) == (1, 1, len(messages))
    req = store.prompt_request(accepted.request_id)
    assert req.history == [{"role": role, "content": content} for role, content in messages]
    assert req.reply is None and req.params == PARAMS
    with stack.primary() as conn:
        rows = conn.execute("SELECT id, request_id, created_at FROM messages WHERE conversation_id = %s "
                            "ORDER BY created_at", (accepted.conversation_id,)).fetchall()
        title, owner = conn.execute("SELECT title, owner FROM conversations WHERE id = %s",
                                    (accepted.conversation_id,)).fetchone()
    assert len({r[2] for r in rows}) == len(messages)  # no two alike: the order does not rest on the role
    assert rows[-1][:2] == (accepted.user_message_id, accepted.request_id)
    assert all(message_id == request_id for message_id, request_id, _ in rows[:-1])  # one per (request, role)
    assert (title, owner) == ("Two", "owner-x")


def test_another_owners_conversation_is_not_found_and_nothing_is_written(stack, store):
    theirs = store.accept_chat("owner-c", "Mine", None, None, PARAMS)
    with pytest.raises(NotFound):
        store.accept_chat("owner-d", "Intruding", theirs.conversation_id, None, PARAMS)
    with pytest.raises(NotFound):
        store.accept_chat("owner-d", "Nowhere", "no-such-conversation", None, PARAMS)
    assert rows_of(stack, theirs.conversation_id) == (1, 1, 1)


def test_a_repeated_client_id_returns_the_first_request_and_writes_nothing(stack, store):
    first = store.accept_chat("owner-e", "Once", None, "key-7", PARAMS)
    again = store.accept_chat("owner-e", "Once", None, "key-7", PARAMS)
    assert (again.request_id, again.conversation_id, again.user_message_id) == (
        first.request_id, first.conversation_id, first.user_message_id)
    assert not again.created
    with stack.primary() as conn:
        assert conn.execute("SELECT count(*) FROM conversations WHERE owner = 'owner-e'").fetchone()[0] == 1
    # The same key from another caller is theirs alone.
    other = store.accept_chat("owner-f", "Once", None, "key-7", PARAMS)
    assert other.created and other.request_id != first.request_id


def _backend_pid(engine) -> int:
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()


def _terminate(connect, pid: int) -> None:
    with connect() as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        deadline = time.monotonic() + 10
        while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0]:
            assert time.monotonic() < deadline, f"backend {pid} still there"
            time.sleep(0.02)


def _messages_or_none(store, owner: str, conversation_id: str) -> list:
    try:
        return store.list_messages(owner, conversation_id)
    except NotFound:  # not on the replica yet
        return []


def test_pooled_connections_the_server_ended_are_replaced_without_an_error(stack):
    # One connection per pool, so that each checkout gets the same one back while it lives.
    store = Store(stack.settings.resolved_database_url, stack.settings.resolved_replica_url, pool_size=1)
    try:
        first = store.accept_chat("owner-g", "Before", None, None, PARAMS)
        primary_pid, replica_pid = _backend_pid(store.primary), _backend_pid(store.replica)
        # A live idle connection is kept: the check on checkout costs no reconnect.
        assert (_backend_pid(store.primary), _backend_pid(store.replica)) == (primary_pid, replica_pid)

        # The server ends both pooled connections, as a restart or an idle timeout would.
        _terminate(stack.primary, primary_pid)
        _terminate(stack.replica, replica_pid)

        # The next statements go through on fresh connections, at their first try.
        second = store.accept_chat("owner-g", "After", first.conversation_id, None, PARAMS)
        assert [m["content"] for m in store.prompt_request(second.request_id).history] == ["Before", "After"]
        assert _backend_pid(store.primary) != primary_pid
        deadline = time.monotonic() + 10
        while len(_messages_or_none(store, "owner-g", first.conversation_id)) < 2:  # the replica catches up
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert _backend_pid(store.replica) != replica_pid
    finally:
        store.dispose()


def test_hung_up_tells_an_ended_connection_from_an_idle_one(stack):
    with stack.primary() as conn:
        conn.execute("SELECT 1")
        assert not hung_up(conn)
        _terminate(stack.primary, conn.info.backend_pid)
        assert hung_up(conn)


def test_a_failed_statement_keeps_its_parameters_out_of_the_error_and_the_log(store):
    with pytest.raises(DataError) as failed:
        with store.session(primary=True) as s:
            s.execute(text("SELECT length(:secret) / 0"), {"secret": "a private message"})
    assert "a private message" not in str(failed.value)
