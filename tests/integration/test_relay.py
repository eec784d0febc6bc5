"""The worker's token relay against the stack's Redis: a pass's frames together, in order, never held long."""

from __future__ import annotations

import time
import uuid

import pytest

from app import streams
from app.protocol import done_frame, token_frame
from workers.relay import TokenRelay

pytestmark = pytest.mark.integration


def frames_within(client, request_id: str, count: int, seconds: float) -> list[dict]:
    deadline = time.monotonic() + seconds
    while True:
        frames = streams.stream_events(client, request_id)
        if len(frames) >= count or time.monotonic() > deadline:
            return frames
        time.sleep(0.02)


def test_frames_wait_for_the_end_of_the_pass_then_go_out_in_order(stack):
    client = streams.connect(stack.settings.resolved_redis_url)
    relay = TokenRelay(client, ttl_s=60, maxlen=1000, max_delay_s=30)
    rid = str(uuid.uuid4())
    relay.send(rid, token_frame(rid, 0, "The"))
    relay.send(rid, token_frame(rid, 1, " sky"))
    time.sleep(0.3)
    assert streams.stream_events(client, rid) == []  # the pass has not ended
    relay.flush()
    assert [f["text"] for f in frames_within(client, rid, 2, 5)] == ["The", " sky"]
    relay.send(rid, token_frame(rid, 2, " is"))
    relay.send(rid, done_frame(rid, None, "length", 3, 3), wait=True, timeout=5)  # a waiting frame flushes
    assert [f["type"] for f in streams.stream_events(client, rid)] == ["token", "token", "token", "done"]
    assert 0 < client.ttl(streams.stream_key(rid)) <= 60


def test_frames_nobody_flushes_still_go_out_within_the_delay(stack):
    client = streams.connect(stack.settings.resolved_redis_url)
    relay = TokenRelay(client, ttl_s=60, maxlen=1000, max_delay_s=0.2)
    rid = str(uuid.uuid4())
    relay.send(rid, token_frame(rid, 0, "Hi"))
    assert [f["text"] for f in frames_within(client, rid, 1, 5)] == ["Hi"]
