"""More chats than the stack can serve, for a bounded time: is every connection answered, every refusal a
contract refusal, every accepted chat completed, with a bounded time to first token, while `/healthz` answers
and the web process' memory stays bounded?

Open loop: Poisson arrivals, each a new visitor (its own signed token, its own socket opened on arrival) sending
one chat; a prober asks `/healthz` twice a second and a sampler reads the web process' memory every second.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import psutil
import requests
import websocket

from scripts.loadgen import PROMPTS

HANDSHAKE_TIMEOUT_S = 10  # a handshake not answered within this counts as unanswered
REPLY_TIMEOUT_S = 180


@dataclass
class Visit:
    arrived: float
    handshake: str = "pending"  # "open", "refused <status>", "unanswered: <why>"
    outcome: str = "pending"  # "completed", "refused <code>", "error <code>", "lost: <why>"
    ttft_s: float | None = None
    finish_reason: str | None = None
    retry_after: float | None = None
    accepted: bool = False
    why: str | None = None  # a refusal's message, up to its figures


@dataclass
class Probes:
    healthz_ms: list[float] = field(default_factory=list)
    healthz_failures: list[str] = field(default_factory=list)
    web_rss_mb: list[float] = field(default_factory=list)


def _visit(url: str, token: str, prompt: str, max_new_tokens: int, visit: Visit) -> None:
    try:
        ws = websocket.create_connection(f"{url.replace('http', 'ws', 1)}/ws?token={token}",
                                         timeout=HANDSHAKE_TIMEOUT_S)
    except websocket.WebSocketBadStatusException as exc:
        visit.handshake = visit.outcome = f"refused {exc.status_code}"
        return
    except Exception as exc:  # a hang or a reset: what this test exists to catch
        visit.handshake = visit.outcome = f"unanswered: {type(exc).__name__}"
        return
    visit.handshake = "open"
    try:
        ws.settimeout(REPLY_TIMEOUT_S)
        sent = time.perf_counter()
        ws.send(json.dumps({"type": "chat", "content": prompt, "max_new_tokens": max_new_tokens, "temperature": 0}))
        while True:
            frame = json.loads(ws.recv())
            if frame["type"] == "accepted":
                visit.accepted = True
            elif frame["type"] == "token" and visit.ttft_s is None:
                visit.ttft_s = time.perf_counter() - sent
            elif frame["type"] == "done":
                visit.outcome, visit.finish_reason = "completed", frame["finish_reason"]
                return
            elif frame["type"] == "error":
                visit.outcome = f"{'error' if visit.accepted else 'refused'} {frame['code']}"
                visit.retry_after = frame.get("retry_after")
                visit.why = frame.get("message", "").split("(")[0].strip()
                return
    except Exception as exc:
        visit.outcome = f"lost: {type(exc).__name__}"
    finally:
        ws.close()


def _probe(url: str, web_pid: int | None, stop: threading.Event, probes: Probes) -> None:
    proc = psutil.Process(web_pid) if web_pid else None
    next_rss = 0.0
    while not stop.is_set():
        started = time.perf_counter()
        try:
            requests.get(url + "/healthz", timeout=5).raise_for_status()
            probes.healthz_ms.append((time.perf_counter() - started) * 1000)
        except Exception as exc:
            probes.healthz_failures.append(type(exc).__name__)
        if proc is not None and time.monotonic() >= next_rss:
            probes.web_rss_mb.append(proc.memory_info().rss / 2**20)
            next_rss = time.monotonic() + 1
        stop.wait(0.5)


def _pct(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    arr = np.asarray(values)
    return {**{f"p{q}": round(float(np.percentile(arr, q)), 1) for q in (50, 95, 99)},
            "max": round(float(arr.max()), 1)}


def overload(url: str, rate: float, duration_s: float, max_new_tokens: int, token_for: Callable[[int], str],
             web_pid: int | None = None, seed: int = 11) -> dict:
    """Offer ``rate`` chats a second for ``duration_s`` seconds; ``token_for(i)`` signs visitor ``i`` in."""
    rng = random.Random(seed)
    visits: list[Visit] = []
    threads: list[threading.Thread] = []
    probes, stop = Probes(), threading.Event()
    prober = threading.Thread(target=_probe, args=(url, web_pid, stop, probes), daemon=True)
    prober.start()
    started = time.monotonic()
    i = 0
    while time.monotonic() - started < duration_s:
        visit = Visit(arrived=time.monotonic() - started)
        visits.append(visit)
        t = threading.Thread(target=_visit, args=(url, token_for(i), PROMPTS[i % len(PROMPTS)], max_new_tokens,
                                                  visit), daemon=True)
        t.start()
        threads.append(t)
        i += 1
        time.sleep(rng.expovariate(rate))
    offered_s = time.monotonic() - started
    for t in threads:
        t.join(max(1.0, started + duration_s + REPLY_TIMEOUT_S + HANDSHAKE_TIMEOUT_S - time.monotonic()))
    stop.set()
    prober.join(10)
    outcomes = Counter(v.outcome for v in visits)
    accepted = [v for v in visits if v.accepted]
    refusals = {k.split(" ", 1)[1]: n for k, n in outcomes.items() if k.startswith("refused")}
    return {
        "offered_per_s": rate, "duration_s": round(offered_s, 1), "arrivals": len(visits),
        "arrived_per_s": round(len(visits) / offered_s, 2),
        "handshakes": dict(Counter(v.handshake for v in visits)),
        "accepted": len(accepted), "completed": outcomes.get("completed", 0),
        "refused": refusals,
        "refusal_reasons": dict(Counter(v.why for v in visits if v.why and not v.accepted)),
        "not_completed": dict(Counter(v.outcome for v in accepted if v.outcome != "completed")),
        "ttft_ms": _pct([v.ttft_s * 1000 for v in accepted if v.ttft_s is not None]),
        "healthz_ms": _pct(probes.healthz_ms), "healthz_failures": len(probes.healthz_failures),
        "web_rss_mb": _pct(probes.web_rss_mb),
        "wall_s": round(time.monotonic() - started, 1),
    }


def contract_holds(result: dict) -> dict[str, bool]:
    """What the stack promises under overload, whatever the speed: no hang, no loss, only contract refusals."""
    handshakes = result["handshakes"]
    return {
        "every connection answered": all(k == "open" or k.startswith("refused") for k in handshakes),
        "every accepted chat completed": result["completed"] == result["accepted"] and not result["not_completed"],
        "nothing left unanswered": result["accepted"] + sum(result["refused"].values()) == result["arrivals"],
        "every refusal busy, rate_limited or 503": all(k in ("busy", "rate_limited", "503")
                                                       for k in result["refused"]),
        "healthz never failed": result["healthz_failures"] == 0,
    }
