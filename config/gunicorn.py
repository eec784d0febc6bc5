"""gunicorn settings for the web tier: ``gunicorn -c config/gunicorn.py 'app.web:create_app()'``."""

import logging

from config.heap import freeze_heap
from config.settings import Settings

_settings = Settings()

bind = f"{_settings.host}:{_settings.web_port}"
# flask-sock needs threads: each open WebSocket holds one for its lifetime, so
# size threads for peak sockets plus plain HTTP, or HTTP requests queue behind them.
worker_class = "gthread"
workers = _settings.web_workers
threads = _settings.web_threads
timeout = 60
graceful_timeout = 5
keepalive = 5
control_socket_disable = True
accesslog = None
errorlog = "-"
loglevel = _settings.log_level.lower()


def post_worker_init(worker):
    """Once the app is loaded in the serving process: its long-lived objects out of full collections."""
    logging.getLogger("app.web").info("%d long-lived objects taken out of full garbage collections", freeze_heap())
