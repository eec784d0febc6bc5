"""A web process opens its pools' connections when it starts (CHAT_WEB_WARM_CONNECTIONS), so that the first burst
of chats does not open them one by one; a server it cannot reach then does not keep it from serving."""

from __future__ import annotations

import psutil
import pytest

from scripts.services import free_port
from tests.conftest import Client, second_web

pytestmark = pytest.mark.integration


def open_to(pid: int, port: int) -> int:
    """The serving process's TCP connections to a local server's port."""
    return sum(1 for c in psutil.Process(pid).net_connections(kind="tcp")
               if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)


def test_a_web_process_opens_its_pools_before_the_first_chat_and_keeps_them(stack):
    s = stack.settings
    with second_web(stack, web_warm_connections=6) as (url, pid):
        # Before any request: 6 to each database; 6 for Redis commands and 6 of the broker's producers.
        assert open_to(pid, s.primary_port) >= 6
        assert open_to(pid, s.replica_port) >= 6
        assert open_to(pid, s.redis_port) >= 12
        client = Client(url)
        try:
            _, tokens, done = client.chat("Say hello.", max_new_tokens=4)
            assert done["type"] == "done" and tokens
        finally:
            client.close()
        assert open_to(pid, s.primary_port) >= 6  # kept in the pool, not closed after the chat
    with second_web(stack, web_warm_connections=0) as (url, pid):
        assert open_to(pid, s.primary_port) == 0 and open_to(pid, s.replica_port) == 0


def test_a_server_that_cannot_be_reached_at_start_leaves_the_web_tier_serving(stack):
    s = stack.settings
    nowhere = f"postgresql+psycopg://chat@127.0.0.1:{free_port()}/chat"
    with second_web(stack, web_warm_connections=4, replica_url=nowhere) as (url, pid):
        assert open_to(pid, s.primary_port) >= 4
        client = Client(url)
        try:
            _, tokens, done = client.chat("Say hello.", max_new_tokens=4)  # writes and prompts go to the primary
            assert done["type"] == "done" and tokens
        finally:
            client.close()
