"""A worker host with a setting that cannot work says which, in one line with its password hidden, and exits with
a configuration-error code that nothing restarts, instead of retrying for ever."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest
import redis

from config.settings import ROOT
from scripts.services import free_port, settings_env
from workers.preflight import EX_CONFIG, masked

pytestmark = pytest.mark.integration


def join(stack, **overrides) -> tuple[int, list[str], float]:
    """Start the launcher with these settings; its exit code, its lines that say why, and how long it took."""
    settings = stack.settings.model_copy(update={"join_timeout_s": 3, **overrides})
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "workers.launch"], cwd=ROOT, env=settings_env(settings),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # it joined after all: stop it and the workers it started, by pid
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        out, _ = proc.communicate()
    lines = [line for line in out.splitlines() if "Cannot join" in line]
    return proc.returncode, lines, time.monotonic() - started


@pytest.fixture
def redis_with_password(stack):
    """A Redis of its own that asks for a password: the broker a host joins with the wrong one."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--requirepass", "the-right-one", "--dir", str(stack.root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                redis.Redis(port=port, password="the-right-one", socket_connect_timeout=1).ping()
                break
            except redis.RedisError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("case", ["unreachable broker", "broker refuses the password", "unknown database role",
                                  "no model"])
def test_a_bad_join_setting_is_said_in_one_line_and_not_retried(stack, redis_with_password, case):
    s = stack.settings
    overrides, expect = {
        "unreachable broker": ({"broker_url": f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"},
                               "cannot reach the broker"),
        "broker refuses the password": ({"broker_url": f"redis://:s3cret-pw@127.0.0.1:{redis_with_password}/0"},
                                        "refused this host"),
        "unknown database role": ({"database_url": f"postgresql+psycopg://nobody:s3cret-pw@127.0.0.1:"
                                                   f"{s.primary_port}/chat"}, "refused this host"),
        "no model": ({"model": str(stack.root / "no-such-model")}, "no model at"),
    }[case]
    code, lines, took = join(stack, **overrides)
    print(f"{case}: exit {code} after {took:.1f} s: {lines}")
    assert code == EX_CONFIG
    assert len(lines) == 1 and expect in lines[0], lines
    assert "s3cret-pw" not in lines[0]


def test_passwords_are_hidden_in_every_kind_of_url():
    assert masked("redis://:pw@host:6379/0") == "redis://:***@host:6379/0"
    assert masked("redis://user:pw@host/0") == "redis://user:***@host/0"
    assert "pw" not in masked("postgresql+psycopg://chat:pw@db:5432/chat")
    assert masked("redis://host:6379/0") == "redis://host:6379/0"
