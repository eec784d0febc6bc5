"""The worker launcher: one worker process per visible GPU, or N CPU workers.

    python -m workers.launch

Each child is a Celery worker pinned to one card (``CUDA_VISIBLE_DEVICES=i``)
and named after it (``gpu0@host``), listening on its model's queue. CUDA is
never touched here: GPUs are found with ``nvidia-smi``, and each child loads
the model itself after it starts, so nothing is initialised before a fork.
Adding a machine means running this there with the same broker and database.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from config.logging import configure_logging
from config.settings import ROOT, Settings
from workers import preflight

logger = logging.getLogger(__name__)

RESTART_DELAY_S = 2.0
MAX_RESTART_DELAY_S = 60.0
STABLE_AFTER_S = 60.0


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    env: dict[str, str]


def visible_gpus(setting: str | None, nvidia_smi: str | None = None) -> list[str]:
    """GPU indices from the setting (CUDA_VISIBLE_DEVICES or CHAT_GPUS), else from ``nvidia-smi``."""
    if setting is not None:
        return [g.strip() for g in setting.split(",") if g.strip() and not g.strip().startswith("-")]
    smi = nvidia_smi or shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip().isdigit()]


def usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may run on: a host pinned to some (``taskset``, a container's cpuset) splits those
    among its workers, not every core of the machine; under a CPU quota (a container's ``--cpus``, a pod's CPU
    limit: cgroup v2's ``cpu.max``), no more than the whole cores it allows."""
    cores = len(os.sched_getaffinity(0)) or 1
    try:
        quota, period = cpu_max.read_text().split()
        allowed = cores if quota == "max" else int(quota) // int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return cores
    return max(1, min(cores, allowed))


def plan(gpus: list[str], cpu_workers: int, torch_threads: int, cores: int, metrics_port: int = 0) -> list[WorkerSpec]:
    """What to start: a worker per GPU, or ``cpu_workers`` CPU workers sharing the cores; the i-th serves its
    metrics on ``metrics_port + i`` (none where it is 0)."""
    if gpus:
        specs = [WorkerSpec(f"gpu{g}@%h", {"CUDA_VISIBLE_DEVICES": g, "CHAT_DEVICE": "cuda:0"}) for g in gpus]
    else:
        threads = torch_threads or max(1, cores // cpu_workers)
        specs = [WorkerSpec(f"cpu{i}@%h", {"CUDA_VISIBLE_DEVICES": "", "CHAT_DEVICE": "cpu",
                                           "CHAT_TORCH_THREADS": str(threads)}) for i in range(cpu_workers)]
    for i, spec in enumerate(specs):
        spec.env["CHAT_WORKER_METRICS_PORT"] = str(metrics_port + i if metrics_port else 0)
    return specs


def worker_env(spec: WorkerSpec, environ: dict[str, str]) -> dict[str, str]:
    """The child's environment: the launcher's, the spec's pinning, and the project ahead of any PYTHONPATH."""
    path = environ.get("PYTHONPATH")
    return {**environ, **spec.env, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}


def restart_delay(quick_failures: int) -> float:
    """Seconds before restarting a worker that died ``quick_failures`` times in a row soon after start."""
    return min(RESTART_DELAY_S * 2 ** max(quick_failures - 1, 0), MAX_RESTART_DELAY_S)


def worker_argv(spec: WorkerSpec, settings: Settings) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-n", spec.name,
            "-Q", settings.queue, "--without-mingle", "--without-gossip", "--loglevel", settings.log_level]


class Launcher:
    """Starts the planned workers, restarts any that dies, stops them all on SIGINT or SIGTERM."""

    def __init__(self, settings: Settings, specs: list[WorkerSpec]):
        self.settings = settings
        self.specs = specs
        self.children: dict[str, subprocess.Popen] = {}
        self.started: dict[str, float] = {}
        self.quick_failures: dict[str, int] = {}
        self.restart_at: dict[str, float] = {}
        self.stopping = False

    def _spawn(self, spec: WorkerSpec) -> None:
        env = worker_env(spec, dict(os.environ))
        # Each child leads its own process group: a terminal's Ctrl-C reaches only
        # the launcher, which then stops the children in order.
        self.children[spec.name] = subprocess.Popen(worker_argv(spec, self.settings), env=env, cwd=ROOT,
                                                    start_new_session=True)
        self.started[spec.name] = time.monotonic()
        logger.info("Started worker %s (pid %d) with %s", spec.name, self.children[spec.name].pid,
                    " ".join(f"{k}={v}" for k, v in spec.env.items()))

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGTERM, self._stop)
        for spec in self.specs:
            self._spawn(spec)
        while not self.stopping:
            now = time.monotonic()
            for spec in self.specs:
                name, proc = spec.name, self.children[spec.name]
                if name in self.restart_at:
                    if now >= self.restart_at[name]:
                        del self.restart_at[name]
                        self._spawn(spec)
                elif proc.poll() is not None:
                    # A worker that keeps dying at start (a bad setting, a broken install)
                    # is retried ever more slowly rather than in a tight loop.
                    quick = now - self.started[name] < STABLE_AFTER_S
                    self.quick_failures[name] = self.quick_failures.get(name, 0) + 1 if quick else 1
                    delay = restart_delay(self.quick_failures[name])
                    logger.error("Worker %s exited with %s; restarting in %.0fs", name, proc.returncode, delay)
                    self.restart_at[name] = now + delay
            time.sleep(0.5)
        for name, proc in self.children.items():
            if proc.poll() is None:
                proc.terminate()
        # Each worker finishes its requests for up to its drain time, then hands the rest back.
        patience = self.settings.worker_drain_s + 30
        for name, proc in self.children.items():
            try:
                proc.wait(patience)
            except subprocess.TimeoutExpired:
                logger.warning("Worker %s did not stop in %.0fs; killing it", name, patience)
                proc.kill()
        return 0

    def _stop(self, *_):
        self.stopping = True


def main() -> int:
    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    problems = preflight.problems(settings)
    if problems:  # one line each, and no restarting: a wrong setting does not get better by retrying
        for problem in problems:
            logger.error("Cannot join: %s", problem)
        return preflight.EX_CONFIG
    gpus = visible_gpus(settings.gpus)
    specs = plan(gpus, settings.cpu_workers, settings.torch_threads, usable_cores(), settings.worker_metrics_port)
    logger.info("Launching %d worker(s) on %s for queue %s", len(specs), "GPUs " + ",".join(gpus) if gpus else "CPU",
                settings.queue)
    return Launcher(settings, specs).run()


if __name__ == "__main__":
    sys.exit(main())
