"""`make run` keeps its servers up: Redis killed mid-reply is started again (its AOF keeps what it held), web and
workers reconnect by themselves, and the reply in flight is resumed, stored once and equal to what was sent."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import openai
import psutil
import psycopg
import pytest

from config.settings import ROOT
from scripts.services import free_port
from tests.conftest import Client

pytestmark = pytest.mark.integration


def redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def test_redis_killed_mid_reply_is_restarted_and_the_reply_is_resumed_and_stored_once(stack):
    ports = {name: free_port() for name in ("WEB", "FLOWER", "REDIS", "PRIMARY", "REPLICA")}
    data = stack.root / "make-run"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CHAT_")},
           **{f"CHAT_{name}_PORT": str(port) for name, port in ports.items()},
           "CHAT_DATA_DIR": str(data), "CHAT_MAX_BATCH": "4", "CHAT_ENGINE_MAX_TOKENS": "1024",
           "CHAT_WORKER_HEARTBEAT_S": "1", "CHAT_MAX_NEW_TOKENS_CAP": "300", "PYTHONPATH": str(ROOT)}
    out = open(stack.root / "logs" / "make-run.log", "wb")
    run = subprocess.Popen([sys.executable, "-m", "scripts.run"], cwd=ROOT, env=env, stdout=out,
                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    client = None
    try:
        deadline = time.monotonic() + 300
        while b"Chat page:" not in (stack.root / "logs" / "make-run.log").read_bytes():
            assert run.poll() is None and time.monotonic() < deadline, "make run did not start"
            time.sleep(0.5)
        client = Client(f"http://127.0.0.1:{ports['WEB']}")
        # The API key it prints works with an OpenAI client.
        [key] = re.findall(rb"API key: +(cqk_\S+)", (stack.root / "logs" / "make-run.log").read_bytes())
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{ports['WEB']}/v1", api_key=key.decode(), max_retries=0)
        assert [m.id for m in api.models.list().data] == [stack.settings.model_id]
        accepted = client.ask({"type": "chat", "content": "Write a long story about a robot who learns to paint.",
                               "max_new_tokens": 300})
        assert accepted["type"] == "accepted", accepted
        rid = accepted["request_id"]
        tokens = [client.recv() for _ in range(3)]
        [redis] = [p for p in psutil.Process(run.pid).children(recursive=True) if p.name() == "redis-server"]
        redis.kill()  # SIGKILL, mid-reply
        killed = time.monotonic()
        while not redis_answers(ports["REDIS"]):
            assert time.monotonic() < killed + 60, "Redis was not started again"
            time.sleep(0.2)
        back_s = time.monotonic() - killed
        # The socket was told that its stream broke; it resumes after what it has (as the page does).
        frames, resumed = [], 0
        while True:
            frame = client.recv()
            if frame["type"] == "token":
                tokens.append(frame)
                continue
            if frame["type"] == "error":
                assert frame["code"] == "unavailable", frame
                time.sleep(0.5)
                client.send({"type": "resume", "request_id": rid, "after_seq": tokens[-1]["seq"]})
                resumed += 1
                continue
            frames.append(frame)
            break
        [done] = frames
        assert resumed >= 1  # the stream did break, and was resumed
        assert done["type"] == "done" and done["finish_reason"] in ("stop", "length"), done
        assert [t["seq"] for t in tokens] == list(range(len(tokens)))
        with psycopg.connect(host="127.0.0.1", port=ports["PRIMARY"], user="chat", dbname="chat") as conn:
            rows = conn.execute("SELECT content FROM messages WHERE request_id = %s AND role = 'assistant'",
                                (rid,)).fetchall()
        assert rows == [("".join(t["text"] for t in tokens),)]
        # A new chat goes through the restarted Redis: web and worker reconnected by themselves.
        _, _, done = client.chat("Say hi.", max_new_tokens=4)
        assert done["finish_reason"] in ("stop", "length")
        print(f"\nRedis answered again {back_s:.1f} s after SIGKILL")
    finally:
        if client is not None:
            client.close()
        run.send_signal(signal.SIGINT)
        try:
            run.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
        out.close()

