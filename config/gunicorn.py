"""gunicorn settings for the web tier: ``gunicorn -c config/gunicorn.py 'app.web:create_app()'``."""

import logging
import os
import resource
import shutil
import tempfile

from config.heap import freeze_heap
from config.logging import RedactFilter
from config.settings import Settings, listen_addresses

_settings = Settings()

# Headroom over the socket limit for plain HTTP (health checks, history, metrics) and refused handshakes.
HTTP_HEADROOM = 1000

bind = [f"[{a}]:{_settings.web_port}" if ":" in a else f"{a}:{_settings.web_port}"
        for a in listen_addresses(_settings.resolved_bind)]
# Each open WebSocket holds a greenlet (and simple-websocket's reader greenlet), not a thread: one process holds
# thousands. The app refuses handshakes past CHAT_MAX_SOCKETS itself (503), so gunicorn's own limit, which
# would leave connections waiting unanswered, is never the one reached.
worker_class = "gevent"
workers = _settings.web_workers
worker_connections = _settings.max_sockets + HTTP_HEADROOM
timeout = 60
graceful_timeout = 5
keepalive = 5
control_socket_disable = True
accesslog = None
# Where an access log is turned on (--access-logfile): the path without its query, which may hold ?token=.
access_log_format = '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(M)sms'
errorlog = "-"
loglevel = _settings.log_level.lower()


def _raise_open_files_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        logging.getLogger("app.web").warning(
            "The open-files limit (%d) is below what %d sockets need (%d): raise it (ulimit -n)", target,
            _settings.max_sockets, wanted)


# Every socket is a file; the default soft limit (1024) would refuse connections long before CHAT_MAX_SOCKETS.
_raise_open_files_limit(worker_connections + 256)


# Several processes: prometheus_client adds their metrics up from files in this folder (set before any of them
# imports it: the app is loaded in each worker, after this file). A folder made here goes when the server stops
# (on_exit); one the operator gave stays. Marked in the environment, which a reload of this file keeps.
_MADE = "_CHAT_MADE_METRICS_DIR"  # not a setting: no CHAT_ prefix
if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.environ[_MADE] = tempfile.mkdtemp(prefix="chat-web-metrics-")


def on_exit(server):
    """The server stopping: the metrics folder made for it goes too."""
    made = os.environ.get(_MADE)
    if made and made == os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        shutil.rmtree(made, ignore_errors=True)


def child_exit(server, worker):
    """A web process gone: its live gauges leave the sums."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def post_worker_init(worker):
    """Once the app is loaded in the serving process: gunicorn's own error lines (which name a failed request's
    URL) redacted; the pools' connections opened; long-lived objects out of full collections."""
    logging.getLogger("gunicorn.error").addFilter(RedactFilter())
    from app.web import warm_connections

    warm_connections(worker.wsgi.extensions["chat"])
    logging.getLogger("app.web").info("%d long-lived objects taken out of full garbage collections", freeze_heap())
