"""Admission before storage: what the backend cannot take now is refused at once, saying when to try again.

A chat is refused ``busy`` while the model's queue holds more waiting tasks
than a setting allows, and ``rate_limited`` when its caller's token bucket is
empty. Either refusal comes before anything is stored or queued, so overload
costs a refusal rather than an unbounded wait.
"""

from __future__ import annotations

import math
import threading

from app.protocol import ErrorCode, ProtocolError

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


class Admission:
    """Decides, before a chat is stored, whether the backend takes it now."""

    def __init__(self, redis_client, queue, max_queue_depth: int, busy_retry_after_s: float,
                 rate_per_minute: float, rate_burst: int):
        self.queue = queue
        self.max_queue_depth = max_queue_depth
        self.busy_retry_after_s = busy_retry_after_s
        self.buckets = TokenBucket(redis_client, RATE_PREFIX, rate_per_minute, rate_burst)

    def admit(self, caller: str) -> None:
        """Return if ``caller`` may send a chat now; else raise ``busy`` or ``rate_limited`` with ``retry_after``."""
        waiting = self.queue.depth()
        if waiting >= self.max_queue_depth:
            raise ProtocolError(ErrorCode.BUSY, f"the model's queue is full ({waiting} waiting); try again later",
                                retry_after=self.busy_retry_after_s)
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
