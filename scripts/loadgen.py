"""A load generator that drives the real WebSocket API: closed loop (C chats back to back)
or open loop (Poisson arrivals at a given rate), bounded in count and time."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import requests
import websocket

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a rainbow forms, step by step.",
    "Describe a busy morning at a city market.",
    "What are the benefits of regular exercise? Give several reasons.",
    "Explain the water cycle to a ten-year-old.",
    "Write a letter to a friend describing your last holiday.",
    "How does a bicycle work? Describe its main parts.",
    "Give some tips for learning a new language.",
]


@dataclass
class Sample:
    sent: float
    token_times: list[float] = field(default_factory=list)
    done: float | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    accepted: bool = False
    engine_first_token_ms: float | None = None  # from the done frame's timing


@dataclass
class Run:
    label: str
    offered: str
    samples: list[Sample]
    wall_s: float
    concurrency: int | None = None  # closed loop: chats at once


def guest_token(base_url: str) -> str:
    """A guest's token (the stack must allow guests), as the chat page gets one."""
    res = requests.post(base_url + "/api/guest", headers={"Origin": base_url}, timeout=10)
    res.raise_for_status()
    return res.json()["token"]


def connect(base_url: str, token: str) -> websocket.WebSocket:
    return websocket.create_connection(f"{base_url.replace('http', 'ws', 1)}/ws?token={token}", timeout=120)


def _one(ws: websocket.WebSocket, prompt: str, max_new_tokens: int) -> Sample:
    sample = Sample(sent=time.perf_counter())
    try:
        ws.send(json.dumps({"type": "chat", "content": prompt, "max_new_tokens": max_new_tokens, "temperature": 0}))
        while True:
            frame = json.loads(ws.recv())
            now = time.perf_counter()
            if frame["type"] == "accepted":
                sample.accepted = True
            elif frame["type"] == "token":
                sample.token_times.append(now)
            elif frame["type"] == "done":
                sample.done = now
                sample.completion_tokens = frame["usage"]["completion_tokens"]
                sample.finish_reason = frame["finish_reason"]
                sample.engine_first_token_ms = frame.get("timing", {}).get("engine_first_token_ms")
                return sample
            elif frame["type"] == "error":
                sample.error = frame["code"]
                return sample
    except Exception as exc:  # a broken socket counts as an error, not a crash of the run
        sample.error = type(exc).__name__
        return sample


def _one_sse(http: requests.Session, url: str, model: str, prompt: str, max_new_tokens: int) -> Sample:
    """One streamed request through the OpenAI-compatible API."""
    sample = Sample(sent=time.perf_counter())
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_new_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    try:
        with http.post(url + "/v1/chat/completions", json=body, stream=True, timeout=120) as res:
            if res.status_code != 200:
                sample.error = str(res.status_code)
                return sample
            sample.accepted = True
            for line in res.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    sample.completion_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content"):
                        sample.token_times.append(now)
                    if choice.get("finish_reason"):  # some servers leave it out until the end
                        sample.done, sample.finish_reason = now, choice["finish_reason"]
                        sample.engine_first_token_ms = chunk.get("timing", {}).get("engine_first_token_ms")
                if "error" in chunk:
                    sample.error = chunk["error"].get("code") or "error"
        if sample.done is None and sample.error is None:
            sample.error = "no finish"
        if not sample.completion_tokens:  # a server that sends no usage: one token a chunk, as they stream
            sample.completion_tokens = len(sample.token_times)
    except Exception as exc:
        sample.error = type(exc).__name__
    return sample


def closed_loop(base_url: str, concurrency: int, total: int, max_new_tokens: int, label: str = "",
                api: str = "ws", stagger_s: float = 0) -> Run:
    """``concurrency`` chats, each sending its next request when the last is done: over the WebSocket
    (``api="ws"``), streamed through the OpenAI-compatible API (``api="v1"``), or through another server's
    (``api="peer"``: no sign-in). ``stagger_s``: the i-th chat starts i times this late, so that replies of one
    length do not start and end together in waves."""
    token = guest_token(base_url) if api != "peer" else None
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    samples: list[Sample] = []
    lock = threading.Lock()
    counter = iter(range(total))
    model = None
    if api in ("v1", "peer"):
        models = requests.get(base_url + "/v1/models", headers=auth, timeout=10)
        model = models.json()["data"][0]["id"]

    def client(i: int) -> None:
        time.sleep(i * stagger_s)
        if api in ("v1", "peer"):
            http = requests.Session()
            http.headers.update(auth)
            one, close = (lambda p: _one_sse(http, base_url, model, p, max_new_tokens)), http.close
        else:
            ws = connect(base_url, token)
            one, close = (lambda p: _one(ws, p, max_new_tokens)), ws.close
        try:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                s = one(PROMPTS[i % len(PROMPTS)])
                with lock:
                    samples.append(s)
        finally:
            close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    return Run(label, f"C={concurrency}" + {"ws": "", "v1": " /v1", "peer": " OpenAI API"}[api], samples,
               time.perf_counter() - started, concurrency)


def poisson(base_url: str, rate: float, total: int, max_new_tokens: int, seed: int = 7, label: str = "") -> Run:
    """Open loop: ``total`` requests arriving at ``rate`` per second on average, each on a socket of its own
    opened as it arrives (times run from its chat frame, not the handshake; a socket opened long before it is
    used would not answer the server's pings, and be closed)."""
    token = guest_token(base_url)
    rng = random.Random(seed)
    samples: list[Sample] = []
    lock = threading.Lock()

    def request(i: int) -> None:
        try:
            ws = connect(base_url, token)
        except Exception as exc:
            s = Sample(sent=time.perf_counter(), error=type(exc).__name__)
        else:
            s = _one(ws, PROMPTS[i % len(PROMPTS)], max_new_tokens)
            ws.close()
        with lock:
            samples.append(s)

    started = time.perf_counter()
    threads = []
    for i in range(total):
        t = threading.Thread(target=request, args=(i,))
        t.start()
        threads.append(t)
        time.sleep(rng.expovariate(rate))
    for t in threads:
        t.join(900)
    return Run(label, f"{rate:g} req/s", samples, time.perf_counter() - started)


def _pct(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    arr = np.asarray(values) * 1000
    return {f"p{q}": round(float(np.percentile(arr, q)), 1) for q in (50, 95, 99)}


def saturated_tokens_per_s(run: Run) -> float | None:
    """Output tokens/s of a closed loop while all its chats had a request in flight: no ramp-up, no drain.

    From the first token of the last chat to start until the first chat runs out
    of requests; token frames counted in that window, scaled to tokens (a frame
    may carry more than one token, and the end token carries none).
    """
    done = sorted((s for s in run.samples if s.token_times and s.done is not None and s.error is None),
                  key=lambda s: s.sent)
    if not run.concurrency or len(done) <= run.concurrency:
        return None
    start = max(s.token_times[0] for s in done[:run.concurrency])
    end = min(s.done for s in done if s.done > done[-1].sent)
    frames = sum(len(s.token_times) for s in done)
    inside = sum(1 for s in done for t in s.token_times if start <= t <= end)
    if end <= start or not frames:
        return None
    return inside * sum(s.completion_tokens for s in done) / frames / (end - start)


def summarize(run: Run) -> dict:
    """Accepted, completed, errors; TTFT and inter-token latency percentiles (ms); output tokens/s."""
    done = [s for s in run.samples if s.done is not None and s.error is None]
    ttft = [s.token_times[0] - s.sent for s in done if s.token_times]
    itl = [b - a for s in done for a, b in zip(s.token_times, s.token_times[1:])]
    # The stack's share of TTFT, per request: what the client waited beyond the engine's own first token.
    overhead = [s.token_times[0] - s.sent - s.engine_first_token_ms / 1000 for s in done
                if s.token_times and s.engine_first_token_ms is not None]
    tokens = sum(s.completion_tokens for s in done)
    return {
        "label": run.label, "offered": run.offered, "requests": len(run.samples),
        "accepted": sum(s.accepted for s in run.samples), "completed": len(done),
        "errors": sum(1 for s in run.samples if s.error is not None),
        "error_kinds": dict(Counter(s.error for s in run.samples if s.error is not None)),
        "ttft_ms": _pct(ttft), "ttft_mean_ms": round(1000 * float(np.mean(ttft)), 1) if ttft else None,
        "itl_ms": _pct(itl), "itl_mean_ms": round(1000 * float(np.mean(itl)), 1) if itl else None,
        "ttft_stack_overhead_ms": _pct(overhead), "output_tokens": tokens,
        "wall_s": round(run.wall_s, 2), "tokens_per_s": round(tokens / run.wall_s, 1) if run.wall_s else 0.0,
        "saturated_tokens_per_s": None if (sat := saturated_tokens_per_s(run)) is None else round(sat, 1),
    }
