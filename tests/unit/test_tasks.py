"""Which deliveries of a task may find a reply already begun."""

from __future__ import annotations

from types import SimpleNamespace

from workers.tasks import is_repeat


def test_only_a_first_delivery_is_not_a_repeat():
    assert not is_repeat(SimpleNamespace(delivery_info={"exchange": "", "routing_key": "gen.x"}, retries=0))
    assert not is_repeat(SimpleNamespace(delivery_info=None, retries=None))
    # Restored to the queue by kombu (worker lost, visibility timeout), or retried after an error.
    assert is_repeat(SimpleNamespace(delivery_info={"redelivered": True}, retries=0))
    assert is_repeat(SimpleNamespace(delivery_info={}, retries=1))
