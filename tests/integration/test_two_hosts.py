"""Two worker hosts join one stack over a real network: each in a network namespace of its own (its own address,
hostname and process tree), on a core of its own as a machine would have its own, with its own data folder, HOME,
TMPDIR and copy of the model, and an environment that holds the join settings only. Both serve; one lost mid-reply
(every process of it killed at once), its requests finish on the other, stored once; a host with a bad join setting
says which, and stops."""

from __future__ import annotations

import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from app import streams
from config.settings import DEFAULT_MODEL, Settings
from scripts.hosts import Host, Network, join_env
from scripts.services import scratch_folder
from tests.conftest import Client, make_settings, running_stack
from workers.preflight import EX_CONFIG

pytestmark = pytest.mark.integration

STORY = "Tell me a long story about a lighthouse keeper and a storm."
REPLY_TOKENS = 40  # at least 32 asked of each chat


@pytest.fixture(scope="module")
def network():
    """A bridge with the stack's address, and two namespaces on it, each a host with an address of its own."""
    try:
        net = Network(2)
    except (RuntimeError, FileNotFoundError) as exc:
        pytest.fail(f"this test makes its hosts in network namespaces (as root, with iproute2): {exc}")
    print(f"\nstack on {net.server}; hosts {', '.join(f'{n} at {a}' for n, a in zip(net.namespaces, net.addresses))}")
    try:
        yield net
    finally:
        net.remove()


@pytest.fixture(scope="module")
def remote_stack(network):
    """The stack, listening on the bridge (and loopback) with passwords, and no worker of its own."""
    with scratch_folder("chat-hosts-") as root:
        settings = make_settings(root, host=network.server, redis_password=secrets.token_urlsafe(16),
                                 db_password=secrets.token_urlsafe(16), model=DEFAULT_MODEL, max_new_tokens_cap=64)
        with running_stack(root, settings, worker=False) as stack:
            yield stack


def live_hosts(stack) -> set[str]:
    client = streams.connect(stack.settings.resolved_redis_url, max_connections=1)
    try:
        return {beat["name"].split("@", 1)[1] for beat in streams.live_workers(client, stack.settings.queue)}
    finally:
        client.close()


def flower_tasks(stack) -> dict[str, dict]:
    s = stack.settings
    user, password = s.flower_basic_auth.split(":", 1)
    res = requests.get(f"http://{s.host}:{s.flower_port}/api/tasks", auth=(user, password), timeout=30)
    res.raise_for_status()
    return res.json()


def chat_all(stack, count: int, results: list) -> None:
    def one(_):
        client = Client(stack.base_url)
        try:
            results.append(client.chat(STORY, max_new_tokens=REPLY_TOKENS, temperature=0.8))
        finally:
            client.close()

    with ThreadPoolExecutor(count) as pool:
        list(pool.map(one, range(count)))


def stored_once(stack, results: list) -> None:
    """Every reply whole (seq without gap or repeat, at least the tokens asked unless the model stopped) and
    stored once, equal to what the client was sent."""
    for accepted, tokens, done in results:
        assert [t["seq"] for t in tokens] == list(range(len(tokens)))
        assert len(tokens) >= 32 or done["finish_reason"] == "stop", done
        with stack.primary() as conn:
            rows = conn.execute("SELECT id, content FROM messages WHERE request_id = %s AND role = 'assistant'",
                                (accepted["request_id"],)).fetchall()
        assert rows == [(done["message_id"], "".join(t["text"] for t in tokens))]


@pytest.fixture(scope="module")
def hosts(remote_stack, network):
    root = remote_stack.root / "hosts"
    # Each on a core of its own (where there are two): two engines' torch threads sharing cores wait on each other.
    cores = sorted(os.sched_getaffinity(0))
    started = [Host(root, f"cq-host-{i + 1}", ns, join_env(remote_stack.settings), cpus=str(cores[i % len(cores)]))
               .start() for i, ns in enumerate(network.namespaces)]
    began = time.monotonic()
    try:
        deadline = began + 240
        while live_hosts(remote_stack) != {h.name for h in started}:
            assert time.monotonic() < deadline, "\n".join(f"--- {h.name} ---\n{h.tail()}" for h in started)
            assert all(h.proc.poll() is None for h in started), "\n".join(h.tail() for h in started)
            time.sleep(0.2)
        print(f"\nboth hosts serving {time.monotonic() - began:.1f} s after their start")
        yield started
    finally:
        for h in started:
            h.stop()


def test_two_hosts_serve_one_queue_and_flower_says_which_served_what(remote_stack, hosts):
    count = 2 * Settings.model_fields["max_batch"].default  # the hosts run CHAT_MAX_BATCH's default each
    results: list = []
    chat_all(remote_stack, count, results)
    assert len(results) == count
    stored_once(remote_stack, results)
    tasks = flower_tasks(remote_stack)
    served = {tasks[a["request_id"]]["worker"].split("@", 1)[1] for a, _, _ in results if a["request_id"] in tasks}
    print(f"{count} chats; served by {sorted(served)}; "
          f"{sum(len(t) for _, t, _ in results)} tokens in all")
    assert served == {h.name for h in hosts}


def test_a_host_lost_mid_reply_leaves_its_requests_to_the_other_stored_once(remote_stack, hosts):
    victim, survivor = hosts
    results: list = []
    chatting = threading.Thread(target=chat_all, args=(remote_stack, 8, results))
    chatting.start()
    deadline = time.monotonic() + 120
    while True:  # until every chat of this batch is being decoded, some of them by the victim: mid-reply
        # (no other task runs now: the test before this one waited for all of its own)
        started = [t for t in flower_tasks(remote_stack).values() if t.get("state") == "STARTED"]
        running = [t for t in started if (t.get("worker") or "").endswith("@" + victim.name)]
        if running and len(started) >= 8:
            break
        assert time.monotonic() < deadline and chatting.is_alive(), "the victim took none of the chats"
        time.sleep(0.05)
    victim.kill()
    killed = time.monotonic()
    chatting.join(300)
    assert not chatting.is_alive() and len(results) == 8
    print(f"\nhost {victim.name} lost with {len(running)} replies running; all 8 done "
          f"{time.monotonic() - killed:.1f} s later")
    stored_once(remote_stack, results)
    tasks = flower_tasks(remote_stack)
    assert all(tasks[a["request_id"]]["worker"].endswith("@" + survivor.name) for a, _, _ in results
               if tasks.get(a["request_id"], {}).get("state") == "SUCCESS")


@pytest.mark.parametrize("case", ["wrong broker password", "wrong database password", "stack unreachable",
                                  "no model", "model declares another name"])
def test_a_host_with_a_bad_join_setting_says_which_and_stops(remote_stack, network, case):
    s = remote_stack.settings
    wrong = "not-the-password"
    env, model, expect = {
        "wrong broker password": ({"CHAT_BROKER_URL": s.resolved_broker_url.replace(s.redis_password, wrong)},
                                  DEFAULT_MODEL, "the broker at"),
        "wrong database password": ({"CHAT_DATABASE_URL": s.resolved_database_url.replace(s.db_password, wrong)},
                                    DEFAULT_MODEL, "password authentication failed"),
        "stack unreachable": ({"CHAT_BROKER_URL": s.resolved_broker_url.replace(s.host, "10.255.255.1")},
                              DEFAULT_MODEL, "cannot reach the broker"),
        "no model": ({}, None, "no model at"),
        # A copy of the model kept under another name: it still declares its own, which web hosts queue for.
        "model declares another name": ({"CHAT_MODEL": "a-copy"}, "a-copy", "declares the name"),
    }[case]
    host = Host(remote_stack.root / "bad", f"cq-bad-{secrets.token_hex(2)}", network.namespaces[0],
                join_env(remote_stack.settings, **{"CHAT_JOIN_TIMEOUT_S": "3", **env}), model=model).start()
    started = time.monotonic()
    try:
        code = host.proc.wait(90)
    finally:
        host.stop()
    took = time.monotonic() - started
    lines = [line for line in host.log.read_text().splitlines() if "Cannot join" in line]
    print(f"{case}: exit {code} after {took:.1f} s: {lines}")
    assert code == EX_CONFIG
    assert len(lines) == 1 and expect in lines[0], host.tail()
    assert wrong not in lines[0] and s.redis_password not in lines[0] and s.db_password not in lines[0]
