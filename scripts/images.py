"""``make images``: build the container images, then smoke-test them through docker-compose.

    python -m scripts.images [--python-image IMAGE --debian-image IMAGE] [--wheels DIR] [--cuda] [--keep]

Without base images given, a Debian bookworm is bootstrapped (debootstrap, as root) and imported once as
``chatqueue-debian:bookworm``, and Python goes on it from Debian's own packages (docker/Dockerfile.python): no
registry is needed. Each image is built from exactly the files its ``.dockerignore`` lets through. Then the stack
of docker/compose.yaml starts under a project name of its own, published on free ports of 127.0.0.1: a chat is
answered through the containers, a second worker joins and serves, a worker joins from
docker/compose.workers.yaml as from another machine, and the web image is shown to hold no torch. Everything is
taken down again, volumes included; the figures go to docs/images.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as dt
import fnmatch
import functools
import http.server
import io
import json
import logging
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from app import streams
from config.settings import ROOT
from scripts.loadgen import connect, guest_token
from scripts.services import free_port

logger = logging.getLogger("images")

DOCKER = ROOT / "docker"
LOGS = ROOT / "build" / "images"
DOCS = ROOT / "docs" / "images.md"

DEBIAN_IMAGE = "chatqueue-debian:bookworm"
PYTHON_IMAGE = "chatqueue-python:3.11-bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
TORCH_VERSION = "2.13.0"
PROMPT = "Name three colours of the rainbow."
NEW_TOKENS = 24
WHEELS_PORT = 38011


@dataclass(frozen=True)
class Image:
    tag: str
    dockerfile: str  # from the repository's root
    context: str  # the folder sent to the builder, from the repository's root
    base: str  # "python" or "debian": which base image it is built on
    args: tuple[tuple[str, str], ...] = ()


IMAGES = (
    Image("chatqueue-redis:latest", "docker/Dockerfile.redis", "docker", "debian"),
    Image("chatqueue-postgres:latest", "docker/Dockerfile.postgres", "docker", "debian"),
    Image("chatqueue-web:latest", "docker/Dockerfile.web", ".", "python"),
    Image("chatqueue-worker:latest", "docker/Dockerfile.worker", ".", "python", (("VARIANT", "cpu"),)),
)
CUDA_IMAGE = Image("chatqueue-worker:latest-cuda", "docker/Dockerfile.worker", ".", "python", (("VARIANT", "cuda"),))
PYTHON_BASE = Image(PYTHON_IMAGE, "docker/Dockerfile.python", "docker", "debian")


# --- the build context ----------------------------------------------------------------------------------------

def context_rules(dockerfile: Path) -> tuple[list[str], list[str]]:
    """The paths the Dockerfile's ``.dockerignore`` lets through (its ``!`` lines), and the name patterns it keeps
    out all the same."""
    lines = [line.strip() for line in Path(f"{dockerfile}.dockerignore").read_text().splitlines()]
    rules = [line for line in lines if line and not line.startswith("#")]
    allowed = [rule[1:].strip("/") for rule in rules if rule.startswith("!")]
    excluded = [rule.removeprefix("**/") for rule in rules if not rule.startswith("!") and rule != "*"]
    return allowed, excluded


def build_context(image: Image, extra: dict[str, bytes]) -> bytes:
    """A tar of the Dockerfile and the paths its ``.dockerignore`` lets through, owned by root and readable by all
    (the images' users are not root), plus ``extra`` files."""
    base = ROOT / image.context
    allowed, excluded = context_rules(ROOT / image.dockerfile)

    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if any(fnmatch.fnmatch(Path(info.name).name, pattern) for pattern in excluded):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mode = 0o755 if info.isdir() or info.mode & 0o100 else 0o644
        info.mtime = int(info.mtime)
        return info

    buf = io.BytesIO()
    # GNU, not PAX: Docker tells a tar from a Dockerfile by its first block alone, which a PAX header would fill.
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(ROOT / image.dockerfile, arcname=str((ROOT / image.dockerfile).relative_to(base)), filter=normalise)
        for rel in allowed:
            if (base / rel).exists():
                tar.add(base / rel, arcname=rel, filter=normalise)
        for name, data in extra.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# --- building --------------------------------------------------------------------------------------------------

def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, text=True, **kwargs)


def image_exists(tag: str) -> bool:
    return bool(image_id(tag))


def image_id(tag: str) -> str:
    out = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", tag], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def drop_replaced(tag: str, old: str) -> None:
    """Remove the image ``tag`` named before it was built again, unless something still uses it."""
    if old and old != image_id(tag):
        subprocess.run(["docker", "image", "rm", old], capture_output=True)


def image_size(tag: str) -> int:
    return int(run(["docker", "image", "inspect", "--format", "{{.Size}}", tag], capture_output=True).stdout)


@dataclass
class Built:
    image: Image
    seconds: float
    steps: int
    cached: int
    replaced: str = ""  # the image the tag named before, to remove once nothing built on it is left
    size: int = 0


def build(image: Image, bases: dict[str, str], args: dict[str, str], extra: dict[str, bytes],
          cache: bool = True) -> Built:
    """``docker build`` on the host's network (pip reaches the index and any wheel server on loopback)."""
    dockerfile = str((ROOT / image.dockerfile).relative_to(ROOT / image.context))
    argv = ["docker", "build", "--network", "host", "--rm", "--force-rm", "-f", dockerfile, "-t", image.tag]
    if not cache:
        argv.append("--no-cache")
    for name, value in {"BASE_IMAGE": bases[image.base], **dict(image.args), **args}.items():
        argv += ["--build-arg", f"{name}={value}"]
    argv.append("-")
    log_path = LOGS / f"build-{image.tag.replace(':', '-')}.log"
    logger.info("Building %s (log: %s)", image.tag, log_path.relative_to(ROOT))
    before = image_id(image.tag)
    started = time.monotonic()
    steps = cached = 0
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=False)
        feeder = threading.Thread(target=lambda: (proc.stdin.write(build_context(image, extra)), proc.stdin.close()))
        feeder.start()
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            log.write(line)
            if line.startswith("Step "):
                steps += 1
                logger.info("  %s", line.strip()[:140])
            elif "Using cache" in line:
                cached += 1
        feeder.join()
        if proc.wait() != 0:
            raise RuntimeError(f"building {image.tag} failed; the end of {log_path}:\n" +
                               "\n".join(log_path.read_text(errors="replace").splitlines()[-30:]))
    return Built(image, time.monotonic() - started, steps, cached, replaced=before)


def bootstrap_debian(tag: str, mirror: str) -> tuple[float, str]:
    """A Debian bookworm (minbase) imported as ``tag``, slimmed as Debian's own container images are; how long it
    took, and the image the tag named before."""
    if os.geteuid() != 0 or not shutil.which("debootstrap"):
        raise SystemExit("Bootstrapping a Debian base needs root and debootstrap (apt-get install debootstrap); or "
                         "name bases that exist: --python-image python:3.11-slim-bookworm --debian-image "
                         "debian:bookworm-slim")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chatqueue-debian-") as tmp:
        root = Path(tmp) / "rootfs"
        logger.info("Bootstrapping Debian bookworm from %s into %s", mirror, tag)
        with open(LOGS / "debootstrap.log", "w") as log:
            run(["debootstrap", "--variant=minbase", "bookworm", str(root), mirror], stdout=log, stderr=log)
        slim(root, mirror)
        before = image_id(tag)
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        run(["docker", "import", "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["bash"]', "-", tag],
            stdin=tar.stdout, capture_output=True)
        if tar.wait() != 0:
            raise RuntimeError("tar of the bootstrapped Debian failed")
    return time.monotonic() - started, before


def slim(root: Path, mirror: str) -> None:
    """No documentation, manuals, translations or package caches, now or after later installs."""
    (root / "etc/apt/sources.list").write_text(
        f"deb {mirror} bookworm main\ndeb {mirror} bookworm-updates main\n"
        f"deb {mirror.rsplit('/', 1)[0]}/debian-security bookworm-security main\n")
    (root / "etc/dpkg/dpkg.cfg.d/chatqueue-slim").write_text(
        "path-exclude /usr/share/doc/*\npath-include /usr/share/doc/*/copyright\npath-exclude /usr/share/man/*\n"
        "path-exclude /usr/share/info/*\npath-exclude /usr/share/locale/*\npath-exclude /usr/share/lintian/*\n")
    (root / "etc/apt/apt.conf.d/chatqueue-slim").write_text(
        'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\nAcquire::GzipIndexes "true";\n'
        'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };\n')
    doomed = [path for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*",
                                   "var/log/*.log", "usr/share/man/*", "usr/share/info/*", "usr/share/locale/*",
                                   "usr/share/lintian/*", "usr/share/doc/*/*")
              for path in root.glob(pattern) if path.name != "copyright" and not path.parent.is_symlink()]
    for path in doomed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    (root / "etc/resolv.conf").unlink(missing_ok=True)  # the host's; Docker writes each container's own
    (root / "etc/hostname").write_text("localhost\n")


class WheelServer:
    """A folder of wheels over HTTP on loopback, for pip's --find-links inside a build, while it runs. On the same
    port each time where it is free: the address is a build argument, and a new one would rebuild every layer
    after it."""

    def __init__(self, folder: Path):
        handler = functools.partial(_QuietHandler, directory=str(folder))
        try:
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEELS_PORT), handler)
        except OSError:
            logger.warning("Port %d is taken: the worker image is built again from its torch layer", WHEELS_PORT)
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WheelServer:
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *_):
        pass


def pip_setting(name: str) -> str:
    """One of pip's settings on this host (``cert``, ``find-links``), from its environment or its configuration."""
    value = os.environ.get("PIP_" + name.upper().replace("-", "_"), "")
    if not value:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "get", f"global.{name}"], capture_output=True,
                             text=True)
        value = out.stdout.strip() if out.returncode == 0 else ""
    return value


def local_torch_wheels(find_links: str) -> Path | None:
    """The first folder of ``find_links`` that holds torch's CPU wheel for this project."""
    for entry in find_links.split():
        folder = Path(entry.removeprefix("file://"))
        if folder.is_dir() and any(folder.glob(f"torch-{TORCH_VERSION}+cpu-*.whl")):
            return folder
    return None


# --- the stack -------------------------------------------------------------------------------------------------

class Compose:
    """docker-compose on some of docker/'s files, under one project name, with its own environment."""

    def __init__(self, project: str, files: list[str], env: dict[str, str]):
        self.project, self.files, self.env = project, files, env
        self.log = LOGS / f"compose-{project}.log"

    def __call__(self, *args: str, timeout: float = 600, capture: bool = False) -> str:
        argv = ["docker-compose", "-p", self.project]
        for name in self.files:
            argv += ["-f", str(DOCKER / name)]
        with open(self.log, "a") as log:
            log.write(f"\n$ {' '.join(argv)} {' '.join(args)}\n")
            log.flush()
            out = subprocess.run([*argv, *args], env=self.env, timeout=timeout, text=True,
                                 stdout=subprocess.PIPE if capture else log, stderr=log)
        if out.returncode != 0:
            raise RuntimeError(f"docker-compose {' '.join(args)} failed ({out.returncode}); see {self.log}")
        return out.stdout if capture else ""

    def containers(self, service: str) -> list[str]:
        return self("ps", "-q", service, capture=True).split()

    def tail(self, lines: int = 40) -> str:
        try:
            return self("logs", "--no-color", "--tail", str(lines), capture=True, timeout=60)
        except Exception as exc:
            return f"(no logs: {exc})"


def inspect(container: str) -> dict:
    return json.loads(run(["docker", "inspect", container], capture_output=True).stdout)[0]


def docker_time(stamp: str) -> float:
    """Docker's RFC 3339 time, nanoseconds and all, in seconds since the epoch."""
    match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z", stamp)
    if not match:
        raise ValueError(f"not a Docker time: {stamp}")
    whole = dt.datetime.fromisoformat(match.group(1)).replace(tzinfo=dt.timezone.utc).timestamp()
    return whole + float(match.group(2) or 0)


def wait_for(check, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s" + (f" (last: {last})" if last else ""))


@dataclass
class Reply:
    first_token_s: float
    total_s: float
    tokens: int
    finish_reason: str
    text: str


def chat(base_url: str, token: str, prompt: str = PROMPT) -> Reply:
    """One chat over the WebSocket, as the chat page sends it."""
    ws = connect(base_url, token)
    try:
        sent = time.perf_counter()
        ws.send(json.dumps({"type": "chat", "content": prompt, "max_new_tokens": NEW_TOKENS, "temperature": 0}))
        first, parts = None, []
        while True:
            frame = json.loads(ws.recv())
            if frame["type"] == "token":
                first = first or time.perf_counter()
                parts.append(frame["text"])
            elif frame["type"] == "done":
                return Reply(first - sent if first else float("nan"), time.perf_counter() - sent,
                             frame["usage"]["completion_tokens"], frame["finish_reason"], "".join(parts))
            elif frame["type"] == "error":
                raise RuntimeError(f"chat refused: {frame}")
    finally:
        ws.close()


@dataclass
class Smoke:
    """What the smoke test found, step by step, in the order of its steps."""

    figures: dict[str, str] = field(default_factory=dict)

    def note(self, step: str, result: str) -> None:
        logger.info("%s: %s", step, result)
        self.figures[step] = result


def started_at(container: str) -> float:
    return docker_time(inspect(container)["State"]["StartedAt"])


class StackTest:
    """The stack of docker/compose.yaml on free loopback ports, then a worker of docker/compose.workers.yaml
    joining it through those ports as from another machine."""

    def __init__(self, ca_bundle: str, smoke: Smoke):
        self.smoke = smoke
        self.project = "chatqueuesmoke" + secrets.token_hex(3)
        self.ports = {name: free_port() for name in ("web", "flower", "redis", "primary", "replica")}
        self.redis_password, self.db_password = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        self.flower_auth = ("admin", secrets.token_urlsafe(16))
        self.base_url = f"http://127.0.0.1:{self.ports['web']}"
        self.metrics_port = free_port()
        # Nothing of this shell's own settings: the stack gets these and compose.yaml's defaults.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CHAT_", "CQ_"))}
        env.update({f"CQ_{name.upper()}_PORT": str(port) for name, port in self.ports.items()})
        env.update({
            "CQ_PUBLISH_ADDRESS": "127.0.0.1",
            "CQ_REDIS_PASSWORD": self.redis_password, "CQ_POSTGRES_PASSWORD": self.db_password,
            "CHAT_SECRET_KEY": secrets.token_urlsafe(48), "CHAT_FLOWER_BASIC_AUTH": ":".join(self.flower_auth),
            "CHAT_GUESTS": "true", "CHAT_ALLOWED_ORIGINS": json.dumps([self.base_url]),
        })
        files = ["compose.yaml"]
        if ca_bundle:
            env["CQ_CA_BUNDLE"] = ca_bundle
            files.append("compose.ca.yaml")
        self.stack = Compose(self.project, files, env)
        primary, replica = (f"127.0.0.1:{self.ports[name]}" for name in ("primary", "replica"))
        self.workers = Compose(self.project + "w", ["compose.workers.yaml", *files[1:]], {
            **env,
            "CHAT_BROKER_URL": self.redis_url(),
            "CHAT_DATABASE_URL": f"postgresql+psycopg://chat:{self.db_password}@/chat?host={primary}&host={replica}"
                                 "&target_session_attrs=read-write",
            "CHAT_REPLICA_URL": f"postgresql+psycopg://chat:{self.db_password}@{replica}/chat",
            "CQ_NETWORK_MODE": "host", "CQ_BIND": "127.0.0.1", "CQ_WORKER_METRICS_PORT": str(self.metrics_port),
            "CQ_MODELS_VOLUME": f"{self.project}_models",  # the stack's: the model is there already
        })

    def redis_url(self) -> str:
        return f"redis://:{self.redis_password}@127.0.0.1:{self.ports['redis']}/0"

    def heartbeats(self) -> list[dict]:
        """The workers alive with a loaded model, as the web tier sees them."""
        client = streams.connect(self.redis_url(), 2)
        try:
            return streams.live_workers(client)
        finally:
            client.close()

    def new_heartbeat(self, before: set[str], what: str) -> dict:
        return wait_for(lambda: [b for b in self.heartbeats() if b["name"] not in before], 600, what)[0]

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.base_url + path, timeout=10, **kwargs)

    def flower(self, path: str, auth: bool = True) -> requests.Response:
        return requests.get(f"http://127.0.0.1:{self.ports['flower']}{path}", timeout=30,
                            auth=self.flower_auth if auth else None)

    def run(self) -> None:
        self.start()
        self.first_chat()
        self.scale()
        self.flower_sees_both()
        self.remote_worker()

    def start(self) -> None:
        """``up -d``: the model is fetched, the databases made, the migrations run, the first worker loads."""
        note = self.smoke.note
        started = time.monotonic()
        self.stack("up", "-d", timeout=1800)
        note("stack up (`docker-compose up -d` returns: the model converted, the migrations run, all started)",
             f"{time.monotonic() - started:.0f} s")
        model = inspect(self.stack("ps", "-aq", "model", capture=True).split()[0])["State"]
        note("the model fetched from PyPI and converted (the `model` service)",
             f"{docker_time(model['FinishedAt']) - docker_time(model['StartedAt']):.0f} s, exit {model['ExitCode']}")
        [replica] = self.stack.containers("replica")
        wait_for(lambda: inspect(replica)["State"]["Health"]["Status"] == "healthy", 120, "the replica streaming")
        note("the replica (`pg_basebackup -R` on its first start)", "streaming from the primary (its health check)")
        [worker] = self.stack.containers("worker")
        beat = self.new_heartbeat(set(), "a worker with its model")
        note("the first worker: container start to model loaded (its heartbeat)",
             f"{beat['since'] - started_at(worker):.1f} s ({beat['name']}, {beat['device']}, {beat['dtype']})")
        ready = wait_for(lambda: self.get("/readyz?workers=1"), 120, "/readyz?workers=1")
        note("`/healthz`, `/readyz?workers=1`",
             f"{self.get('/healthz').status_code}, {ready.status_code} {json.dumps(ready.json()['checks'])}")

    def first_chat(self) -> None:
        """A guest's chat over the WebSocket, then the same guest's history, read from the replica."""
        token = guest_token(self.base_url)
        reply = chat(self.base_url, token)
        if not reply.tokens or reply.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"the chat was not answered: {reply}")
        self.smoke.note(f"a chat over the WebSocket (a guest, greedy, up to {NEW_TOKENS} tokens)",
                        f"first token {reply.first_token_s:.2f} s, done {reply.total_s:.2f} s, {reply.tokens} "
                        f"tokens, finish {reply.finish_reason}: {reply.text.strip()[:60]!r}")
        auth = {"Authorization": f"Bearer {token}"}
        history = wait_for(lambda: self.get("/api/conversations", headers=auth).json()["conversations"], 30,
                           "the conversation in the history")
        self.smoke.note("the guest's history (`GET /api/conversations`)", f"{len(history)} conversation")

    def scale(self) -> None:
        """A second worker joins (``--scale worker=2``): it loads the model, then takes requests."""
        before = {b["name"] for b in self.heartbeats()}
        old = set(self.stack.containers("worker"))
        started = time.monotonic()
        self.stack("up", "-d", "--no-recreate", "--scale", "worker=2", timeout=600)
        [new] = set(self.stack.containers("worker")) - old
        beat = self.new_heartbeat(before, "the second worker")
        self.smoke.note("`--scale worker=2`: the new worker's container start to model loaded",
                        f"{beat['since'] - started_at(new):.1f} s ({beat['name']}; "
                        f"{time.monotonic() - started:.0f} s from the command)")
        served = self.first_served_by(beat["name"])
        self.smoke.note("the new worker's container start to its first request (the task started there)",
                        f"{served - started_at(new):.1f} s")

    def first_served_by(self, worker: str, rounds: int = 6) -> float:
        """Chats four at a time until ``worker`` serves one; when its first task started there (Flower's time)."""
        tokens = [guest_token(self.base_url) for _ in range(4)]
        for _ in range(rounds):
            with concurrent.futures.ThreadPoolExecutor(len(tokens)) as pool:
                replies = list(pool.map(lambda token: chat(self.base_url, token), tokens))
            if not all(reply.tokens for reply in replies):
                raise RuntimeError(f"a chat was not answered: {replies}")
            tasks = self.flower("/api/tasks").json().values()
            started = [t["started"] for t in tasks if t.get("worker") == worker and t.get("started")]
            if started:
                return min(started)
        raise RuntimeError(f"no chat reached {worker} in {rounds} rounds of four")

    def flower_sees_both(self) -> None:
        denied = self.flower("/api/workers", auth=False).status_code
        if denied != 401:
            raise RuntimeError(f"Flower answered {denied} without credentials")
        workers = wait_for(lambda: (lambda found: found if len(found) >= 2 else None)(
            self.flower("/api/workers?refresh=1").json()), 60, "both workers in Flower")
        tasks = list(self.flower("/api/tasks").json().values())
        self.smoke.note("Flower `/api/workers` (basic auth; 401 without) and the tasks each served",
                        ", ".join(f"{name}: {sum(t.get('worker') == name for t in tasks)}" for name in sorted(workers)))

    def remote_worker(self) -> None:
        """A worker of compose.workers.yaml on the host's network, dialling the stack's published ports."""
        before = {b["name"] for b in self.heartbeats()}
        started = time.monotonic()
        self.workers("up", "-d", timeout=900)
        [container] = self.workers.containers("worker")
        beat = self.new_heartbeat(before, "the worker of compose.workers.yaml")
        metrics = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10)
        self.smoke.note("a worker of `compose.workers.yaml` (host network, the stack's published ports): container "
                        "start to model loaded", f"{beat['since'] - started_at(container):.1f} s ({beat['name']}; "
                        f"{time.monotonic() - started:.0f} s from the command); its `/metrics`: {metrics.status_code}")

    def down(self) -> None:
        # The workers' model volume is the stack's: it leaves with the stack's volumes.
        for compose, volumes in ((self.workers, []), (self.stack, ["--volumes"])):
            try:
                compose("down", *volumes, "--remove-orphans", "--timeout", "60", timeout=600)
            except Exception as exc:
                logger.warning("Taking %s down: %s", compose.project, exc)


# --- the checks on the images alone ----------------------------------------------------------------------------

def image_checks(smoke: Smoke) -> None:
    """The web image has no torch; the worker's is the CPU build; neither runs as root."""
    web = subprocess.run(["docker", "run", "--rm", "--network", "none", "chatqueue-web:latest", "python", "-c",
                          "import torch"], capture_output=True, text=True)
    if web.returncode == 0:
        raise RuntimeError("import torch succeeded in chatqueue-web")
    smoke.note("`import torch` in chatqueue-web", "fails: " + web.stderr.strip().splitlines()[-1])
    torch = run(["docker", "run", "--rm", "--network", "none", "chatqueue-worker:latest", "python", "-c",
                 "import torch; print(torch.__version__)"], capture_output=True).stdout.strip()
    if not torch.endswith("+cpu"):
        raise RuntimeError(f"chatqueue-worker holds torch {torch}, not the CPU build")
    smoke.note("torch in chatqueue-worker", torch)
    users = {tag: run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "id", tag, "-u"],
                      capture_output=True).stdout.strip() for tag in (image.tag for image in IMAGES)}
    if "0" in users.values():
        raise RuntimeError(f"an image runs as root: {users}")
    smoke.note("user ids the images run as", ", ".join(f"{tag.split(':')[0]} {uid}" for tag, uid in users.items()))


# --- the report ------------------------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_docs(built: list[Built], bases: dict[str, str], bootstrapped: float | None, smoke: Smoke,
               command: str, cuda_built: bool) -> None:
    versions = run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True).stdout.strip()
    compose = run(["docker-compose", "version", "--short"], capture_output=True).stdout.strip()
    lines = [
        "# Container images",
        "",
        f"Written by `{command}` on {dt.date.today().isoformat()}: {cpu_name()}, {os.cpu_count()} cores, Docker "
        f"{versions}, docker-compose {compose}. Bases: `{bases['python']}` for the web and worker images, "
        f"`{bases['debian']}` for Redis and PostgreSQL"
        + (" (Debian bookworm bootstrapped with debootstrap, Python 3.11 from Debian's packages)."
           if bases["debian"] == DEBIAN_IMAGE else "."),
        "",
        "| image | size | built in | steps from cache |",
        "| --- | ---: | ---: | ---: |",
    ]
    if image_exists(bases["debian"]):
        made = f"{bootstrapped:.0f} s (debootstrap)" if bootstrapped else "earlier"
        lines.append(f"| `{bases['debian']}` | {image_size(bases['debian']) / 1e6:,.0f} MB | {made} | |")
    for b in built:
        lines.append(f"| `{b.image.tag}` | {b.size / 1e6:,.0f} MB | {b.seconds:.0f} s | {b.cached} of {b.steps} |")
    if not cuda_built:
        lines.append("| `chatqueue-worker:latest-cuda` | not built (`--cuda`; PyPI's CUDA torch and its NVIDIA "
                     "wheels are several GB) | | |")
    lines += ["", "Sizes as `docker images` gives them (1 MB = 10^6 bytes), each with its base.", "",
              "## Smoke test", "",
              "The stack of `docker/compose.yaml` under a project of its own, published on free ports of 127.0.0.1,"
              " then taken down with its volumes. Every container shares the machine's cores: a worker that joins"
              " loads its model while the others serve.", "", "| step | result |", "| --- | --- |"]
    lines += [f"| {step} | {result.replace('|', '/')} |" for step, result in smoke.figures.items()]
    DOCS.write_text("\n".join(lines) + "\n")
    logger.info("Wrote %s", DOCS.relative_to(ROOT))


# --- main ------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python-image", help="base of the web and worker images (default: Python from Debian's "
                                               f"packages on a bootstrapped Debian, {PYTHON_IMAGE})")
    parser.add_argument("--debian-image", help=f"base of the Redis and PostgreSQL images (default: {DEBIAN_IMAGE}, "
                                               "bootstrapped once)")
    parser.add_argument("--mirror", default=DEBIAN_MIRROR, help="the Debian mirror to bootstrap from")
    parser.add_argument("--wheels", type=Path, help="a folder holding torch's CPU wheel, offered to the worker's "
                                                    "build (default: pip's find-links where it holds one)")
    parser.add_argument("--ca-cert", help="a CA bundle pip must trust in the builds and the model service "
                                          "(default: pip's cert setting on this host, if any)")
    parser.add_argument("--no-cache", action="store_true", help="build every layer anew, and bootstrap the Debian "
                                                                "base again where it is ours")
    parser.add_argument("--cuda", action="store_true", help="build chatqueue-worker:latest-cuda too (several GB)")
    parser.add_argument("--no-smoke", action="store_true", help="build only")
    parser.add_argument("--keep", action="store_true", help="leave the smoke test's stack running")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for tool in ("docker", "docker-compose"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed")
    LOGS.mkdir(parents=True, exist_ok=True)

    bootstrapped, replaced_base = None, ""
    bases = {"debian": args.debian_image or DEBIAN_IMAGE, "python": args.python_image or PYTHON_IMAGE}
    if not args.debian_image and (args.no_cache or not image_exists(DEBIAN_IMAGE)):
        bootstrapped, replaced_base = bootstrap_debian(DEBIAN_IMAGE, args.mirror)
    ca_bundle = args.ca_cert or pip_setting("cert")
    ca_bundle = ca_bundle if ca_bundle and Path(ca_bundle).is_file() else ""
    extra = {"docker/certs/build-host.crt": Path(ca_bundle).read_bytes()} if ca_bundle else {}
    built: list[Built] = []
    if not args.python_image:
        built.append(build(PYTHON_BASE, bases, {}, {}, cache=not args.no_cache))
    wheels = args.wheels or local_torch_wheels(pip_setting("find-links"))
    with WheelServer(wheels) if wheels else contextlib.nullcontext() as server:
        for image in (*IMAGES, *((CUDA_IMAGE,) if args.cuda else ())):
            context_extra = extra if image.context == "." else {}
            worker_args = {"TORCH_FIND_LINKS": server.url} if server and image.dockerfile.endswith("worker") else {}
            built.append(build(image, bases, worker_args, context_extra, cache=not args.no_cache))
    for b in reversed(built):  # the images built on an older one first
        drop_replaced(b.image.tag, b.replaced)
    drop_replaced(DEBIAN_IMAGE, replaced_base)
    for b in built:
        b.size = image_size(b.image.tag)
        logger.info("%-32s %8.0f MB  built in %4.0f s (%d of %d steps from cache)", b.image.tag, b.size / 1e6,
                    b.seconds, b.cached, b.steps)
    (LOGS / "sizes.json").write_text(json.dumps({b.image.tag: b.size for b in built}, indent=1) + "\n")
    if args.no_smoke:
        return 0

    smoke = Smoke()
    image_checks(smoke)
    test = StackTest(ca_bundle, smoke)
    try:
        test.run()
    except Exception:
        logger.error("The smoke test failed; the stack's last log lines:\n%s", test.stack.tail())
        raise
    finally:
        if args.keep:
            logger.info("Left running as project %s: web %s, Flower port %d", test.project, test.base_url,
                        test.ports["flower"])
        else:
            test.down()
    given = sys.argv[1:] if argv is None else argv
    command = "python -m scripts.images " + " ".join(given) if given else "make images"
    write_docs(built, bases, bootstrapped, smoke, command, args.cuda)
    return 0


if __name__ == "__main__":
    sys.exit(main())
