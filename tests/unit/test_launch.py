"""The launcher's plan: a worker per GPU pinned to it, or CPU workers sharing the cores."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

from config.settings import ROOT, Settings
from workers.launch import plan, restart_delay, usable_cores, visible_gpus, worker_argv, worker_env


def test_one_worker_per_gpu_pinned_and_named_after_it():
    specs = plan(["0", "1", "3"], cpu_workers=5, torch_threads=0, cores=16)
    assert [s.name for s in specs] == ["gpu0@%h", "gpu1@%h", "gpu3@%h"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["0", "1", "3"]
    assert all(s.env["CHAT_DEVICE"] == "cuda:0" for s in specs)  # each child sees only its own card


def test_cpu_workers_share_the_cores_and_see_no_gpu():
    specs = plan([], cpu_workers=2, torch_threads=0, cores=2)
    assert [s.name for s in specs] == ["cpu0@%h", "cpu1@%h"]
    assert all(s.env == {"CUDA_VISIBLE_DEVICES": "", "CHAT_DEVICE": "cpu", "CHAT_TORCH_THREADS": "1",
                         "CHAT_WORKER_METRICS_PORT": "0"} for s in specs)
    assert plan([], cpu_workers=1, torch_threads=3, cores=2)[0].env["CHAT_TORCH_THREADS"] == "3"


def test_a_launcher_pinned_to_some_cores_shares_those_and_not_the_machines():
    assert usable_cores() == len(os.sched_getaffinity(0))
    core = min(os.sched_getaffinity(0))
    pinned = subprocess.run(
        [sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{core}}}); from workers.launch import plan, "
                               "usable_cores; print(plan([], 1, 0, usable_cores())[0].env['CHAT_TORCH_THREADS'])"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert pinned.stdout.strip() == "1"


def test_under_a_cpu_quota_a_launcher_counts_the_whole_cores_it_allows(tmp_path):
    cpu_max, cores = tmp_path / "cpu.max", len(os.sched_getaffinity(0))
    for text, want in (("max 100000\n", cores), ("100000 100000\n", 1), ("150000 100000\n", 1),
                       ("50000 100000\n", 1), (f"{(cores + 4) * 100000} 100000\n", cores), ("", cores)):
        cpu_max.write_text(text)
        assert usable_cores(cpu_max) == want, text
    assert usable_cores(tmp_path / "none") == cores  # no cgroup v2 file: the cores alone


def test_each_worker_serves_its_metrics_on_a_port_of_its_own():
    assert [s.env["CHAT_WORKER_METRICS_PORT"] for s in plan([], 3, 0, 2, metrics_port=9400)] == ["9400", "9401",
                                                                                                  "9402"]
    assert [s.env["CHAT_WORKER_METRICS_PORT"] for s in plan(["0", "1"], 1, 0, 2, metrics_port=9500)] == ["9500",
                                                                                                      "9501"]


def test_visible_gpus_from_the_setting_or_nvidia_smi(tmp_path):
    assert visible_gpus("0,2") == ["0", "2"]
    assert visible_gpus("") == []
    assert visible_gpus("-1") == []
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nprintf '0\\n1\\n'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    assert visible_gpus(None, nvidia_smi=str(smi)) == ["0", "1"]
    assert visible_gpus(None, nvidia_smi=str(tmp_path / "missing")) == []


def test_workers_listen_on_their_models_queue():
    settings = Settings(model="/m/SmolLM2-135M-Instruct")
    argv = worker_argv(plan(["0"], 1, 0, 1)[0], settings)
    assert argv[argv.index("-Q") + 1] == "gen.smollm2-135m-instruct"
    assert argv[argv.index("-n") + 1] == "gpu0@%h"
    assert "--without-mingle" in argv and "--without-gossip" in argv


def test_cuda_visible_devices_feeds_the_gpus_setting(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,2")
    assert Settings().gpus == "1,2"


def test_a_child_keeps_the_launchers_environment_and_python_path():
    spec = plan(["1"], 1, 0, 1)[0]
    env = worker_env(spec, {"PYTHONPATH": "/opt/site", "CHAT_REDIS_URL": "redis://h:1/0",
                            "CUDA_VISIBLE_DEVICES": "0,1"})
    assert env["PYTHONPATH"] == f"{ROOT}:/opt/site"  # the project first, then what the launcher was given
    assert env["CHAT_REDIS_URL"] == "redis://h:1/0"
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["CHAT_DEVICE"] == "cuda:0"
    assert worker_env(spec, {})["PYTHONPATH"] == str(ROOT)


def test_a_worker_that_keeps_dying_at_start_is_retried_ever_more_slowly():
    assert [restart_delay(n) for n in range(1, 8)] == [2, 4, 8, 16, 32, 60, 60]
