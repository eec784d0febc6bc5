"""Conversations, messages and chat requests in PostgreSQL.

Writes go to the primary. Plain reads go to the replica through one routing
session (SQLAlchemy's "custom vertical partitioning" recipe); a read that must
see a write just made asks for the primary explicitly.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Index,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    func,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.sql import Delete, Insert, Update

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

TITLE_CHARS = 80


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Conversation(Base):
    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    title: Mapped[str] = mapped_column(String(TITLE_CHARS), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Message(Base):
    __tablename__ = "messages"
    # One user message and at most one assistant message per request: the
    # worker's insert of the reply is idempotent on (request_id, role).
    __table_args__ = (
        UniqueConstraint("request_id", "role", name="uq_messages_request_id_role"),
        Index("ix_messages_conversation_id_created_at", "conversation_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    request_id: Mapped[str] = mapped_column(String(32))
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    prompt_tokens: Mapped[int | None]
    completion_tokens: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.clock_timestamp())


class ChatRequest(Base):
    """One accepted `chat` frame: what the worker needs, and whose it is."""

    __tablename__ = "chat_requests"
    __table_args__ = (UniqueConstraint("owner", "client_id", name="uq_chat_requests_owner_client_id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(128))
    client_id: Mapped[str | None] = mapped_column(String(128))
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"), index=True)
    user_message_id: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class RoutingSession(Session):
    """Writes and flushes go to the primary, plain reads to the replica.

    ``session.info["primary"] = True`` pins every statement of the session to the
    primary: for reads that must see a write just made.
    """

    def get_bind(self, mapper=None, clause=None, **kw):
        engines = self.info["engines"]
        if self.info.get("primary") or self._flushing or isinstance(clause, (Insert, Update, Delete)):
            return engines["primary"]
        return engines["replica"]


class NotFound(Exception):
    """No such conversation or request, or not the caller's."""


@dataclass(frozen=True)
class Accepted:
    request_id: str
    conversation_id: str
    user_message_id: str
    created: bool  # False when a client_id repeated an earlier request


@dataclass(frozen=True)
class PromptRequest:
    request_id: str
    conversation_id: str
    params: dict
    history: list[dict]  # [{"role", "content"}], oldest first, up to this request's message
    reply: Message | None  # already stored: this is a redelivery


class Store:
    """All SQL of both tiers."""

    def __init__(self, primary_url: str, replica_url: str, pool_size: int = 5):
        kw = {"pool_pre_ping": True, "pool_size": pool_size, "max_overflow": 10, "connect_args": {"connect_timeout": 3}}
        self.primary: Engine = create_engine(primary_url, **kw)
        self.replica: Engine = create_engine(replica_url, **kw)
        self._sessions = sessionmaker(class_=RoutingSession, expire_on_commit=False)

    @contextlib.contextmanager
    def session(self, primary: bool = False) -> Iterator[Session]:
        """A routing session; commits on success, rolls back on any error."""
        s = self._sessions(info={"engines": {"primary": self.primary, "replica": self.replica}, "primary": primary})
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    def ping(self, which: str) -> None:
        engine = self.primary if which == "primary" else self.replica
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    # --- the web tier ---------------------------------------------------------

    def accept_chat(self, owner: str, content: str, conversation_id: str | None, client_id: str | None,
                    params: dict) -> Accepted:
        """Store the user message (and its conversation when new) on the primary."""
        if client_id is not None:
            earlier = self._request_by_client_id(owner, client_id)
            if earlier is not None:
                return earlier
        try:
            with self.session(primary=True) as s:
                if conversation_id is None:
                    conv = Conversation(id=new_id(), owner=owner, title=_title(content))
                    s.add(conv)
                    s.flush()
                else:
                    conv = s.scalars(select(Conversation).where(Conversation.id == conversation_id,
                                                                Conversation.owner == owner).with_for_update()).first()
                    if conv is None:
                        raise NotFound(conversation_id)
                    conv.updated_at = func.now()
                req = ChatRequest(id=new_id(), owner=owner, client_id=client_id, conversation_id=conv.id,
                                  user_message_id=new_id(), params=params)
                s.add(req)
                s.add(Message(id=req.user_message_id, conversation_id=conv.id, request_id=req.id, role="user",
                              content=content, status="complete"))
                s.flush()
                return Accepted(req.id, conv.id, req.user_message_id, created=True)
        except IntegrityError:
            # Two sockets raced with the same client_id: the other one won.
            earlier = self._request_by_client_id(owner, client_id) if client_id else None
            if earlier is None:
                raise
            return earlier

    def forget_request(self, request_id: str, drop_conversation: bool) -> None:
        """Undo :meth:`accept_chat` when the task could not be enqueued."""
        with self.session(primary=True) as s:
            req = s.get(ChatRequest, request_id)
            if req is None:
                return
            s.execute(delete(Message).where(Message.request_id == request_id))
            s.execute(delete(ChatRequest).where(ChatRequest.id == request_id))
            if drop_conversation:
                s.execute(delete(Conversation).where(Conversation.id == req.conversation_id))

    def owns_request(self, owner: str, request_id: str) -> bool:
        # Primary: the request may have been accepted a moment ago on another socket.
        with self.session(primary=True) as s:
            return s.scalar(select(ChatRequest.id).where(ChatRequest.id == request_id,
                                                         ChatRequest.owner == owner)) is not None

    def _request_by_client_id(self, owner: str, client_id: str) -> Accepted | None:
        with self.session(primary=True) as s:
            req = s.scalars(select(ChatRequest).where(ChatRequest.owner == owner,
                                                      ChatRequest.client_id == client_id)).first()
            if req is None:
                return None
            return Accepted(req.id, req.conversation_id, req.user_message_id, created=False)

    def list_conversations(self, owner: str) -> list[dict]:
        with self.session() as s:
            rows = s.scalars(select(Conversation).where(Conversation.owner == owner)
                             .order_by(Conversation.updated_at.desc(), Conversation.created_at.desc()))
            return [{"id": c.id, "title": c.title, "created_at": c.created_at.isoformat(),
                     "updated_at": c.updated_at.isoformat()} for c in rows]

    def list_messages(self, owner: str, conversation_id: str) -> list[dict]:
        """The conversation's messages from the replica, oldest first."""
        with self.session() as s:
            if s.scalar(select(Conversation.id).where(Conversation.id == conversation_id,
                                                      Conversation.owner == owner)) is None:
                raise NotFound(conversation_id)
            rows = s.scalars(select(Message).where(Message.conversation_id == conversation_id)
                             .order_by(Message.created_at, Message.role.desc()))
            return [{"id": m.id, "role": m.role, "content": m.content, "status": m.status,
                     "finish_reason": m.finish_reason, "created_at": m.created_at.isoformat()} for m in rows]

    def delete_conversation(self, owner: str, conversation_id: str) -> None:
        with self.session(primary=True) as s:
            gone = s.execute(delete(Conversation).where(Conversation.id == conversation_id,
                                                        Conversation.owner == owner))
            if gone.rowcount == 0:
                raise NotFound(conversation_id)

    # --- the worker -----------------------------------------------------------

    def prompt_request(self, request_id: str) -> PromptRequest | None:
        """The request, its history and any reply already stored, from the primary so the new message is there."""
        with self.session(primary=True) as s:
            req = s.get(ChatRequest, request_id)
            if req is None:
                return None
            user_msg = s.get(Message, req.user_message_id)
            rows = s.execute(select(Message.role, Message.content).where(
                Message.conversation_id == req.conversation_id,
                Message.created_at <= user_msg.created_at,
                Message.status != "failed",
            ).order_by(Message.created_at, Message.role.desc())).all()
            history = [{"role": r.role, "content": r.content} for r in rows]
            reply = s.scalars(select(Message).where(Message.request_id == request_id,
                                                    Message.role == "assistant")).first()
            return PromptRequest(req.id, req.conversation_id, dict(req.params), history, reply)

    def store_reply(self, request_id: str, conversation_id: str, content: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int) -> str | None:
        """Insert the assistant message once; return its id (the first one's on a repeat).

        None when the conversation was deleted meanwhile.
        """
        status = {"stop": "complete", "length": "complete", "cancelled": "cancelled"}.get(finish_reason, "failed")
        with self.session(primary=True) as s:
            if s.get(Conversation, conversation_id) is None:
                return None
            s.execute(insert(Message).values(
                id=new_id(), conversation_id=conversation_id, request_id=request_id, role="assistant",
                content=content, status=status, finish_reason=finish_reason,
                prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            ).on_conflict_do_nothing(constraint="uq_messages_request_id_role"))
            s.execute(Conversation.__table__.update().where(Conversation.id == conversation_id)
                      .values(updated_at=func.now()))
            return s.scalar(select(Message.id).where(Message.request_id == request_id, Message.role == "assistant"))


def _title(content: str) -> str:
    line = " ".join(content.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1] + "…"
