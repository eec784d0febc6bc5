"""Worker hosts on one machine that look like other machines to the stack: each in a network namespace of its own
(its own address on a bridge that carries the stack's), with a hostname and a process tree of its own (a PID
namespace: killing its first process kills every process of the host, as a lost machine), its own data folder,
HOME, TMPDIR and copy of the model, and an environment that holds the join settings only.

Used by tests/integration/test_two_hosts.py and scripts/scale.py. Needs root and iproute2.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from config.settings import DEFAULT_MODEL, DEFAULT_MODEL_DIR, Settings


def ip(*argv: str) -> None:
    result = subprocess.run(["ip", *argv], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)}: {result.stderr.strip()}")


class Network:
    """A bridge with the stack's address (``server``), and ``count`` namespaces on it, each with an address of
    its own; removed by :meth:`remove`."""

    def __init__(self, count: int):
        tag = secrets.token_hex(2)
        prefix = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
        self.server = f"{prefix}.1"
        self.namespaces = [f"cq{tag}h{i}" for i in range(1, count + 1)]
        self.addresses = [f"{prefix}.{i}" for i in range(2, count + 2)]
        self._made: list[tuple[str, str]] = []
        bridge = f"cqbr{tag}"
        try:
            ip("link", "add", bridge, "type", "bridge")
            self._made.append(("link", bridge))
            ip("addr", "add", f"{self.server}/24", "dev", bridge)
            ip("link", "set", bridge, "up")
            for i, (ns, address) in enumerate(zip(self.namespaces, self.addresses)):
                ip("netns", "add", ns)
                self._made.append(("netns", ns))
                outside, inside = f"cqv{tag}{i}", f"cqn{tag}{i}"
                ip("link", "add", outside, "type", "veth", "peer", "name", inside)
                ip("link", "set", inside, "netns", ns)
                ip("link", "set", outside, "master", bridge, "up")
                ip("-n", ns, "addr", "add", f"{address}/24", "dev", inside)
                ip("-n", ns, "link", "set", inside, "up")
                ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for kind, name in reversed(self._made):  # a namespace's veth goes with it
            subprocess.run(["ip", kind, "del", name], capture_output=True)
        self._made.clear()


def join_env(settings: Settings, **overrides: str) -> dict[str, str]:
    """What a worker host is told: where the broker and the databases are, and the model's name."""
    return {"CHAT_BROKER_URL": settings.resolved_broker_url, "CHAT_DATABASE_URL": settings.resolved_database_url,
            "CHAT_REPLICA_URL": settings.resolved_replica_url, "CHAT_MODEL": DEFAULT_MODEL, **overrides}


class Host:
    """A worker host: ``python -m workers.launch`` in the namespace ``ns``, named ``name``, in ``root/name``."""

    def __init__(self, root: Path, name: str, ns: str, env: dict[str, str], model: str | None = DEFAULT_MODEL,
                 cpus: str | None = None):
        """The host's folders, with a copy of the model under the name ``model`` (None: no model); ``cpus``
        pins it (``taskset -c``)."""
        self.name, self.ns, self.folder, self.cpus = name, ns, root / name, cpus
        for sub in ("home", "tmp", "data", "models"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        if model and not (self.folder / "models" / model).exists():
            shutil.copytree(DEFAULT_MODEL_DIR, self.folder / "models" / model)
        self.env = {"PATH": os.environ["PATH"], "HOME": str(self.folder / "home"), "TMPDIR": str(self.folder / "tmp"),
                    "CHAT_DATA_DIR": str(self.folder / "data"), "CHAT_MODELS_DIR": str(self.folder / "models"),
                    **env}
        self.log = self.folder / "host.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Host:
        argv = ["unshare", "--uts", "--pid", "--mount", "--fork", "--kill-child", "--mount-proc",
                "sh", "-c", 'hostname "$0" && exec ip netns exec "$1" "$2" -m workers.launch',
                self.name, self.ns, sys.executable]
        if self.cpus is not None:
            argv = ["taskset", "-c", self.cpus, *argv]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, env=self.env, cwd=self.folder, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
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

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""
