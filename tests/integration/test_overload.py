"""Overload, small versions of what `make bench` measures at full size: a web process holding many idle sockets
refuses the one past its limit at once and still answers; chats offered at several times what the worker serves
are each accepted and completed, or refused `busy`, never left hanging. Figures are printed, not asserted."""

from __future__ import annotations

import asyncio
import json
import resource

import pytest

from scripts import overload, sockets
from tests.conftest import Client, second_web, site_token

pytestmark = pytest.mark.integration


def test_a_web_process_holds_its_limit_of_idle_sockets_and_refuses_one_more_at_once(stack):
    count = 400
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with second_web(stack, max_sockets=count) as (url, web_pid):
        token = Client(url).token
        result = asyncio.run(sockets.hold(url, token, count, web_pid, hold_s=3))
    print(json.dumps(result))
    assert result["sockets_open"] == count, result["open_failures"]
    assert result["one_past_the_limit"]["status"] == 503
    assert result["still_open_after_hold"] == count and result["held_socket_pong"]
    assert result["healthz_ms"]["probes"] >= 1


@pytest.mark.parametrize("limit", [{"max_queue_depth": 2}, {"max_queue_wait_s": 1.0}], ids=["depth", "wait"])
def test_chats_offered_beyond_capacity_are_completed_or_refused_busy_and_none_hang(stack, limit):
    # Either limit: a queue two deep, or one whose waiting tasks would take the worker over a second to start.
    with second_web(stack, busy_retry_after_s=1.5, **limit) as (url, web_pid):
        result = overload.overload(url, rate=12, duration_s=10, max_new_tokens=24, web_pid=web_pid,
                                   token_for=lambda i: site_token(f"visitor-{i}"))
    print(json.dumps(result))
    assert overload.contract_holds(result) == {k: True for k in overload.contract_holds(result)}, result
    assert result["accepted"] > 0 and result["refused"].get("busy", 0) > 0, result
    why = "the model's queue is full" if "max_queue_depth" in limit else "the model's workers are busy"
    assert set(result["refusal_reasons"]) == {why}, result["refusal_reasons"]
