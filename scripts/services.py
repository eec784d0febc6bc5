"""Start and stop the real servers on loopback: Redis, a PostgreSQL primary with a
streaming replica, Celery workers, gunicorn and Flower.

Used by ``make run`` (scripts/run.py) and by the integration tests. Every
process is started by us, in a session of its own, and stopped by its pid.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import redis
from psycopg import sql

from app import streams
from config.settings import ROOT, Settings, listen_addresses
from workers.launch import WorkerSpec, worker_argv

logger = logging.getLogger(__name__)


@contextmanager
def scratch_folder(prefix: str) -> Iterator[Path]:
    """A temporary folder the postgres user can reach (not under a closed home or pytest's tmp), removed after."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(root, 0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process build the same ``Settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        env["CHAT_" + name.upper()] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    env["PYTHONPATH"] = str(ROOT)
    return env


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s")


class Process:
    """One child process in its own session, with its output in a log file or on our terminal."""

    def __init__(self, name: str, argv: list[str], env: dict | None = None, log_dir: Path | None = None,
                 cwd: Path = ROOT, stop_timeout: float = 20, stdin_text: str | None = None):
        self.name = name
        self.stop_timeout = stop_timeout  # how long :meth:`stop` waits after its signal before SIGKILL
        self.log_path = log_dir / f"{name}.log" if log_dir else None
        # Readable by its owner only: logs name requests and callers' ids.
        out = open(os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") \
            if self.log_path else None
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT if out else None,
                                     stdin=subprocess.DEVNULL if stdin_text is None else subprocess.PIPE,
                                     start_new_session=True)
        if stdin_text is not None:
            self.proc.stdin.write(stdin_text.encode())
            self.proc.stdin.close()
        if out:
            out.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float | None = None, sig: int = signal.SIGTERM) -> None:
        if not self.alive():
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout or self.stop_timeout)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop in %.0fs; killing it", self.name, timeout)
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        except ProcessLookupError:
            pass

    def tail(self, lines: int = 40) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


# --- Redis -------------------------------------------------------------------

def start_redis(port: int, data_dir: Path, log_dir: Path | None, bind: str = "127.0.0.1",
                password: str = "") -> Process:
    """Redis with its append-only file; a password is required where one is given (from any address)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    argv = [server, "--port", str(port), "--bind", *listen_addresses(bind), "--dir", str(data_dir),
            "--daemonize", "no", "--save", "", "--appendonly", "yes"]
    if password:  # read from a config file on stdin, not the command line that any user's `ps` shows
        argv.insert(1, "-")
    proc = Process("redis", argv, log_dir=log_dir, stdin_text=f"requirepass {password}\n" if password else None)

    def ping() -> bool:
        client = redis.Redis(host="127.0.0.1", port=port, password=password or None, socket_connect_timeout=0.5)
        try:
            return client.ping()
        finally:
            client.close()

    wait_until(ping, 15, "redis", proc.proc)
    return proc


# --- PostgreSQL --------------------------------------------------------------

def pg_bin() -> Path:
    """The newest installed PostgreSQL's bin folder."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    if found:
        return Path(found[-1])
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin)")


class SetupError(RuntimeError):
    """The machine needs a change before the stack can start; the message says which, and how."""


def _as_postgres(argv: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root.
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def _pg_run(argv: list[str], env: dict | None = None) -> None:
    result = subprocess.run(_as_postgres(argv), capture_output=True, text=True, cwd="/",
                            start_new_session=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} failed ({result.returncode}): {result.stderr.strip()}")


class PostgresPair:
    """A primary and a streaming replica made with ``pg_basebackup -R``.

    They listen on loopback and ``bind``. Without a password they take connections from loopback only; with one,
    from any address (the replica's too), each with its role's password (SCRAM; ``chat``'s is the one given)."""

    def __init__(self, root: Path, primary_port: int, replica_port: int, durable: bool = True,
                 bind: str = "127.0.0.1", password: str = ""):
        if not password and listen_addresses(bind) != ["127.0.0.1"]:
            raise SetupError(f"PostgreSQL would listen on {bind} without a password: set CHAT_DB_PASSWORD")
        self.root = root
        self.bind = bind
        self.password = password
        self.primary_dir = root / "primary"
        self.replica_dir = root / "replica"
        self.primary_port = primary_port
        self.replica_port = replica_port
        self.durable = durable
        self.bin = pg_bin()

    def connect(self, port: int, dbname: str = "chat", **kw) -> psycopg.Connection:
        """A connection to the server on ``port`` over loopback, as clients make them."""
        return psycopg.connect(host="127.0.0.1", port=port, user="chat", dbname=dbname,
                               password=self.password or None, **kw)

    def check_reachable(self) -> None:
        """Started as root, PostgreSQL runs as the ``postgres`` user, who must be able to walk into the data
        folder: say how to make that so where some folder above it is closed to other users."""
        if os.geteuid() != 0:
            return
        closed = [p for p in reversed(self.root.resolve().parents) if p.exists() and not p.stat().st_mode & 0o001]
        if closed:
            raise SetupError(
                f"PostgreSQL runs as the postgres user, who cannot reach its data folder {self.root}: "
                f"{closed[0]} is closed to other users (mode {oct(closed[0].stat().st_mode & 0o777)}). Either let "
                f"that user through with `chmod o+x {' '.join(map(str, closed))}`, or keep the data in a folder it "
                f"can reach, for example `CHAT_DATA_DIR=/var/lib/chatqueue make run`.")

    def _prepare_root(self) -> None:
        self.check_reachable()
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")

    def _conf(self, port: int) -> str:
        lines = [f"port = {port}", f"listen_addresses = '{', '.join(listen_addresses(self.bind))}'",
                 f"unix_socket_directories = '{self.root}'", "unix_socket_permissions = 0700",
                 "password_encryption = 'scram-sha-256'",
                 "wal_level = replica", "max_wal_senders = 10", "hot_standby = on", "wal_keep_size = 256MB",
                 # No message text, nor who sent it, in the server's log: no statements or their values, and
                 # errors without the DETAIL line that repeats a row's values (a unique key's owner).
                 "log_statement = 'none'", "log_min_duration_statement = -1", "log_error_verbosity = terse",
                 "log_parameter_max_length = 0", "log_parameter_max_length_on_error = 0"]
        if not self.durable:
            lines += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        return "\n# chat backend\n" + "\n".join(lines) + "\n"

    def _ctl(self, data: Path, action: str) -> None:
        argv = [str(self.bin / "pg_ctl"), "-D", str(data), "-w", "-t", "60"]
        if action == "start":
            argv += ["-l", str(self.root / f"{data.name}.log"), "start"]
        else:
            argv += ["-m", "fast", "stop"]
        _pg_run(argv)

    def _running(self, data: Path) -> bool:
        result = subprocess.run(_as_postgres([str(self.bin / "pg_ctl"), "-D", str(data), "status"]),
                                capture_output=True, cwd="/")
        return result.returncode == 0

    def _hba(self, data: Path) -> None:
        """Who may connect, written afresh at each start: it follows the password setting."""
        if self.password:
            lines = ["host all all all scram-sha-256", "host replication all all scram-sha-256"]
        else:
            lines = [f"host {db} all {net} trust" for db in ("all", "replication") for net in ("127.0.0.1/32",
                                                                                                 "::1/128")]
        # The socket (in a folder only the server's user may use) is how a password is set in the first place.
        (data / "pg_hba.conf").write_text("\n".join(["local all all trust", "local replication all trust",
                                                     *lines]) + "\n")

    def _conninfo(self) -> None:
        """The replica's connection to the primary, with the password where there is one."""
        auto = self.replica_dir / "postgresql.auto.conf"
        if not (self.replica_dir / "standby.signal").exists() or not auto.exists():
            return  # promoted: it follows no one
        conninfo = f"user=chat host=127.0.0.1 port={self.primary_port}"
        if self.password:
            conninfo += " password='{}'".format(self.password.replace("\\", "\\\\").replace("'", "\\'"))
        kept = [line for line in auto.read_text().splitlines() if not line.startswith("primary_conninfo")]
        line = "primary_conninfo = '{}'".format(conninfo.replace("\\", "\\\\").replace("'", "''"))
        auto.write_text("\n".join([*kept, line]) + "\n")

    def _set_password(self) -> None:
        with psycopg.connect(host=str(self.root), port=self.primary_port, user="chat", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER ROLE chat PASSWORD {}").format(sql.Literal(self.password or None)))

    def start(self) -> None:
        self._prepare_root()
        if not (self.primary_dir / "PG_VERSION").exists():
            shutil.rmtree(self.replica_dir, ignore_errors=True)
            _pg_run([str(self.bin / "initdb"), "-D", str(self.primary_dir), "-U", "chat", "--auth=trust",
                     "-E", "UTF8", "--no-sync"])
            with open(self.primary_dir / "postgresql.conf", "a") as f:
                f.write(self._conf(self.primary_port))
        self._as_owner(self._hba, self.primary_dir)
        if not self._running(self.primary_dir):
            self._ctl(self.primary_dir, "start")
        self._set_password()
        with self.connect(self.primary_port, dbname="postgres", autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'chat'").fetchone():
                conn.execute("CREATE DATABASE chat")
        if not (self.replica_dir / "PG_VERSION").exists():
            _pg_run([str(self.bin / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(self.primary_port),
                     "-U", "chat", "-D", str(self.replica_dir), "-R", "-X", "stream", "--checkpoint=fast", "--no-sync"],
                    env={**os.environ, "PGPASSWORD": self.password} if self.password else None)
            # pg_basebackup copies the primary's port: the replica's own line comes last and wins.
            with open(self.replica_dir / "postgresql.conf", "a") as f:
                f.write(self._conf(self.replica_port))
        self._as_owner(self._hba, self.replica_dir)
        self._as_owner(lambda _: self._conninfo(), self.replica_dir)
        if not self._running(self.replica_dir):
            self._ctl(self.replica_dir, "start")
        wait_until(self._replica_streaming, 30, "replica streaming")

    @staticmethod
    def _as_owner(write, data: Path) -> None:
        """``write(data)``, leaving what it wrote owned by the server's user, as the rest of the folder is."""
        write(data)
        if os.geteuid() == 0:
            for name in ("pg_hba.conf", "postgresql.auto.conf"):
                if (data / name).exists():
                    shutil.chown(data / name, "postgres", "postgres")

    def pid(self, which: str) -> int:
        """The process id of the ``primary``'s or the ``replica``'s postmaster."""
        data = self.primary_dir if which == "primary" else self.replica_dir
        return int((data / "postmaster.pid").read_text().split()[0])

    def promote(self) -> None:
        """Make the replica a primary (``pg_ctl promote``), as an operator or a failover manager would."""
        _pg_run([str(self.bin / "pg_ctl"), "-D", str(self.replica_dir), "-w", "-t", "60", "promote"])

    def _replica_streaming(self) -> bool:
        with self.connect(self.replica_port, connect_timeout=2) as conn:
            return conn.execute("SELECT pg_is_in_recovery() AND status = 'streaming' "
                                "FROM pg_stat_wal_receiver").fetchone() == (True,)

    def stop(self) -> None:
        for data in (self.replica_dir, self.primary_dir):
            if (data / "PG_VERSION").exists() and self._running(data):
                try:
                    self._ctl(data, "stop")
                except RuntimeError as exc:
                    logger.warning("%s", exc)

    def wait_replayed(self, timeout: float = 10) -> None:
        """Wait until the replica has replayed everything the primary has written."""
        with self.connect(self.primary_port, autocommit=True) as conn:
            lsn = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
            # With synchronous_commit off, and for WAL written outside any commit (page
            # pruning during a read, say), records can wait in the primary's buffers
            # until more WAL comes. A synchronous commit flushes everything up to it.
            conn.execute("SET synchronous_commit = on")
            with conn.transaction():
                conn.execute("SELECT pg_current_xact_id()")

        def replayed() -> bool:
            with self.connect(self.replica_port) as conn:
                return conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()[0]

        wait_until(replayed, timeout, "replica replay")


def migrate(database_url: str) -> None:
    """``alembic upgrade head`` on the primary."""
    subprocess.run([sys.executable, "-m", "alembic", "-c", str(ROOT / "migrations" / "alembic.ini"),
                    "upgrade", "head"], check=True, cwd=ROOT,
                   env={**os.environ, "CHAT_DATABASE_URL": database_url, "PYTHONPATH": str(ROOT)})


# --- Celery, gunicorn, Flower --------------------------------------------------

def _wait_for_heartbeats(settings: Settings, proc: Process, ready, timeout: float) -> None:
    """Wait until ``ready(heartbeats)``: a worker's heartbeat appears once its model has loaded."""
    client = streams.connect(settings.resolved_redis_url, max_connections=2)
    try:
        wait_until(lambda: ready(streams.live_workers(client)), timeout, proc.name, proc.proc)
    finally:
        client.close()


def start_worker(settings: Settings, name: str, log_dir: Path | None) -> Process:
    """One Celery worker process on the model's queue; ready once its model is loaded."""
    proc = Process(name.split("@")[0], worker_argv(WorkerSpec(name, {}), settings), env=settings_env(settings),
                   log_dir=log_dir, stop_timeout=settings.worker_drain_s + 30)
    _wait_for_heartbeats(settings, proc, lambda beats: any(b.get("pid") == proc.pid for b in beats), 180)
    return proc


def start_launcher(settings: Settings, log_dir: Path | None, expected: int) -> Process:
    """``python -m workers.launch``; ready once ``expected`` workers have loaded the model."""
    started = time.time()
    # Stopped, the launcher lets its workers drain (CHAT_WORKER_DRAIN_S) before it goes.
    proc = Process("workers", [sys.executable, "-m", "workers.launch"], env=settings_env(settings), log_dir=log_dir,
                   stop_timeout=settings.worker_drain_s + 40)
    _wait_for_heartbeats(settings, proc, lambda beats: sum(
        1 for b in beats if b.get("since", 0) >= started and b.get("queue") == settings.queue) >= expected, 240)
    return proc


def start_web(settings: Settings, log_dir: Path | None) -> Process:
    argv = [sys.executable, "-m", "gunicorn", "--config", str(ROOT / "config" / "gunicorn.py"), "app.web:create_app()"]
    proc = Process("web", argv, env=settings_env(settings), log_dir=log_dir)
    url = f"http://{settings.host}:{settings.web_port}/healthz"
    wait_until(lambda: urllib.request.urlopen(url, timeout=1).status == 200, 60, "web", proc.proc)
    return proc


def start_flower(settings: Settings, log_dir: Path | None) -> Process:
    """Flower behind basic auth (``CHAT_FLOWER_BASIC_AUTH``): its pages and API show every task."""
    if ":" not in settings.flower_basic_auth:
        raise SetupError("CHAT_FLOWER_BASIC_AUTH must be user:password: Flower is not started without it")
    # The password in the environment, not on the command line, where any user's `ps` shows it.
    env = {**settings_env(settings), "FLOWER_BASIC_AUTH": settings.flower_basic_auth}
    argv = [sys.executable, "-m", "celery", "--broker", settings.resolved_broker_url, "flower",
            f"--address={settings.resolved_bind}", f"--port={settings.flower_port}"]
    proc = Process("flower", argv, env=env, log_dir=log_dir)
    url = f"http://{settings.host}:{settings.flower_port}/healthcheck"
    wait_until(lambda: urllib.request.urlopen(url, timeout=1).status == 200, 60, "flower", proc.proc)
    return proc
