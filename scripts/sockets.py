"""Idle WebSockets held against one web process: how many it holds, in how much memory, and whether it still
answers while it holds them; one past its limit must be refused at once.

    python -m scripts.sockets --url http://127.0.0.1:8000 --token <JWT> --count 10000 --web-pid <pid>

prints one JSON object. asyncio, one process: thousands of sockets cost the client little.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
import urllib.request

import psutil
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus


def _raise_open_files_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def _healthz_ms(base_url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(base_url + "/healthz", timeout=10) as res:
        res.read()
    return (time.perf_counter() - started) * 1000


async def _open(uri: str, gate: asyncio.Semaphore):
    async with gate:
        # The server pings every socket now and then; the client answers (automatically) and sends none itself.
        return await connect(uri, open_timeout=60, ping_interval=None, close_timeout=2, max_queue=4)


async def hold(base_url: str, token: str, count: int, web_pid: int, hold_s: float = 30, concurrency: int = 100,
               expect_refusal: bool = True) -> dict:
    """Open ``count`` sockets, hold them ``hold_s`` seconds (past a server ping), and measure meanwhile."""
    uri = f"{base_url.replace('http', 'ws', 1)}/ws?token={token}"
    loop = asyncio.get_running_loop()
    rss_before = _rss_mb(web_pid)
    gate = asyncio.Semaphore(concurrency)
    started = time.perf_counter()
    results = await asyncio.gather(*(_open(uri, gate) for _ in range(count)), return_exceptions=True)
    open_s = time.perf_counter() - started
    sockets = [r for r in results if not isinstance(r, BaseException)]
    failures = sorted({f"{type(r).__name__}: {r}"[:120] for r in results if isinstance(r, BaseException)})
    out = {"sockets_asked": count, "sockets_open": len(sockets), "open_failures": failures[:5],
           "open_s": round(open_s, 1), "web_rss_before_mb": round(rss_before, 1)}
    try:
        refused = None
        if expect_refusal:
            t0 = time.perf_counter()
            try:
                extra = await connect(uri, open_timeout=30)
                await extra.close()
                refused = {"status": 101}
            except InvalidStatus as exc:
                refused = {"status": exc.response.status_code}
            refused["ms"] = round((time.perf_counter() - t0) * 1000, 1)
        out["one_past_the_limit"] = refused
        probes = []
        deadline = time.monotonic() + hold_s
        while time.monotonic() < deadline:
            probes.append(await loop.run_in_executor(None, _healthz_ms, base_url))
            await asyncio.sleep(max(0.0, min(1.0, deadline - time.monotonic())))
        out["healthz_ms"] = {"max": round(max(probes), 1), "median": round(sorted(probes)[len(probes) // 2], 1),
                             "probes": len(probes)}
        # One of the held sockets, asked after the hold: alive and answering.
        if sockets:
            t0 = time.perf_counter()
            await sockets[0].send(json.dumps({"type": "ping"}))
            out["held_socket_pong"] = json.loads(await asyncio.wait_for(sockets[0].recv(), 30)) == {"type": "pong"}
            out["held_socket_pong_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        out["still_open_after_hold"] = sum(1 for ws in sockets if ws.state.name == "OPEN")
        out["web_rss_with_sockets_mb"] = round(_rss_mb(web_pid), 1)
        out["web_rss_per_socket_kb"] = round((out["web_rss_with_sockets_mb"] - rss_before) * 1024
                                             / max(len(sockets), 1), 1)
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--web-pid", type=int, required=True, help="the gunicorn worker that serves the sockets")
    parser.add_argument("--hold-s", type=float, default=30)
    parser.add_argument("--no-refusal", action="store_true", help="do not try one socket past the count")
    args = parser.parse_args()
    limit = _raise_open_files_limit()
    if limit < args.count + 64:
        print(json.dumps({"error": f"open-files limit {limit} is below {args.count} sockets"}))
        return 1
    result = asyncio.run(hold(args.url, args.token, args.count, args.web_pid, args.hold_s,
                              expect_refusal=not args.no_refusal))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
