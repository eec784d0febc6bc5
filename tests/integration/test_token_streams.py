"""Token streams in Redis: the worker's relay writes a pass's frames together and in order, and the web
tier's hub follows every stream of a process with one reader."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from app import streams
from app.protocol import done_frame, token_frame
from scripts.services import free_port, start_redis
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


def collect(hub, request_id: str, after_seq: int = -1) -> tuple[list[dict], threading.Thread]:
    """Follow a stream on a thread, as a socket's follower does; the frames land in the list."""
    frames: list[dict] = []
    thread = threading.Thread(target=lambda: frames.extend(streams.follow(hub, request_id, after_seq)), daemon=True)
    thread.start()
    return frames, thread


def test_one_hub_gives_each_follower_its_own_frames_in_order(stack):
    client = streams.connect(stack.settings.resolved_redis_url)
    hub = streams.StreamHub(client, block_ms=10_000)  # a new follower must not wait for this
    relay = TokenRelay(client, ttl_s=60, maxlen=1000)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    whole, whole_thread = collect(hub, first)
    time.sleep(0.2)  # the hub is now blocked reading the first stream
    resumed, resumed_thread = collect(hub, first, after_seq=1)
    other, other_thread = collect(hub, second)
    for seq, text in enumerate(["a", "b", "c"]):
        relay.send(first, token_frame(first, seq, text))
        relay.send(second, token_frame(second, seq, text.upper()))
        relay.flush()
    relay.send(first, done_frame(first, None, "length", 3, 3))
    relay.send(second, done_frame(second, None, "length", 3, 3), wait=True, timeout=5)
    for thread in (whole_thread, resumed_thread, other_thread):
        thread.join(5)
        assert not thread.is_alive()
    assert [f.get("text", f["type"]) for f in whole] == ["a", "b", "c", "done"]
    assert [f.get("text", f["type"]) for f in resumed] == ["c", "done"]
    assert [f.get("text", f["type"]) for f in other] == ["A", "B", "C", "done"]
    assert hub._subs == {}  # followers that ended left the hub


def test_followers_get_the_error_when_redis_goes_away(tmp_path):
    port = free_port()
    server = start_redis(port, tmp_path / "redis", tmp_path)
    try:
        client = streams.connect(f"redis://127.0.0.1:{port}/0")
        hub = streams.StreamHub(client)
        rid = str(uuid.uuid4())
        frames = streams.follow(hub, rid)
        client.xadd(streams.stream_key(rid), {"frame": '{"type": "token", "seq": 0, "text": "x"}'})
        assert next(frames)["text"] == "x"
        server.stop()
        with pytest.raises(redis.RedisError):
            next(frames)
        with pytest.raises(redis.RedisError):  # and a new follower is told at once
            next(streams.follow(hub, rid))
    finally:
        server.stop()


def test_a_resume_after_the_stream_expired_is_answered_from_the_stored_reply(stack, client):
    accepted, tokens, done = client.chat("What is the capital of France?", max_new_tokens=16)
    r = redis.Redis(port=stack.settings.redis_port)
    try:
        r.pexpire(streams.stream_key(accepted["request_id"]), 1)  # its TTL runs out
        time.sleep(0.05)
        assert not r.exists(streams.stream_key(accepted["request_id"]))
    finally:
        r.close()
    again = client.ask({"type": "resume", "request_id": accepted["request_id"], "after_seq": 1})
    assert again["type"] == "done" and again["message_id"] == done["message_id"], again
    assert again["finish_reason"] == done["finish_reason"]
    # The stored reply has its token counts; what the worker took from kept keys and values is live only.
    assert again["usage"] == {k: done["usage"][k] for k in ("prompt_tokens", "completion_tokens")}
    assert again["content"] == "".join(t["text"] for t in tokens)
    assert client.ask({"type": "ping"}) == {"type": "pong"}


def test_live_workers_are_read_from_the_index_however_many_keys_redis_holds(tmp_path):
    port = free_port()
    server = start_redis(port, tmp_path / "redis", tmp_path)
    try:
        client = streams.connect(f"redis://127.0.0.1:{port}/0")
        # What an hour of traffic leaves: a stream and an affinity key per request.
        pipe = client.pipeline(transaction=False)
        for i in range(20_000):
            pipe.set(f"{streams.STREAM_PREFIX}old-{i}", "x", ex=3600).set(f"{streams.AFFINITY_PREFIX}c-{i}", "w")
        pipe.execute()
        streams.beat(client, "w1@host", {"name": "w1@host", "queue": "chat"}, ttl_s=30)
        streams.beat(client, "w2@host", {"name": "w2@host", "queue": "other"}, ttl_s=30)
        streams.beat(client, "gone@host", {"name": "gone@host", "queue": "chat"}, ttl_s=1)
        time.sleep(1.5)  # its heartbeat expires; its name stays in the index until much later
        client.config_resetstat()
        assert [b["name"] for b in streams.live_workers(client, "chat")] == ["w1@host"]
        assert sorted(b["name"] for b in streams.live_workers(client)) == ["w1@host", "w2@host"]
        calls = {name.removeprefix("cmdstat_"): stat["calls"] for name, stat in client.info("commandstats").items()}
        assert "scan" not in calls and "keys" not in calls
        assert calls["zrange"] + calls["mget"] == 4  # two round trips a call, not one per hundred keys
        # A name not seen for a day leaves the index at the next beat of any worker.
        client.zadd(streams.WORKERS_KEY, {"ancient@host": time.time() - streams.WORKERS_FORGET_S - 60})
        streams.beat(client, "w1@host", {"name": "w1@host", "queue": "chat"}, ttl_s=30)
        assert "ancient@host" not in client.zrange(streams.WORKERS_KEY, 0, -1)
        assert "gone@host" in client.zrange(streams.WORKERS_KEY, 0, -1)
    finally:
        server.stop()
