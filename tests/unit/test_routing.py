"""The routing session sends writes to the primary and plain reads to the replica."""

from __future__ import annotations

from sqlalchemy import create_engine, delete, insert, select

from app.storage import Conversation, RoutingSession


def session(primary_flag: bool = False) -> tuple[RoutingSession, object, object]:
    primary, replica = create_engine("sqlite://"), create_engine("sqlite://")
    s = RoutingSession(info={"engines": {"primary": primary, "replica": replica}, "primary": primary_flag})
    return s, primary, replica


def test_reads_go_to_the_replica_and_writes_to_the_primary():
    s, primary, replica = session()
    assert s.get_bind(clause=select(Conversation)) is replica
    assert s.get_bind(clause=insert(Conversation)) is primary
    assert s.get_bind(clause=delete(Conversation)) is primary


def test_a_session_pinned_to_the_primary_reads_there():
    s, primary, _ = session(primary_flag=True)
    assert s.get_bind(clause=select(Conversation)) is primary
