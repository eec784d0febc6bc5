"""The application factory of the web tier (gunicorn: ``app.web:create_app()``)."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from app import streams
from app.storage import Store
from app.web.admission import Admission, SocketSlots, TokenBucket
from app.web.identity import Identities
from app.web.queue import QueueClient
from config.logging import configure_logging
from config.settings import DEFAULT_SECRET_KEY, Settings, on_loopback

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 2**20


@dataclass
class Services:
    """What the handlers use; built once per process and passed in, never imported."""

    settings: Settings
    store: Store
    redis: object
    queue: QueueClient
    hub: streams.StreamHub
    admission: Admission
    identities: Identities
    guest_buckets: TokenBucket
    sockets: SocketSlots


def create_app(settings: Settings | None = None) -> Flask:
    """Build the web app: settings, store, queue client, WebSocket, REST, errors."""
    from app.web.api import api
    from app.web.v1 import v1
    from app.web.errors import register_error_handlers
    from app.web.ws import allow_cross_origin, check_origin_and_identify, release_socket_slot, sock

    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_json)
    if settings.secret_key == DEFAULT_SECRET_KEY and not on_loopback(settings.resolved_bind):
        raise RuntimeError(f"CHAT_SECRET_KEY is the published default, and the web tier would listen on "
                           f"{settings.resolved_bind}: anyone could sign a guest token. Set CHAT_SECRET_KEY to a long "
                           f"random value (python -c 'import secrets; print(secrets.token_urlsafe(48))').")
    app = Flask(__name__)
    if settings.proxy_hops:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.proxy_hops, x_proto=settings.proxy_hops,
                                x_host=settings.proxy_hops)
    app.config.update(
        # HTTP bodies (the OpenAI API's whole conversations); larger ones get 413 before they are read.
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
        # Frames over the limit close the socket with 1009 (simple-websocket does it).
        SOCK_SERVER_OPTIONS={"max_message_size": settings.max_frame_bytes, "ping_interval": 25},
    )
    redis_client = streams.connect(settings.resolved_redis_url, max_connections=4 * settings.web_pool_size)
    queue = QueueClient(settings, redis_client)
    store = Store(settings.resolved_database_url, settings.resolved_replica_url,
                  pool_size=min(settings.web_pool_size, 20))
    app.extensions["chat"] = Services(
        settings=settings,
        store=store,
        redis=redis_client,
        queue=queue,
        hub=streams.StreamHub(redis_client),
        admission=Admission(redis_client, queue, settings.max_queue_depth, settings.busy_retry_after_s,
                            settings.rate_limit_per_minute, settings.rate_limit_burst, settings.max_queue_wait_s),
        identities=Identities(settings, store.api_key_owner),
        guest_buckets=TokenBucket(redis_client, "guest-rate:", settings.guest_rate_per_minute,
                                  settings.guest_rate_burst),
        sockets=SocketSlots(settings.max_sockets),
    )
    app.before_request(check_origin_and_identify)
    app.teardown_request(release_socket_slot)
    app.after_request(allow_cross_origin)
    sock.init_app(app)
    app.register_blueprint(api)
    app.register_blueprint(v1)
    register_error_handlers(app)
    logger.info("Web tier ready: queue %s, primary and replica configured", settings.queue)
    return app


def warm_connections(services: Services) -> dict[str, int]:
    """Open ``CHAT_WEB_WARM_CONNECTIONS`` connections in each pool of this process, then hand them back to it.

    Pools open connections when first needed, one at a time: the first burst
    of chats after a start would wait for a dozen PostgreSQL logins
    (SCRAM, a few milliseconds of CPU each on both sides), Redis and broker
    connections, in the one process that also answers the handshakes.
    Measured at 16 chats, the first burst's web tier and relay took 37 ms a
    request against 13 to 25 ms for the bursts after it. Each pool keeps
    what it was given, up to its own size. A pool that cannot be reached is
    left to open its connections later, as before; the count opened in each
    is returned and logged.
    """
    want = services.settings.web_warm_connections
    opened: dict[str, int] = {}
    if not want:
        return opened
    started = time.monotonic()
    for name, engine in (("primary", services.store.primary), ("replica", services.store.replica)):
        opened[name] = _hold(engine.connect, lambda conn: conn.close(),
                             min(want, engine.pool.size()), name)
    pool = services.redis.connection_pool
    opened["redis"] = _hold(pool.get_connection, pool.release, min(want, pool.max_connections), "redis")
    producers = services.queue.celery.producer_pool

    def producer():
        taken = producers.acquire(block=True)
        try:
            taken.channel  # kombu opens a producer's connection and channel when first used
        except BaseException:
            taken.release()
            raise
        return taken

    opened["broker"] = _hold(producer, lambda taken: taken.release(), min(want, producers.limit or want), "broker")
    logger.info("Connections opened ahead of the first chats in %.2fs: %s", time.monotonic() - started, opened)
    return opened


def _hold(take, give_back, count: int, name: str) -> int:
    """Take ``count`` connections at once from a pool (so that it must open them), then give them back."""
    held = []
    try:
        for _ in range(count):
            held.append(take())
    except Exception as exc:  # unreachable now: opened when first needed instead
        logger.warning("Could not open connections to %s ahead of the first chats: %s", name, exc)
    finally:
        for conn in held:
            with contextlib.suppress(Exception):
                give_back(conn)
    return len(held)
