"""Two worker hosts join one stack over a real network: each in a network namespace of its own (its own address,
hostname and process tree), with its own data folder, HOME, TMPDIR and copy of the model, and an environment that
holds the join settings only. Both serve; one lost mid-reply (every process of it killed at once), its requests
finish on the other, stored once; a host with a bad join setting says which, and stops."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import requests

from app import streams
from config.settings import DEFAULT_MODEL, DEFAULT_MODEL_DIR, Settings
from tests.conftest import Client, make_settings, running_stack
from workers.preflight import EX_CONFIG

pytestmark = pytest.mark.integration

STORY = "Tell me a long story about a lighthouse keeper and a storm."
REPLY_TOKENS = 40  # at least 32 asked of each chat


def ip(*argv: str) -> None:
    result = subprocess.run(["ip", *argv], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)}: {result.stderr.strip()}")


@dataclass
class Network:
    server: str  # the stack's address on the bridge
    namespaces: list[str]


@pytest.fixture(scope="module")
def network():
    """A bridge with the stack's address, and two namespaces on it, each a host with an address of its own."""
    tag = secrets.token_hex(2)
    prefix = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
    bridge, namespaces = f"cqbr{tag}", [f"cq{tag}h{i}" for i in (1, 2)]
    made: list[tuple[str, str]] = []
    try:
        ip("link", "add", bridge, "type", "bridge")
        made.append(("link", bridge))
        ip("addr", "add", f"{prefix}.1/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        for i, ns in enumerate(namespaces, start=2):
            ip("netns", "add", ns)
            made.append(("netns", ns))
            outside, inside = f"cqv{tag}{i}", f"cqn{tag}{i}"
            ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            ip("link", "set", inside, "netns", ns)
            ip("link", "set", outside, "master", bridge, "up")
            ip("-n", ns, "addr", "add", f"{prefix}.{i}/24", "dev", inside)
            ip("-n", ns, "link", "set", inside, "up")
            ip("-n", ns, "link", "set", "lo", "up")
    except (RuntimeError, FileNotFoundError) as exc:
        for kind, name in reversed(made):
            subprocess.run(["ip", kind, "del", name], capture_output=True)
        pytest.fail(f"this test makes its hosts in network namespaces (as root, with iproute2): {exc}")
    print(f"\nstack on {prefix}.1; hosts {', '.join(f'{ns} at {prefix}.{i}' for i, ns in enumerate(namespaces, 2))}")
    try:
        yield Network(f"{prefix}.1", namespaces)
    finally:
        for kind, name in reversed(made):  # a namespace's veth goes with it
            subprocess.run(["ip", kind, "del", name], capture_output=True)


@pytest.fixture(scope="module")
def remote_stack(network):
    """The stack, listening on the bridge (and loopback) with passwords, and no worker of its own."""
    root = Path(tempfile.mkdtemp(prefix="chat-hosts-"))
    os.chmod(root, 0o755)
    settings = make_settings(root, host=network.server, redis_password=secrets.token_urlsafe(16),
                             db_password=secrets.token_urlsafe(16), model=DEFAULT_MODEL, max_new_tokens_cap=64)
    try:
        with running_stack(root, settings, worker=False) as stack:
            yield stack
    finally:
        shutil.rmtree(root, ignore_errors=True)


def join_env(stack, **overrides: str) -> dict[str, str]:
    """What a worker host is told: where the broker and the databases are, and the model's name."""
    s = stack.settings
    return {"CHAT_BROKER_URL": s.resolved_broker_url, "CHAT_DATABASE_URL": s.resolved_database_url,
            "CHAT_REPLICA_URL": s.resolved_replica_url, "CHAT_MODEL": DEFAULT_MODEL, **overrides}


class Host:
    """A worker host: ``python -m workers.launch`` in a network namespace, with a hostname and a process tree of
    its own (a PID namespace: killing its first process kills every process of the host, as a lost machine)."""

    def __init__(self, root: Path, name: str, ns: str, env: dict[str, str], model: str | None = DEFAULT_MODEL):
        """The host's folders, with a copy of the model named ``model`` (None: no model)."""
        self.name, self.ns, self.folder = name, ns, root / name
        for sub in ("home", "tmp", "data", "models"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        if model:
            shutil.copytree(DEFAULT_MODEL_DIR, self.folder / "models" / model)
        self.env = {"PATH": os.environ["PATH"], "HOME": str(self.folder / "home"), "TMPDIR": str(self.folder / "tmp"),
                    "CHAT_DATA_DIR": str(self.folder / "data"), "CHAT_MODELS_DIR": str(self.folder / "models"),
                    **env}
        self.log = self.folder / "host.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Host:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                ["unshare", "--uts", "--pid", "--mount", "--fork", "--kill-child", "--mount-proc",
                 "sh", "-c", 'hostname "$0" && exec ip netns exec "$1" "$2" -m workers.launch',
                 self.name, self.ns, sys.executable],
                env=self.env, cwd=self.folder, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        return self

    def kill(self) -> None:
        """SIGKILL to the host's process group: its first process dies, and with it every process of the host."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:]) if self.log.exists() else ""


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
    started = [Host(root, f"cq-host-{i}", ns, join_env(remote_stack)).start()
               for i, ns in enumerate(network.namespaces, 1)]
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
    while True:  # until the victim is decoding a reply of this batch
        running = [t for t in flower_tasks(remote_stack).values()
                   if t.get("state") == "STARTED" and (t.get("worker") or "").endswith("@" + victim.name)]
        if running:
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
                join_env(remote_stack, **{"CHAT_JOIN_TIMEOUT_S": "3", **env}), model=model).start()
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
