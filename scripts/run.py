"""``make run``: start the whole stack on loopback in the foreground; Ctrl-C stops it all.

Redis, a PostgreSQL primary and streaming replica, migrations, one Celery
worker with the model, the web server and Flower, all in the data folder. A
server that exits is started again, as an orchestrator's restart policy would.
"""

from __future__ import annotations

import json
import logging
import secrets
import signal
import sys
import time
from pathlib import Path

from app.storage import Store
from app.web.identity import owner_of
from config.logging import configure_logging
from config.settings import DEFAULT_SECRET_KEY, Settings, on_loopback
from scripts.services import PostgresPair, SetupError, migrate, start_flower, start_launcher, start_redis, start_web
from workers.launch import STABLE_AFTER_S, restart_delay, visible_gpus
from workers.preflight import EX_CONFIG

logger = logging.getLogger("run")


class Supervised:
    """A server ``make run`` keeps up: started by ``start``, started again (after a growing pause while it keeps
    dying) when it exits, as an orchestrator's restart policy would."""

    def __init__(self, name: str, start):
        self.name, self.start = name, start
        self.proc = start()
        self.started_at = time.monotonic()
        self.failures = 0  # exits in a row, each soon after its start
        self.restart_at: float | None = None
        self.failed = False  # exited with a configuration error: not restarted

    def check(self, now: float) -> None:
        if self.restart_at is None:
            if self.proc.alive() or self.failed:
                return
            if self.proc.proc.returncode == EX_CONFIG:  # it said what is wrong; restarting would not mend it
                logger.error("%s cannot start with these settings; see %s", self.name, self.proc.log_path)
                self.failed = True
                return
            # As the launcher counts its workers' failures: one that ran a while starts the count again.
            self.failures = self.failures + 1 if now - self.started_at < STABLE_AFTER_S else 1
            delay = restart_delay(self.failures)  # the launcher's policy for its workers
            logger.error("%s exited (%s); restarting it in %.0fs; see %s", self.name, self.proc.proc.returncode,
                         delay, self.proc.log_path)
            self.restart_at = now + delay
        elif now >= self.restart_at:
            self.restart_at = None
            try:
                self.proc = self.start()
                self.started_at = time.monotonic()
                logger.info("%s restarted", self.name)
            except Exception:
                logger.exception("%s did not start again", self.name)

    def stop(self) -> None:
        self.proc.stop()


# The local operator's API key belongs to this caller.
LOCAL_ISSUER, LOCAL_SUB = "urn:chatqueue:local", "operator"


def local_api_key(settings: Settings, path: Path) -> str:
    """The API key ``make run`` prints: the one kept in ``path`` (readable by its owner only) while the database
    still knows it, else a new one."""
    store = Store(settings.resolved_database_url, settings.resolved_replica_url, pool_size=1)
    try:
        if path.exists():
            kept = path.read_text().strip()
            if store.api_key_owner(kept) is not None:
                return kept
        _, key = store.create_api_key(owner_of(LOCAL_ISSUER, LOCAL_SUB), "make run")
    finally:
        store.dispose()
    path.touch(mode=0o600)
    path.write_text(key + "\n")
    return key


def reachable_settings(settings: Settings, path: Path) -> Settings:
    """Where the servers listen beyond this machine, none of them goes without a password, nor the web tier with
    the published key: the ones not set are made up once and kept in ``path`` (readable by its owner only)."""
    if on_loopback(settings.resolved_bind):
        return settings
    kept = json.loads(path.read_text()) if path.exists() else {}
    update = {}
    for name in ("redis_password", "db_password", "secret_key"):
        unset = not getattr(settings, name) or (name == "secret_key" and settings.secret_key == DEFAULT_SECRET_KEY)
        if unset:
            update[name] = kept.setdefault(name, secrets.token_urlsafe(24))
    if update:
        path.touch(mode=0o600)
        path.write_text(json.dumps(kept) + "\n")
    return settings.model_copy(update=update)


def join_settings(settings: Settings) -> str:
    """What a worker host on another machine sets to join this stack (``CHAT_HOST`` is the address it dials)."""
    return (f"CHAT_BROKER_URL={settings.resolved_broker_url} CHAT_DATABASE_URL='{settings.resolved_database_url}' "
            f"CHAT_REPLICA_URL={settings.resolved_replica_url} CHAT_MODEL={settings.model_name}")


def main() -> int:
    settings = Settings()
    if not settings.flower_basic_auth:  # Flower shows every task: never without a password
        settings = settings.model_copy(update={"flower_basic_auth": f"admin:{secrets.token_urlsafe(12)}"})
    if "guests" not in settings.model_fields_set:  # the chat page signs its visitors in as guests
        settings = settings.model_copy(update={"guests": True})
    configure_logging(settings.log_level, settings.log_json)
    data = settings.data_dir.resolve()
    logs = data / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    settings = reachable_settings(settings, data / "secrets.json")
    started: list[Supervised] = []
    pg = PostgresPair(data / "pg", settings.primary_port, settings.replica_port, bind=settings.resolved_bind,
                      password=settings.db_password)

    def stop_all(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    try:
        pg.check_reachable()  # before anything starts
        logger.info("Starting Redis on port %d", settings.redis_port)
        started.append(Supervised("Redis", lambda: start_redis(settings.redis_port, data / "redis", logs,
                                                               settings.resolved_bind, settings.redis_password)))
        logger.info("Starting PostgreSQL primary on %d and replica on %d", settings.primary_port,
                    settings.replica_port)
        pg.start()
        logger.info("Migrating the primary")
        migrate(settings.resolved_database_url)
        api_key = local_api_key(settings, data / "api-key")
        gpus = visible_gpus(settings.gpus)
        count = len(gpus) or settings.cpu_workers
        logger.info("Starting %d worker(s) on queue %s (loading %s)", count, settings.queue, settings.model_dir)
        started.append(Supervised("the workers' launcher", lambda: start_launcher(settings, logs, count)))
        logger.info("Starting the web server")
        started.append(Supervised("the web server", lambda: start_web(settings, logs)))
        started.append(Supervised("Flower", lambda: start_flower(settings, logs)))
        print(f"\n  Chat page: http://{settings.host}:{settings.web_port}/"
              f"\n  API:       http://{settings.host}:{settings.web_port}/v1 (OpenAI-compatible; model "
              f"{settings.model_id})"
              f"\n  API key:   {api_key}"
              f"\n  Flower:    http://{settings.host}:{settings.flower_port}/ (basic auth "
              f"{settings.flower_basic_auth})"
              f"\n  Logs:      {logs}/", flush=True)
        if not on_loopback(settings.resolved_bind):
            print(f"  Workers on other hosts join with:\n    {join_settings(settings)} python -m workers.launch"
                  + ("\n    (set CHAT_HOST to this machine's address that they dial)" if on_loopback(settings.host)
                     else ""), flush=True)
        print("\n  Press Ctrl-C to stop.\n", flush=True)
        while True:
            for service in started:
                service.check(time.monotonic())
            time.sleep(1)
    except KeyboardInterrupt:
        logger.info("Stopping")
        return 0
    except SetupError as exc:
        logger.error("Cannot start: %s", exc)
        return 1
    except Exception:
        logger.exception("Start-up failed")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for service in reversed(started):
            service.stop()
        pg.stop()
        logger.info("Everything stopped")


if __name__ == "__main__":
    sys.exit(main())
