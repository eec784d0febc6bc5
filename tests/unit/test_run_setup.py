"""`make run` started from a folder the postgres user cannot reach says how to fix it, and starts nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from config.settings import ROOT
from scripts.services import PostgresPair, SetupError

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="PostgreSQL runs as the postgres user only when started as root")


@pytest.fixture
def closed_home():
    """A folder like /root: closed to other users, with a checkout's data folder inside."""
    with tempfile.TemporaryDirectory(prefix="home-") as home:
        os.chmod(home, 0o700)
        yield Path(home)


@as_root
def test_a_data_folder_behind_a_closed_one_is_refused_with_the_fix(closed_home):
    pair = PostgresPair(closed_home / "chatqueue" / "data" / "pg", 5440, 5441)
    with pytest.raises(SetupError) as caught:
        pair.check_reachable()
    said = str(caught.value)
    assert f"chmod o+x {closed_home}" in said and "CHAT_DATA_DIR=" in said
    os.chmod(closed_home, 0o711)
    pair.check_reachable()  # once that user may pass, nothing more is asked


@as_root
def test_make_run_says_how_to_fix_it_without_a_traceback_and_starts_nothing(closed_home):
    data = closed_home / "chatqueue" / "data"
    env = {**os.environ, "CHAT_DATA_DIR": str(data), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "scripts.run"], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=120, stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "chmod o+x" in output and "CHAT_DATA_DIR=" in output
    assert "Traceback" not in output and "Starting Redis" not in output
    assert not (data / "pg").exists() and not (data / "redis").exists()


def test_off_loopback_make_run_makes_up_passwords_once_and_keeps_them(tmp_path):
    from config.settings import DEFAULT_SECRET_KEY, Settings
    from scripts.run import join_settings, reachable_settings

    local = Settings()
    assert reachable_settings(local, tmp_path / "secrets.json") is local  # loopback: nothing to hide
    assert not (tmp_path / "secrets.json").exists()
    reachable = Settings(host="10.0.0.5", bind="0.0.0.0", redis_password="given")
    first = reachable_settings(reachable, tmp_path / "secrets.json")
    assert first.redis_password == "given" and first.db_password and first.secret_key != DEFAULT_SECRET_KEY
    assert (tmp_path / "secrets.json").stat().st_mode & 0o777 == 0o600
    again = reachable_settings(reachable, tmp_path / "secrets.json")
    assert (again.db_password, again.secret_key) == (first.db_password, first.secret_key)
    line = join_settings(first)
    assert f"redis://:given@10.0.0.5:{first.redis_port}/0" in line and first.db_password in line
    assert "CHAT_MODEL=SmolLM2-135M-Instruct" in line
