"""A request given back to the queue, as when its worker died mid-reply, through kombu's own restore:
the worker that takes it next goes on after the tokens already streamed."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from celery import Celery

from app import streams
from app.protocol import SamplingParams, token_frame
from app.storage import Store
from config.celery import TASK_GENERATE, celery_config

pytestmark = pytest.mark.integration


def test_a_restored_request_goes_on_after_what_was_streamed(stack):
    settings = stack.settings.model_copy(update={"model_queue": f"restore-{uuid.uuid4().hex[:8]}"})
    app = Celery("restore-test")
    app.conf.update(celery_config(settings))
    store = Store(settings.resolved_database_url, settings.resolved_replica_url, pool_size=1)
    client = streams.connect(settings.resolved_redis_url)
    try:
        accepted = store.accept_chat("owner-r", "What is the capital of France?", None, None,
                                     SamplingParams(16))
        rid = accepted.request_id
        # What the worker that died had streamed before it went.
        for seq, text in enumerate(["The", " capital"]):
            client.xadd(streams.stream_key(rid), {"frame": json.dumps(token_frame(rid, seq, text))})
        # Taken and never acknowledged, then given back: kombu marks the message redelivered.
        with app.connection_for_write() as conn, conn.SimpleQueue(settings.queue) as queue:
            app.send_task(TASK_GENERATE, args=[rid], queue=settings.queue, task_id=rid)
            message = queue.get(timeout=10)
            assert message.headers["id"] == rid and not message.delivery_info.get("redelivered")
            message.requeue()
        replies = app.control.add_consumer(settings.queue, reply=True, timeout=5)
        assert replies and all("ok" in r for reply in replies for r in reply.values()), replies

        deadline = time.monotonic() + 120
        frames = streams.stream_events(client, rid)
        while not frames or frames[-1]["type"] != "done":
            assert time.monotonic() < deadline, frames
            time.sleep(0.05)
            frames = streams.stream_events(client, rid)
        tokens, done = [f for f in frames if f["type"] == "token"], frames[-1]
        assert [f["seq"] for f in tokens] == list(range(len(tokens))) and len(tokens) > 2
        reply = store.prompt_request(rid).reply
        assert reply.id == done["message_id"] and reply.finish_reason == done["finish_reason"]
        assert reply.content == "".join(f["text"] for f in tokens)
        assert reply.content.startswith("The capital") and "Paris" in reply.content, reply.content
        assert sum(f["type"] == "done" for f in frames) == 1
    finally:
        app.control.cancel_consumer(settings.queue, reply=True, timeout=5)
        client.close()
        store.dispose()
