"""A worker's hold on the broker messages of the tasks it runs, kept fresh so that a dead worker's come back in seconds.

A task is acknowledged only once its reply is stored (``acks_late``); until
then kombu's Redis transport keeps its message in the ``unacked`` hash, with
the time it was taken in the ``unacked_index`` sorted set. Every consumer
hands back to the queue, marked ``redelivered``, the messages whose time there
is older than the visibility timeout (``restore_visible``, every few seconds:
config/celery.py). A worker that lives renews that time for each message it
holds, every fraction of the timeout, so a task however long is never handed
back while its worker runs it; one that dies (SIGKILL, out of memory, a lost
machine) stops renewing, and its tasks go back within about one timeout, to
another worker or to itself restarted, which goes on after the tokens already
streamed (workers/handler.py).
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from kombu.transport.redis import Channel

logger = logging.getLogger(__name__)


class Leases:
    """Renews the ``unacked_index`` time of the messages this worker holds, every ``every_s`` seconds."""

    def __init__(self, client: redis.Redis, every_s: float, index_key: str = Channel.unacked_index_key):
        self.client = client
        self.every_s = every_s
        self.index_key = index_key
        self._held: dict[str, str] = {}  # task id -> delivery tag
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leases", daemon=True)

    def start(self) -> Leases:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def hold(self, task_id: str, delivery_tag: str) -> None:
        with self._lock:
            self._held[task_id] = delivery_tag

    def release(self, task_id: str) -> None:
        with self._lock:
            self._held.pop(task_id, None)

    def held(self) -> dict[str, str]:
        with self._lock:
            return dict(self._held)

    def renew(self) -> None:
        """Mark every held message as taken now; one that kombu has dropped already (acknowledged) stays out."""
        tags = list(self.held().values())
        if tags:
            self.client.zadd(self.index_key, {tag: time.time() for tag in tags}, xx=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.renew()
            except redis.RedisError as exc:  # the broker away for a moment: renew next time
                logger.warning("Renewing %d task leases failed: %s", len(self._held), exc)
