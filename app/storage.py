"""Conversations, messages, chat requests and API keys in PostgreSQL.

Writes go to the primary. Plain reads go to the replica through one routing
session (SQLAlchemy's "custom vertical partitioning" recipe); a read that must
see a write just made asks for the primary explicitly.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from select import POLLIN, POLLPRI, poll

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Index,
    MetaData,
    Select,
    String,
    Text,
    UniqueConstraint,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    literal,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.engine import Engine, Row
from sqlalchemy.exc import DisconnectionError, IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.sql import Delete, Executable, Insert, Update
from sqlalchemy.sql.selectable import CTE

from app.protocol import SamplingParams

logger = logging.getLogger(__name__)

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
    owner: Mapped[str] = mapped_column(String(255), index=True)
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
    owner: Mapped[str] = mapped_column(String(255))
    client_id: Mapped[str | None] = mapped_column(String(128))
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"), index=True)
    user_message_id: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ApiKey(Base):
    """A key for `/v1`: its owner is a caller of the same kind as a JWT's (issuer and sub). Only a hash is kept."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(255), index=True)
    name: Mapped[str] = mapped_column(String(80), default="")
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


# What every API key starts with: a JWT never does ("eyJ"), so a bearer token says which it is.
API_KEY_PREFIX = "cqk_"


def api_key_hash(key: str) -> str:
    """Keys are 256 random bits: a plain SHA-256 keeps them safe at rest and finds them by index."""
    return hashlib.sha256(key.encode()).hexdigest()


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
    params: SamplingParams
    history: list[dict]  # [{"role", "content"}], oldest first, up to this request's message
    reply: Message | None  # already stored: this is a redelivery
    accepted_at: float = 0.0  # when the web tier stored it (seconds since the epoch, the primary's clock)


class Store:
    """All SQL of both tiers."""

    # After the replica failed, reads go to the primary for this long before the replica is tried again.
    REPLICA_RETRY_S = 5.0

    def __init__(self, primary_url: str, replica_url: str, pool_size: int = 5):
        kw = {"pool_size": pool_size, "max_overflow": 10, "connect_args": {"connect_timeout": 3}}
        self._replica_failed_at = -float("inf")
        # hide_parameters: a failed statement's message text stays out of exceptions and logs.
        kw["hide_parameters"] = True
        self.primary: Engine = create_engine(primary_url, **kw)
        self.replica: Engine = create_engine(replica_url, **kw)
        for engine in (self.primary, self.replica):
            event.listen(engine, "checkout", _drop_if_hung_up)
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

    def dispose(self) -> None:
        """Close every pooled connection to both servers."""
        self.primary.dispose()
        self.replica.dispose()

    def replica_read(self, read):
        """``read(session)`` on the replica, or on the primary where the replica cannot be reached.

        A failed replica is left alone for :attr:`REPLICA_RETRY_S` so that no read
        waits for its connect timeout meanwhile.
        """
        if time.monotonic() - self._replica_failed_at >= self.REPLICA_RETRY_S:
            try:
                with self.session() as s:
                    return read(s)
            except OperationalError as exc:
                self._replica_failed_at = time.monotonic()
                logger.warning("Replica unavailable (%s); reads go to the primary", type(exc.orig).__name__)
        with self.session(primary=True) as s:
            return read(s)

    def ping(self, which: str) -> None:
        engine = self.primary if which == "primary" else self.replica
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    # --- the web tier ---------------------------------------------------------

    def accept_chat(self, owner: str, content: str, conversation_id: str | None, client_id: str | None,
                    params: SamplingParams) -> Accepted:
        """Store the user message (and its conversation when new) on the primary, in one statement."""
        request_id, message_id = new_id(), new_id()
        stmt = _ACCEPT_IN_NEW if conversation_id is None else _ACCEPT_IN_EXISTING
        try:
            # Bind names unlike any column's: an UPDATE would take a column-named parameter as a SET value.
            rows = self._on_primary(stmt, new_conversation_id=conversation_id or new_id(), new_owner=owner,
                                    new_title=_title(content), new_request_id=request_id, new_client_id=client_id,
                                    new_message_id=message_id, new_params=params.as_json(), new_content=content)
        except IntegrityError:
            # The client_id repeats an earlier request (a retry, or two sockets racing).
            earlier = self._request_by_client_id(owner, client_id) if client_id else None
            if earlier is None:
                raise
            return earlier
        if not rows:
            raise NotFound(conversation_id)
        return Accepted(request_id, rows[0][0], message_id, created=True)

    def _on_primary(self, stmt: Executable, **params) -> list[Row]:
        """One statement on the primary, committed on its own: no BEGIN and COMMIT round trips."""
        with self.primary.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            return conn.execute(stmt, params).all()

    def accept_exchange(self, owner: str, messages: list[tuple[str, str]], params: SamplingParams) -> Accepted:
        """Store a whole exchange sent at once (the OpenAI API's ``messages``, the last one the user's) as a new
        conversation of ``owner``, with the request for its reply; one statement on the primary."""
        request_id, conversation_id = new_id(), new_id()
        first_user = next((content for role, content in messages if role == "user"), messages[-1][1])
        ids = [new_id() for _ in messages]
        # Earlier messages get request ids of their own: a message is one per (request, role).
        self._on_primary(_ACCEPT_EXCHANGE, new_conversation_id=conversation_id, new_owner=owner,
                         new_title=_title(first_user), new_request_id=request_id, new_client_id=None,
                         new_message_id=ids[-1], new_params=params.as_json(), new_ids=ids,
                         new_request_ids=[*ids[:-1], request_id],
                         new_roles=[role for role, _ in messages], new_contents=[content for _, content in messages])
        return Accepted(request_id, conversation_id, ids[-1], created=True)

    def create_api_key(self, owner: str, name: str = "") -> tuple[str, str]:
        """A new key for ``owner``: its id and the key itself, which is shown this once and kept only hashed."""
        key = API_KEY_PREFIX + secrets.token_urlsafe(32)
        row = ApiKey(id=new_id(), owner=owner, name=name[:80], key_hash=api_key_hash(key))
        with self.session(primary=True) as s:
            s.add(row)
        return row.id, key

    def api_key_owner(self, key: str) -> str | None:
        """The owner of a key that exists and is not revoked (on the primary: a key may be a moment old)."""
        with self.session(primary=True) as s:
            return s.scalar(select(ApiKey.owner).where(ApiKey.key_hash == api_key_hash(key),
                                                       ApiKey.revoked_at.is_(None)))

    def api_keys(self, owner: str | None = None) -> list[dict]:
        with self.session(primary=True) as s:
            stmt = select(ApiKey).order_by(ApiKey.created_at)
            rows = s.scalars(stmt.where(ApiKey.owner == owner) if owner else stmt)
            return [{"id": k.id, "owner": k.owner, "name": k.name, "created_at": k.created_at.isoformat(),
                     "revoked": k.revoked_at is not None} for k in rows]

    def revoke_api_key(self, key_id: str) -> bool:
        with self.session(primary=True) as s:
            return s.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                             .values(revoked_at=func.now())).rowcount > 0

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
        def read(s: Session) -> list[dict]:
            rows = s.scalars(select(Conversation).where(Conversation.owner == owner)
                             .order_by(Conversation.updated_at.desc(), Conversation.created_at.desc()))
            return [{"id": c.id, "title": c.title, "created_at": c.created_at.isoformat(),
                     "updated_at": c.updated_at.isoformat()} for c in rows]

        return self.replica_read(read)

    def list_messages(self, owner: str, conversation_id: str) -> list[dict]:
        """The conversation's messages from the replica (the primary while it is away), oldest first."""
        def read(s: Session) -> list[dict]:
            if s.scalar(select(Conversation.id).where(Conversation.id == conversation_id,
                                                      Conversation.owner == owner)) is None:
                raise NotFound(conversation_id)
            rows = s.scalars(select(Message).where(Message.conversation_id == conversation_id)
                             .order_by(Message.created_at, Message.role.desc()))
            return [{"id": m.id, "role": m.role, "content": m.content, "status": m.status,
                     "finish_reason": m.finish_reason, "created_at": m.created_at.isoformat()} for m in rows]

        return self.replica_read(read)

    def delete_conversation(self, owner: str, conversation_id: str) -> list[str]:
        """Delete the caller's conversation with its messages and requests; return those requests' ids."""
        with self.session(primary=True) as s:
            requests = list(s.scalars(select(ChatRequest.id).where(ChatRequest.conversation_id == conversation_id,
                                                                   ChatRequest.owner == owner)))
            gone = s.execute(delete(Conversation).where(Conversation.id == conversation_id,
                                                        Conversation.owner == owner))
            if gone.rowcount == 0:
                raise NotFound(conversation_id)
            return requests

    # --- the worker -----------------------------------------------------------

    def prompt_request(self, request_id: str) -> PromptRequest | None:
        """The request, its history and any reply already stored: one query on the primary, where the new message is."""
        rows = self._on_primary(_PROMPT_REQUEST, request_id=request_id)
        if not rows:
            return None
        history = [{"role": r.role, "content": r.content} for r in rows if not r.is_reply]
        reply = next((Message(id=r.id, role=r.role, content=r.content, finish_reason=r.finish_reason,
                              prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens)
                      for r in rows if r.is_reply), None)
        first = rows[0]
        return PromptRequest(request_id, first.conversation_id, SamplingParams.from_json(first.params), history,
                             reply, first.accepted_at.timestamp())

    def stored_reply(self, request_id: str) -> Message | None:
        """The request's assistant message, if it is stored (on the primary: it may be a moment old)."""
        with self.session(primary=True) as s:
            return s.scalars(select(Message).where(Message.request_id == request_id,
                                                   Message.role == "assistant")).first()

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


def hung_up(dbapi_connection) -> bool:
    """Whether the server has ended this idle connection, seen without a round trip.

    An idle connection's socket has nothing to read until the server ends it:
    a restart, ``pg_terminate_backend`` or an idle timeout sends an error and
    closes the socket, and a crash closes it. Either makes it readable. (A
    notice or parameter report would too; such a connection is dropped as
    well, which costs one reconnect.)
    """
    try:
        if dbapi_connection.closed:
            return True
        fd = dbapi_connection.fileno()
    except Exception:  # the driver no longer has a socket for it
        return True
    poller = poll()  # not select(): a web process with many sockets has descriptors past 1024
    poller.register(fd, POLLIN | POLLPRI)
    return bool(poller.poll(0))


def _drop_if_hung_up(dbapi_connection, connection_record, connection_proxy) -> None:
    """On checkout from the pool: a connection the server has ended is replaced by a fresh one.

    SQLAlchemy's ``pool_pre_ping`` does this with a round trip to the server on
    every checkout, which cost about 0.3 ms of each chat message's way to its
    first token, in the web and again in the worker. Raising DisconnectionError
    here makes the pool open a new connection instead (SQLAlchemy's documented
    pessimistic disconnect handling through the ``checkout`` event).
    """
    if hung_up(dbapi_connection):
        raise DisconnectionError("the server has closed this pooled connection")


def _accept_statement(conversation) -> Select:
    """Insert a chat request and its user message into ``conversation`` (a CTE returning its id).

    Data-modifying CTEs beside the conversation's insert or update: all three
    rows are stored together or not at all, in one round trip; no row at all
    when the conversation is not the owner's.
    """
    msg = insert(Message).from_select(
        ["id", "conversation_id", "request_id", "role", "content", "status"],
        select(bindparam("new_message_id", type_=String), conversation.c.id, bindparam("new_request_id", type_=String),
               literal("user"), bindparam("new_content", type_=Text), literal("complete"))).cte("msg")
    return select(conversation.c.id).add_cte(_request_insert(conversation), msg)


def _request_insert(conversation) -> CTE:
    """The insert of the chat request into ``conversation`` (a CTE returning its id)."""
    return insert(ChatRequest).from_select(
        ["id", "owner", "client_id", "conversation_id", "user_message_id", "params"],
        select(bindparam("new_request_id", type_=String), bindparam("new_owner", type_=String),
               bindparam("new_client_id", type_=String), conversation.c.id, bindparam("new_message_id", type_=String),
               bindparam("new_params", type_=JSON))).cte("req")


def _new_conversation() -> CTE:
    """A new conversation's insert, as a CTE returning its id."""
    return (insert(Conversation)
            .values(id=bindparam("new_conversation_id"), owner=bindparam("new_owner"), title=bindparam("new_title"))
            .returning(Conversation.id).cte("conv"))


_ACCEPT_IN_NEW = _accept_statement(_new_conversation())
_ACCEPT_IN_EXISTING = _accept_statement(
    update(Conversation)
    .where(Conversation.id == bindparam("new_conversation_id"), Conversation.owner == bindparam("new_owner"))
    .values(updated_at=func.now()).returning(Conversation.id).cte("conv"))


def _exchange_statement() -> Select:
    """A new conversation, its messages in the order given and the request for its reply, in one statement.

    The messages are read back in order of ``created_at``: each takes the statement's time plus its place in
    microseconds, so that they keep their order and the last one (the request's) is the latest.
    """
    conv = _new_conversation()
    given = (func.unnest(bindparam("new_ids", type_=ARRAY(String)), bindparam("new_request_ids", type_=ARRAY(String)),
                         bindparam("new_roles", type_=ARRAY(String)), bindparam("new_contents", type_=ARRAY(Text)))
             .table_valued("id", "request_id", "role", "content", with_ordinality="place").render_derived("given"))
    msg = insert(Message).from_select(
        ["id", "conversation_id", "request_id", "role", "content", "status", "created_at"],
        select(given.c.id, conv.c.id, given.c.request_id, given.c.role, given.c.content, literal("complete"),
               func.statement_timestamp() + func.make_interval(0, 0, 0, 0, 0, 0, given.c.place / 1e6))
        .select_from(conv.join(given, true()))).cte("msg")
    return select(conv.c.id).add_cte(msg, _request_insert(conv))


_ACCEPT_EXCHANGE = _exchange_statement()


def _prompt_request_statement() -> Select:
    """A request's conversation up to its user message (failed replies left out), and its own reply if stored."""
    requests, asked, m = ChatRequest.__table__, Message.__table__.alias("asked"), Message.__table__.alias("m")
    is_reply = and_(m.c.request_id == requests.c.id, m.c.role == "assistant")
    return (select(requests.c.conversation_id, requests.c.params, requests.c.created_at.label("accepted_at"), m.c.id,
                   m.c.role, m.c.content, m.c.finish_reason, m.c.prompt_tokens, m.c.completion_tokens,
                   is_reply.label("is_reply"))
            .join(asked, asked.c.id == requests.c.user_message_id)
            .join(m, and_(m.c.conversation_id == requests.c.conversation_id,
                          or_(and_(m.c.created_at <= asked.c.created_at, m.c.status != "failed"), is_reply)))
            .where(requests.c.id == bindparam("request_id"))
            .order_by(m.c.created_at, m.c.role.desc()))


_PROMPT_REQUEST = _prompt_request_statement()


def _title(content: str) -> str:
    line = " ".join(content.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1] + "…"
