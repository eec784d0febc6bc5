"""Admission before storage: what the backend cannot take now is refused at once, saying when to try again.

A chat is refused ``busy`` while the model's queue holds more waiting tasks
than a setting allows, and ``rate_limited`` when its caller's token bucket is
empty. Either refusal comes before anything is stored or queued, so overload
costs a refusal rather than an unbounded wait.
"""

from __future__ import annotations

import math

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


class Admission:
    """Decides, before a chat is stored, whether the backend takes it now."""

    def __init__(self, redis_client, queue, max_queue_depth: int, busy_retry_after_s: float,
                 rate_per_minute: float, rate_burst: int):
        self.queue = queue
        self.max_queue_depth = max_queue_depth
        self.busy_retry_after_s = busy_retry_after_s
        self.rate = rate_per_minute / 60
        self.burst = rate_burst
        self._take = redis_client.register_script(_TAKE_TOKEN)

    def admit(self, caller: str) -> None:
        """Return if ``caller`` may send a chat now; else raise ``busy`` or ``rate_limited`` with ``retry_after``."""
        waiting = self.queue.depth()
        if waiting >= self.max_queue_depth:
            raise ProtocolError(ErrorCode.BUSY, f"the model's queue is full ({waiting} waiting); try again later",
                                retry_after=self.busy_retry_after_s)
        if self.rate <= 0:
            return
        wait = float(self._take(keys=[RATE_PREFIX + caller], args=[self.rate, self.burst]))
        if wait > 0:
            raise ProtocolError(ErrorCode.RATE_LIMITED, "too many messages; try again later",
                                retry_after=math.ceil(wait * 10) / 10)
