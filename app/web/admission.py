"""Admission before storage: what the backend cannot take now is refused at once, saying when to try again.

A chat is refused ``busy`` when the tasks waiting on the model's queue would
take the workers longer than a setting to start (at the rate they have been
taking tasks off it lately, once tasks have kept waiting for a moment), or are
more than another setting allows; and
``rate_limited`` when its caller's token bucket is empty. Either refusal comes
before anything is stored or queued, so overload costs a refusal rather than
an unbounded wait.
"""

from __future__ import annotations

import collections
import math
import threading
import time

from app.protocol import ErrorCode, ProtocolError
from app.streams import TAKEN_PREFIX

# One bucket per caller: a hash of its tokens and when they were counted.
RATE_PREFIX = "rate:"

# Refill the caller's bucket for the time since it was last counted, take one token if there is one;
# returns the seconds until one would be there (0 when one was taken). Redis' own clock, so every web
# process counts alike.
_TAKE_TOKEN = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local held = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = math.min(burst, (tonumber(held[1]) or burst) + (now - (tonumber(held[2]) or now)) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return tostring(wait)
"""


class TokenBucket:
    """Per-key token buckets in Redis: ``rate_per_minute`` tokens a minute, at most ``burst`` held."""

    def __init__(self, redis_client, prefix: str, rate_per_minute: float, burst: int):
        self.prefix = prefix
        self.rate = rate_per_minute / 60
        self.burst = burst
        self._take = redis_client.register_script(_TAKE_TOKEN)

    def take(self, key: str) -> float:
        """Take a token of ``key``'s bucket: 0 if one was there, else the seconds until one will be. A rate of 0
        means no limit."""
        if self.rate <= 0:
            return 0.0
        wait = float(self._take(keys=[self.prefix + key], args=[self.rate, self.burst]))
        return math.ceil(wait * 10) / 10 if wait > 0 else 0.0


class DrainRate:
    """How fast the workers have been taking tasks off a queue, from the counter they bump (``taken:<queue>``),
    over the last ``window_s`` seconds; None until this process has watched it for ``least_s``."""

    def __init__(self, window_s: float = 30, least_s: float = 5):
        self.window_s, self.least_s = window_s, least_s
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def observe(self, taken: int, now: float | None = None) -> float | None:
        now = time.monotonic() if now is None else now
        with self._lock:
            if not self._samples or now - self._samples[-1][0] >= 0.25:
                self._samples.append((now, taken))
            while now - self._samples[0][0] > self.window_s:  # the newest is never that old
                self._samples.popleft()
            since, first = self._samples[0]
        if now - since < self.least_s or taken < first:  # too short to tell, or the counter was reset
            return None
        return (taken - first) / (now - since)


class Backlog:
    """Whether tasks have kept waiting on the queue for at least ``least_s``: seen waiting at every look since."""

    def __init__(self, least_s: float = 1.0):
        self.least_s = least_s
        self._since: float | None = None
        self._lock = threading.Lock()

    def observe(self, waiting: int, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        with self._lock:
            if not waiting:
                self._since = None
                return False
            if self._since is None:
                self._since = now
            return now - self._since >= self.least_s


class Admission:
    """Decides, before a chat is stored, whether the backend takes it now."""

    def __init__(self, redis_client, queue, max_queue_depth: int, busy_retry_after_s: float,
                 rate_per_minute: float, rate_burst: int, max_queue_wait_s: float = 0):
        self.redis = redis_client
        self.queue = queue
        self.max_queue_depth = max_queue_depth
        self.max_queue_wait_s = max_queue_wait_s
        self.busy_retry_after_s = busy_retry_after_s
        self.buckets = TokenBucket(redis_client, RATE_PREFIX, rate_per_minute, rate_burst)
        self.drain = DrainRate()
        self.backlog = Backlog()

    def expected_wait_s(self) -> tuple[int, float | None]:
        """Tasks waiting on the queue, and how long the last of them would wait to be taken at the rate the
        workers have lately been taking them (None while that rate is unknown, or nil: workers starting)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.llen(self.queue.queue)
        pipe.get(TAKEN_PREFIX + self.queue.queue)
        waiting, taken = pipe.execute()
        rate = self.drain.observe(int(taken or 0))
        return int(waiting), (waiting / rate if rate else None)

    def admit(self, caller: str) -> None:
        """Return if ``caller`` may send a chat now; else raise ``busy`` or ``rate_limited`` with ``retry_after``."""
        waiting, wait_s = self.expected_wait_s()
        if waiting >= self.max_queue_depth:
            raise ProtocolError(ErrorCode.BUSY, f"the model's queue is full ({waiting} waiting); try again later",
                                retry_after=self.busy_retry_after_s)
        # The rate is what the workers took lately, which is what was asked of them while they had room: a
        # burst after a quieter spell would seem to wait long. So only a queue that has kept tasks waiting for
        # a moment (workers that really are behind) refuses on the expected wait.
        behind = self.backlog.observe(waiting)
        if self.max_queue_wait_s and wait_s is not None and wait_s > self.max_queue_wait_s and behind:
            raise ProtocolError(ErrorCode.BUSY, f"the model's workers are busy ({waiting} waiting, about "
                                f"{wait_s:.0f} s); try again later", retry_after=self.busy_retry_after_s)
        wait = self.buckets.take(caller)
        if wait > 0:
            raise ProtocolError(ErrorCode.RATE_LIMITED, "too many messages; try again later", retry_after=wait)


class SocketSlots:
    """The WebSockets one web process holds, up to a limit: a handshake past it is refused at once."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        with self._lock:
            if self.held >= self.limit:
                return False
            self.held += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.held -= 1
