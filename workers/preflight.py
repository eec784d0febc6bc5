"""Before a host joins: does it have the model, and do the broker and the database take it? Each problem is one
line (passwords hidden), said within ``CHAT_JOIN_TIMEOUT_S``; the launcher then exits with ``EX_CONFIG``, which
neither it nor ``make run`` restarts: a wrong setting does not get better by retrying for ever."""

from __future__ import annotations

import time
from urllib.parse import urlsplit, urlunsplit

import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from config.settings import Settings, declared_model_name, model_is_path

EX_CONFIG = 78  # sysexits.h: a configuration error


def masked(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    if url.startswith("postgresql"):
        try:
            return make_url(url).render_as_string(hide_password=True)
        except Exception:
            return "<a database URL that cannot be read>"
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def model_problem(settings: Settings) -> str | None:
    path = settings.model_dir
    if path.is_dir():
        if not (path / "config.json").is_file():
            return f"no model at {path}: the folder has no config.json"
        declared = declared_model_name(str(path))
        if not model_is_path(settings.model) and declared and declared != settings.model:
            # Web hosts queue for the name they are given: a worker serving another would never be asked.
            return (f"the model folder {path} declares the name {declared!r}, not {settings.model!r}: set "
                    f"CHAT_MODEL={declared} on every host")
        return None
    model = settings.model
    if not model_is_path(model) or path.is_absolute() or path.exists():
        return (f"no model at {path}: fetch it with `python -m workers.fetch_model --dest {path}`, "
                f"or set CHAT_MODELS_DIR to the folder that holds {path.name}")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        return None
    return f"no model {model!r}: not a folder, and not in this host's model cache (nothing is downloaded at start)"


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0]


def broker_problem(url: str, deadline: float) -> str | None:
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None  # another transport: Celery says what it thinks of it
    while True:
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
        try:
            client.ping()
            return None
        except (redis.AuthenticationError, redis.ResponseError) as exc:
            return f"the broker at {masked(url)} refused this host: {_first_line(exc)}"
        except redis.RedisError as exc:
            if time.monotonic() >= deadline:
                return f"cannot reach the broker at {masked(url)}: {_first_line(exc)}"
            time.sleep(1)
        finally:
            client.close()


def database_problem(url: str, deadline: float) -> str | None:
    engine = create_engine(url, connect_args={"connect_timeout": 3}, poolclass=NullPool, hide_parameters=True)
    try:
        while True:
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
                return None
            except OperationalError as exc:
                why = _first_line(exc)
                # A server that answers and refuses (password, role, database) will not change its mind.
                refused = any(w in why for w in ("password", "does not exist", "no pg_hba.conf", "authentication"))
                if refused or time.monotonic() >= deadline:
                    return f"{'the database at' if refused else 'cannot reach the database at'} {masked(url)}" \
                           f"{' refused this host' if refused else ''}: {why}"
                time.sleep(1)
            except SQLAlchemyError as exc:
                return f"the database URL {masked(url)} does not work: {_first_line(exc)}"
    finally:
        engine.dispose()


def problems(settings: Settings) -> list[str]:
    """What stops this host from joining, one line each; empty when it can."""
    deadline = time.monotonic() + settings.join_timeout_s
    found = [model_problem(settings), broker_problem(settings.resolved_broker_url, deadline)]
    try:
        found.append(database_problem(settings.resolved_database_url, deadline))
    except Exception as exc:  # a URL SQLAlchemy cannot even parse
        found.append(f"the database URL {masked(settings.resolved_database_url)} does not work: {_first_line(exc)}")
    return [p for p in found if p]
