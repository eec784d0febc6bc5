"""Session fixtures that start the real stack once: Redis, a PostgreSQL primary and
replica, a Celery worker with the real model, gunicorn and Flower, on free loopback
ports in a temporary folder. Each test talks as a fresh guest."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import psutil
import psycopg
import pytest
import requests
import websocket

import workers  # noqa: F401  (first: it chooses MKL's reproducible rounding before any test's product)
from config.settings import DEFAULT_MODEL_DIR, Settings
from scripts.services import (
    PostgresPair,
    Process,
    free_port,
    migrate,
    scratch_folder,
    start_flower,
    start_redis,
    start_web,
    start_worker,
)


def pytest_report_header(config) -> list[str]:
    """Which kind of machine this is: the engine's dtype, kernels and rounding depend on its CPU."""
    import torch

    from workers.cpu import describe
    from workers.model import pick_dtype

    setting = Settings().dtype
    dtype, why = pick_dtype(setting, torch.device("cpu"))
    return [describe(), f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
                        f"{torch.get_num_threads()} threads; engine dtype (CHAT_DTYPE={setting}): "
                        f"{str(dtype).removeprefix('torch.')} ({why})"]


@dataclass
class Stack:
    settings: Settings
    root: Path
    pg: PostgresPair
    redis: Process
    worker: Process | None
    web: Process
    flower: Process

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.web_port}"

    def primary(self) -> psycopg.Connection:
        return self.pg.connect(self.pg.primary_port, autocommit=True)

    def replica(self) -> psycopg.Connection:
        return self.pg.connect(self.pg.replica_port, autocommit=True)

    def count(self, table: str) -> int:
        with self.primary() as conn:
            return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def make_settings(root: Path, **overrides) -> Settings:
    values = dict(data_dir=root, redis_port=free_port(), primary_port=free_port(), replica_port=free_port(),
                  web_port=free_port(), flower_port=free_port(), model=str(DEFAULT_MODEL_DIR),
                  default_max_new_tokens=16, max_new_tokens_cap=48, max_content_chars=2000,
                  max_frame_bytes=8192, web_pool_size=16, secret_key="test-secret", worker_heartbeat_s=1,
                  flower_basic_auth="flower:test-pass", worker_metrics_port=free_port(),
                  # Clients sign in as guests (tests/integration/test_auth.py tests site tokens and the limits).
                  guests=True, guest_rate_per_minute=0, jwt_secret=SITE_SECRET, jwt_issuers=[SITE_ISSUER],
                  max_batch=4, engine_max_tokens=1024,
                  # Many chats come from one caller here; tests/integration/test_admission.py tests the limit.
                  rate_limit_per_minute=0)
    values.update(overrides)
    return Settings(**values)


@contextmanager
def running_stack(root: Path, settings: Settings, worker: bool = True):
    """Redis, the PostgreSQL pair (migrated), a worker (unless ``worker`` is False: hosts of their own join it),
    gunicorn and Flower, with the data in ``root``; stopped after."""
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    started: list[Process] = []
    pg = PostgresPair(root / "pg", settings.primary_port, settings.replica_port, durable=False,
                      bind=settings.resolved_bind, password=settings.db_password)
    try:
        started.append(start_redis(settings.redis_port, root / "redis", logs, settings.resolved_bind,
                                   settings.redis_password))
        pg.start()
        migrate(settings.resolved_database_url)
        started.append(start_worker(settings, "cpu0@%h", logs) if worker else None)
        started.append(start_web(settings, logs))
        started.append(start_flower(settings, logs))
        yield Stack(settings, root, pg, *started)
    except BaseException:
        for proc in filter(None, started):
            print(f"--- {proc.name} log ---\n{proc.tail()}")
        raise
    finally:
        for proc in reversed(started):
            if proc is not None:
                proc.stop()
        pg.stop()


@pytest.fixture(scope="session")
def stack():
    with scratch_folder("chat-test-") as root, running_stack(root, make_settings(root)) as started:
        yield started


# The embedding site of the tests: it signs its users' tokens with this shared secret.
SITE_SECRET = "test-site-secret-of-at-least-32-bytes"
SITE_ISSUER = "https://site.test"


def site_token(sub: str, ttl_s: float = 600, secret: str = SITE_SECRET, issuer: str = SITE_ISSUER, **claims) -> str:
    return jwt.encode({"iss": issuer, "sub": sub, "exp": int(time.time() + ttl_s), **claims}, secret,
                      algorithm="HS256")


def guest_token(base_url: str) -> str:
    res = requests.post(base_url + "/api/guest", headers={"Origin": base_url}, timeout=10)
    res.raise_for_status()
    return res.json()["token"]


@contextmanager
def one_page_server(body: bytes, content_type: str, port: int = 0):
    """A server on loopback that answers every GET with ``body`` (a site's page, its published keys): its port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_port
    finally:
        server.shutdown()


@contextmanager
def second_web(stack, **overrides):
    """A second web server on the session's Redis, databases and worker, with other settings: its URL and its
    serving process' pid (gunicorn's worker, under its arbiter)."""
    settings = stack.settings.model_copy(update={"web_port": free_port(), **overrides})
    web = start_web(settings, stack.root / "logs")
    try:
        yield f"http://127.0.0.1:{settings.web_port}", psutil.Process(web.pid).children()[0].pid
    finally:
        web.stop()


class Client:
    """One caller: a guest (or the holder of ``token``), with an HTTP session and WebSockets that carry its
    token."""

    def __init__(self, base_url: str, token: str | None = None):
        self.base_url = base_url
        self.token = token or guest_token(base_url)
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {self.token}"
        self.sockets: list[websocket.WebSocket] = []
        self.ws = self.connect()

    def connect(self) -> websocket.WebSocket:
        ws = websocket.create_connection(f"{self.base_url.replace('http', 'ws', 1)}/ws?token={self.token}",
                                         timeout=60)
        self.sockets.append(ws)
        return ws

    def send(self, frame: dict | str, ws=None) -> None:
        (ws or self.ws).send(frame if isinstance(frame, str) else json.dumps(frame))

    def recv(self, ws=None, timeout: float = 120) -> dict:
        """The next text frame; TimeoutError after ``timeout`` s even while the server's pings keep coming
        (a plain ``recv()`` answers them and reads on, so its socket timeout never fires)."""
        ws = ws or self.ws
        deadline = time.monotonic() + timeout
        while True:
            opcode, frame = ws.recv_data_frame(True)
            if opcode == websocket.ABNF.OPCODE_TEXT:
                return json.loads(frame.data)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                raise websocket.WebSocketConnectionClosedException("closed by the server")
            if time.monotonic() > deadline:
                raise TimeoutError("no frame from the server")

    def ask(self, frame: dict | str, ws=None) -> dict:
        self.send(frame, ws)
        return self.recv(ws)

    def chat(self, content: str, ws=None, **fields) -> tuple[dict, list[dict], dict]:
        """Send a chat frame; return its `accepted`, `token` frames and `done`."""
        accepted = self.ask({"type": "chat", "content": content, **fields}, ws)
        assert accepted["type"] == "accepted", accepted
        tokens, done = self.until_done(accepted["request_id"], ws)
        return accepted, tokens, done

    def until_done(self, request_id: str, ws=None) -> tuple[list[dict], dict]:
        tokens = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            frame = self.recv(ws)
            assert frame.get("request_id") == request_id, frame
            if frame["type"] == "done":
                return tokens, frame
            assert frame["type"] == "token", frame
            tokens.append(frame)
        raise TimeoutError(request_id)

    def messages(self, conversation_id: str) -> requests.Response:
        return self.http.get(f"{self.base_url}/api/conversations/{conversation_id}/messages", timeout=10)

    def close(self) -> None:
        for ws in self.sockets:
            ws.close()


@pytest.fixture
def client(stack):
    c = Client(stack.base_url)
    yield c
    c.close()


@pytest.fixture
def other_client(stack):
    c = Client(stack.base_url)
    yield c
    c.close()
