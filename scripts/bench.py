"""``make bench``: throughput and latency of the whole stack against a raw-model gauge.

Starts its own Redis, PostgreSQL pair, web server and workers on free loopback
ports, drives the real WebSocket API, and writes docs/benchmarks.md, .json and
.png. Every figure that matters is a ratio of two measurements of this one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jwt
import psutil
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from config.settings import QUANTIZE_MODES, ROOT, Settings
from scripts import loadgen, overload, peers
from scripts.services import (
    PostgresPair,
    free_port,
    migrate,
    scratch_folder,
    settings_env,
    start_launcher,
    start_redis,
    start_web,
)
from workers.launch import usable_cores

logger = logging.getLogger("bench")

NEW_TOKENS = 64
# Overload: offered twice the saturated chats/s of the 16-chat run, for this long (each chat a new visitor).
OVERLOAD_FACTOR, OVERLOAD_S = 2, 60
OVERLOAD_TTFT_P99_S, WEB_RSS_LIMIT_MB, HEALTHZ_LIMIT_MS = 10, 1024, 1000
SITE_ISSUER = "https://bench.site"
TTFT_TOKENS = 4  # replies of the run that measures the time to first token
# A smaller prefill budget than the default, measured beside it: one short prompt a pass instead of a few.
SMALL_BUDGET = 32
# The worker's histograms that trace a request's time to first token (sums and counts, seconds).
TTFT_TRACE = ("chat_time_to_first_token_seconds", "chat_queue_wait_seconds", "chat_engine_first_token_seconds",
              "chat_engine_wait_seconds")
DTYPES = ("float32", "bfloat16")  # the engine's dtypes on a CPU (bfloat16 emulated where the CPU lacks it)
# What scripts.scale adds to the same JSON file from a run of its own (the capacity planner reads it): a run of this
# script keeps it.
SCALE_KEYS = ("capacity", "hosts")


def probe(what: str, threads: int, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "scripts.bench_probe", what, str(threads), *args], cwd=ROOT, check=True,
                         capture_output=True, text=True, env={**settings_env(Settings()), "TQDM_DISABLE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


class Bench:
    def __init__(self, root: Path, quick: bool):
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)
        self.scale = 0.5 if quick else 1.0
        # A quick run gives the quantized probe one round, not its default three.
        self.quantized_rounds = ("1",) if quick else ()
        self.base = Settings(data_dir=root, redis_port=free_port(), primary_port=free_port(),
                             replica_port=free_port(), web_port=free_port(), worker_metrics_port=free_port(),
                             default_max_new_tokens=NEW_TOKENS,
                             max_new_tokens_cap=NEW_TOKENS, log_level="WARNING",
                             # Every chat of a load comes from one guest; the overload's visitors are users of a
                             # site that signs their tokens.
                             guests=True, rate_limit_per_minute=0, guest_rate_per_minute=0,
                             jwt_secret=os.urandom(32).hex(), jwt_issuers=[SITE_ISSUER])
        self.url = f"http://127.0.0.1:{self.base.web_port}"
        self.runs: list[dict] = []
        self.procs = []
        self.pg = PostgresPair(root / "pg", self.base.primary_port, self.base.replica_port, durable=False)

    def n(self, count: int) -> int:
        return max(4, int(count * self.scale))

    def start(self) -> None:
        self.procs.append(start_redis(self.base.redis_port, self.root / "redis", self.logs))
        self.pg.start()
        migrate(self.base.resolved_database_url)
        self.procs.append(start_web(self.base, self.logs))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.pg.stop()

    def workers(self, label: str, count: int, **overrides):
        """Start ``count`` workers through the launcher with the given settings."""
        settings = self.base.model_copy(update={"cpu_workers": count, **overrides})
        client = redis.Redis.from_url(self.base.resolved_redis_url)
        for key in client.scan_iter("worker:*"):
            client.delete(key)
        client.close()
        logger.info("Workers: %s", label)
        proc = start_launcher(settings, self.logs, count)
        self.load(f"{label} warm-up", lambda: loadgen.closed_loop(self.url, count, 2 * count, 8))
        return proc

    def load(self, label: str, fn) -> dict:
        summary = loadgen.summarize(fn())
        summary["label"] = label
        logger.info("%-34s %-10s %6.1f tok/s  ttft p50 %s ms  itl p50 %s ms  errors %d %s", label, summary["offered"],
                    summary["tokens_per_s"], summary["ttft_ms"]["p50"], summary["itl_ms"]["p50"], summary["errors"],
                    summary["error_kinds"] or "")
        if not label.endswith("warm-up"):
            self.runs.append(summary)
        return summary

    def worker_sums(self) -> dict:
        """The first worker's :data:`TTFT_TRACE` histograms: {name: (sum, count)}."""
        text = requests.get(f"http://127.0.0.1:{self.base.worker_metrics_port}/metrics", timeout=10).text
        samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
        return {name: (samples.get(f"{name}_sum", 0.0), samples.get(f"{name}_count", 0.0)) for name in TTFT_TRACE}

    def traced(self, label: str, fn) -> dict:
        """A load, with the mean of each stage of its requests' time to first token (ms) in ``ttft_trace``."""
        before = self.worker_sums()
        run = self.load(label, fn)
        after = self.worker_sums()
        mean = {}
        for name in TTFT_TRACE:
            count = after[name][1] - before[name][1]
            mean[name] = 1000 * (after[name][0] - before[name][0]) / count if count else 0.0
        worker, queue = mean["chat_time_to_first_token_seconds"], mean["chat_queue_wait_seconds"]
        engine, wait = mean["chat_engine_first_token_seconds"], mean["chat_engine_wait_seconds"]
        run["ttft_trace"] = {
            "client": run["ttft_mean_ms"],
            "web_and_relay": run["ttft_mean_ms"] - worker,  # before acceptance, and the first token's way back
            "queue": queue, "before_engine": worker - queue - engine,
            "engine_wait": wait, "prompt_passes": engine - wait,
        }
        run["ttft_trace"] = {k: round(v, 1) for k, v in run["ttft_trace"].items()}
        logger.info("Time to first token, means (ms): %s", run["ttft_trace"])
        return run

    def alternated(self, what: str, setting: str, values: dict) -> dict:
        """The 16-chat load (traced) with each of ``values`` of ``setting`` in turn, twice, a fresh worker each
        time: {name: [run, run]}."""
        runs = {name: [] for name in values}
        for i in range(2):
            for name, value in values.items():
                w = self.workers(f"{what} {value}, 1 worker", 1, **{setting: value})
                runs[name].append(self.traced(f"stack, {what} {value}, run {i + 1}", lambda: (
                    loadgen.closed_loop(self.url, 16, self.n(48), NEW_TOKENS))))
                w.stop()
        return runs

    def web_pid(self) -> int:
        """The gunicorn worker (under its arbiter) that serves the sockets."""
        return psutil.Process(self.procs[-1].pid).children()[0].pid

    def visitor_token(self, i: int) -> str:
        return jwt.encode({"iss": SITE_ISSUER, "sub": f"visitor-{i}", "exp": int(time.time()) + 3600},
                          self.base.jwt_secret, algorithm="HS256")

    def idle_sockets(self) -> dict:
        """As many idle sockets as one web process holds by default, for 30 s, and one more (refused); in a
        process of its own (asyncio), so that the client's memory and files are apart."""
        logger.info("Idle sockets: %d against one web process", self.base.max_sockets)
        out = subprocess.run([sys.executable, "-m", "scripts.sockets", "--url", self.url,
                              "--token", loadgen.guest_token(self.url), "--count", str(self.base.max_sockets),
                              "--web-pid", str(self.web_pid()), "--hold-s", "30"],
                             cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        logger.info("Idle sockets: %s", result)
        return result

    def peers(self, installed: list, dtype: str) -> dict:
        """Each peer server alone (the stack's workers stopped), through its OpenAI-compatible API: C=1, 4, 16."""
        out = {}
        threads = self.base.torch_threads or usable_cores()  # as many as the launcher gives the stack's worker
        for peer in installed:
            if peer.problem:
                out[peer.name] = {"problem": peer.problem}
                continue
            try:
                with peers.serving(peer, self.logs, threads, dtype) as url:
                    self.load(f"{peer.name} warm-up", lambda: loadgen.closed_loop(url, 2, 4, 8, api="peer"))
                    out[peer.name] = {"detail": peer.detail, **{
                        f"c{c}": self.load(peer.name, lambda c=c, n=n: loadgen.closed_loop(url, c, self.n(n),
                                                                                           NEW_TOKENS, api="peer"))
                        for c, n in ((1, 8), (4, 16), (16, 48))}}
                if peer.name == "llama.cpp" and threads > 1:
                    out[peer.name]["c1_one_thread"] = self.llama_cpp_one_thread(peer, dtype)
            except Exception as exc:  # reported, not left out
                logger.error("Peer %s: %s", peer.name, exc)
                out[peer.name] = {"problem": f"did not start or serve: {exc}"}
        return out

    def llama_cpp_one_thread(self, peer, dtype: str) -> dict:
        """llama.cpp's lone request with one thread. With every core its speed flips from one run to the next
        (11-13 ms between tokens in some, 30-36 in others, on the AMX machine measured; its threads wait for one
        another while its server's own Python thread streams each token), with one it kept to 20-21 ms: the stack
        is set against its fastest run either way."""
        detail = peer.detail
        try:
            with peers.serving(peer, self.logs, 1, dtype) as url:
                self.load(f"{peer.name}, 1 thread, warm-up", lambda: loadgen.closed_loop(url, 2, 4, 8, api="peer"))
                return self.load(f"{peer.name}, 1 thread", lambda: loadgen.closed_loop(url, 1, self.n(8), NEW_TOKENS,
                                                                                      api="peer"))
        finally:
            peer.detail = detail

    def overload(self, c16: dict) -> dict:
        """Poisson arrivals at twice the saturated chats/s of the 16-chat run, for a bounded time."""
        capacity = _busy_tps(c16) / (c16["output_tokens"] / c16["completed"])
        rate = round(OVERLOAD_FACTOR * capacity, 2)
        duration = OVERLOAD_S * (0.5 if self.scale < 1 else 1)
        logger.info("Overload: %.2f chats/s (%dx capacity %.2f) for %.0f s", rate, OVERLOAD_FACTOR, capacity, duration)
        result = overload.overload(self.url, rate, duration, NEW_TOKENS, self.visitor_token, self.web_pid())
        result["capacity_per_s"] = round(capacity, 2)
        result["contract"] = overload.contract_holds(result)
        logger.info("Overload: %s", result)
        return result

    def run(self) -> dict:
        out: dict = {}
        logger.info("Peers: installed first (llama.cpp builds from source once), measured beside the stack")
        installed = peers.install()
        logger.info("Gauge (raw forward pass), generate() and the engine, each in a process of its own")
        out["gauge_before"] = probe("gauge", 0)
        logger.info("CPU %s, bfloat16 flags %s: dtype %s (%s)", out["gauge_before"]["cpu_capability"],
                    out["gauge_before"]["cpu_bf16_flags"], out["gauge_before"]["dtype"],
                    out["gauge_before"]["dtype_reason"])
        # Alternated, twice: the machine's speed drifts between probes, a pair is taken close together.
        out["lone_itl_pairs_ms"] = []
        for i in range(2):
            generate, engine = probe("generate", 0), probe("engine", 0)
            out["lone_itl_pairs_ms"].append([round(engine["lone"]["itl_ms"], 2), round(generate["itl_ms"], 2)])
            if i == 0:
                out["generate_alone"], out["engine_alone"] = generate, engine
        logger.info("What batch invariance costs the engine, in each dtype it picks on a CPU")
        out["invariance"] = {dtype: probe("invariance", 0, dtype) for dtype in DTYPES}
        logger.info("Prompts kept across turns: a long conversation's turn 6 with and without")
        out["reuse"] = probe("reuse", 0)
        logger.info("INT8 and INT4 weights against the model's dtype: the factual questions, a lone request, 16 at once")
        out["quantized"] = probe("quantized", 0, *self.quantized_rounds)
        logger.info("A float32 engine's linear layers with float16 weights against float32 ones")
        out["float16"] = probe("float16", 0, *self.quantized_rounds)
        logger.info("A lone decoding pass compiled whole against the engine's eager one")
        out["compiled"] = probe("compiled", 0)
        self.start()
        try:
            w = self.workers("batching, 1 worker", 1)
            out["worker_rss_mb"] = round(sum(rss_mb(c.pid) for c in psutil.Process(w.pid).children()), 1)
            c4 = self.load("stack", lambda: loadgen.closed_loop(self.url, 4, self.n(16), NEW_TOKENS))
            # The 16-chat run twice, with the gauge before, between and after, the worker idle meanwhile:
            # this machine's speed drifts by tens of percent over a few minutes.
            out["gauge_beside_c16"] = [probe("gauge", 0)]
            c16_runs = []
            for label in ("stack", "stack, again"):
                c16_runs.append(self.traced(label, lambda: loadgen.closed_loop(self.url, 16, self.n(48),
                                                                               NEW_TOKENS)))
                out["gauge_beside_c16"].append(probe("gauge", 0))
            c16, out["stack_c16_again"] = c16_runs
            out["poisson"] = [self.load("stack, open loop", lambda r=r: loadgen.poisson(self.url, r, self.n(24),
                                                                                            NEW_TOKENS))
                              for r in (0.5, 1.0, 2.0, 4.0)]
            out["v1"] = {"c16": self.load("stack /v1", lambda: loadgen.closed_loop(self.url, 16, self.n(48),
                                                                                   NEW_TOKENS, api="v1"))}
            out["overload"] = self.overload(c16)
            out["memory"] = {"worker_rss_mb": out["worker_rss_mb"]}
            out["sockets"] = self.idle_sockets()
            # A lone request on each worker kind, the generate() worker's run between two of the batching
            # worker's, close together: the two kinds are compared at one speed of the machine.
            c1 = self.load("stack", lambda: loadgen.closed_loop(self.url, 1, self.n(8), NEW_TOKENS))
            # The stack's share of the time to first token, at idle: many short replies one after another,
            # for a median of more than a handful.
            out["stack_ttft"] = self.load(f"stack, {TTFT_TOKENS}-token replies",
                                          lambda: loadgen.closed_loop(self.url, 1, self.n(32), TTFT_TOKENS))
            out["v1"]["c1"] = self.load("stack /v1", lambda: loadgen.closed_loop(self.url, 1, self.n(8), NEW_TOKENS,
                                                                                 api="v1"))
            out["v1"]["ttft"] = self.load(f"stack /v1, {TTFT_TOKENS}-token replies", lambda: loadgen.closed_loop(
                self.url, 1, self.n(32), TTFT_TOKENS, api="v1"))
            out["stack"] = {"c1": c1, "c4": c4, "c16": c16}
            w.stop()
            # The prefill budget as it was (256 prompt tokens a pass beside decoding rows) and a smaller one (one
            # short prompt a pass, so that chats that finished together start their next turns apart) against the
            # default, and the engine at the worker's priority against the default (CHAT_ENGINE_NICE).
            out["budgets"] = self.alternated("prefill budget", "prefill_tokens_per_pass",
                                             {"256": 256, "default": self.base.prefill_tokens_per_pass,
                                              "small": SMALL_BUDGET})
            out["nice"] = self.alternated("engine nice", "engine_nice", {"0": 0, "default": self.base.engine_nice})
            out["stack_quantized"] = {}
            for mode in QUANTIZE_MODES:
                w = self.workers(f"{mode.upper()} weights, 1 worker", 1, quantize=mode)
                out["stack_quantized"][mode] = {f"c{c}": self.load(f"stack, {mode.upper()} weights", lambda c=c, n=n: (
                    loadgen.closed_loop(self.url, c, self.n(n), NEW_TOKENS))) for c, n in ((1, 8), (16, 48))}
                w.stop()
            out["peers"] = self.peers(installed, out["gauge_before"]["dtype"])

            # Metrics on against off: the same 16-chat load, alternated, a fresh worker each time.
            out["metrics_on_off"] = {"on": [], "off": []}
            for _ in range(2):
                for on in (True, False):
                    w = self.workers(f"metrics {'on' if on else 'off'}", 1, metrics=on)
                    out["metrics_on_off"]["on" if on else "off"].append(self.load(
                        f"metrics {'on' if on else 'off'}",
                        lambda: loadgen.closed_loop(self.url, 16, self.n(48), NEW_TOKENS)))
                    w.stop()

            w = self.workers("generate() baseline, 1 worker", 1, engine="generate", fuse_projections=False)
            b16 = self.load("baseline", lambda: loadgen.closed_loop(self.url, 16, self.n(16), NEW_TOKENS))
            b1 = self.load("baseline", lambda: loadgen.closed_loop(self.url, 1, self.n(8), NEW_TOKENS))
            out["baseline"] = {"c1": b1, "c16": b16}
            w.stop()

            w = self.workers("batching, 1 worker, again", 1)
            out["stack_c1_again"] = self.load("stack, again", lambda: loadgen.closed_loop(self.url, 1, self.n(8),
                                                                                           NEW_TOKENS))
            w.stop()

            w = self.workers("1 worker x 1 thread", 1, torch_threads=1)
            out["one_1t"] = self.load("1 worker x 1 thread", lambda: loadgen.closed_loop(self.url, 16, self.n(48),
                                                                                            NEW_TOKENS))
            w.stop()
            w = self.workers("2 workers x 1 thread", 2, torch_threads=1)
            out["two_1t"] = self.load("2 workers x 1 thread", lambda: loadgen.closed_loop(self.url, 32, self.n(96),
                                                                                             NEW_TOKENS))
            w.stop()
        finally:
            self.stop()
        out["gauge_after"] = probe("gauge", 0)
        out["runs"] = self.runs
        out["ratios"] = ratios(out)
        return out


def _busy_tps(run: dict) -> float:
    """Tokens/s while every chat of a closed-loop run is in flight (the whole run's where it has no such stretch)."""
    return run["saturated_tokens_per_s"] or run["tokens_per_s"]


def _raw16(gauges: list[dict]) -> float:
    return statistics.mean(x["raw_tps16"] for x in gauges)


def ratios(out: dict) -> dict:
    g = out["gauge_before"]
    # While all 16 chats are in flight: the ramp-up and the drain at the ends are not 16 chats.
    c16_runs = (out["stack"]["c16"], out["stack_c16_again"])
    s16 = statistics.mean(_busy_tps(r) for r in c16_runs)
    # The batching worker's lone runs on either side of the generate() worker's.
    lone_itl = round(statistics.mean(r["itl_ms"]["p50"] for r in (out["stack"]["c1"], out["stack_c1_again"])), 1)
    # The machine drifts during a run: the stack is set against the mean of the gauges taken beside its run.
    raw16 = _raw16(out["gauge_beside_c16"])
    return {
        "raw16_mean_tps": round(raw16, 1),
        "stack_c16_over_raw16": round(s16 / raw16, 2),
        "engine_alone16_over_raw16": round(out["engine_alone"]["batch16_tps"] / raw16, 2),
        "lone_itl_engine_over_generate_alone": round(statistics.mean(e / g for e, g in out["lone_itl_pairs_ms"]), 2),
        "lone_itl_stack_over_baseline_stack": round(lone_itl / out["baseline"]["c1"]["itl_ms"]["p50"], 2),
        "stack_c16_over_baseline_c16": round(s16 / _busy_tps(out["baseline"]["c16"]), 2),
        "stack_c16_whole_run_over_raw16": round(statistics.mean(r["tokens_per_s"] for r in c16_runs) / raw16, 2),
        "stack_c16_runs_over_raw16": [round(_busy_tps(r) / _raw16(out["gauge_beside_c16"][i:i + 2]), 2)
                                      for i, r in enumerate(c16_runs)],
        "lone_itl_stack_ms": lone_itl,
        "lone_itl_engine_ms": round(statistics.mean(e for e, _ in out["lone_itl_pairs_ms"]), 1),
        "lone_itl_generate_ms": round(statistics.mean(g for _, g in out["lone_itl_pairs_ms"]), 1),
        "raw_step1_ms": round(g["raw_step1_ms"], 1),
        "lone_itl_stack_over_raw_step1": round(lone_itl / g["raw_step1_ms"], 2),
        "ttft_stack_minus_engine_ms": out["stack_ttft"]["ttft_stack_overhead_ms"]["p50"],
        "ttft_stack_minus_engine_c1_ms": out["stack"]["c1"]["ttft_stack_overhead_ms"]["p50"],
        "two_workers_over_one_1t": round(out["two_1t"]["tokens_per_s"] / out["one_1t"]["tokens_per_s"], 2),
        "gauge_drift_raw16": round(out["gauge_after"]["raw_tps16"] / g["raw_tps16"], 2),
        "raw16_over_raw1": round(g["raw_tps16"] / g["raw_tps1"], 2),
    }


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, name in (("stack", "batching engine"), ("baseline", "generate() per request")):
        runs = out[key]
        xs = [int(r["offered"].split("=")[1]) for r in runs.values()]
        left.plot(xs, [r["tokens_per_s"] for r in runs.values()], "o-", label=name)
        right.plot(xs, [r["ttft_ms"]["p50"] for r in runs.values()], "o-", label=f"{name}, TTFT p50")
        right.plot(xs, [r["itl_ms"]["p50"] for r in runs.values()], "s--", label=f"{name}, ITL p50")
    left.axhline(out["gauge_before"]["raw_tps16"], color="grey", ls=":", label="raw gauge, batch 16")
    left.set(xlabel="concurrent chats", ylabel="output tokens/s", title="Throughput against offered load")
    right.set(xlabel="concurrent chats", ylabel="ms", yscale="log", title="Latency against offered load")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _where_native(out: dict, ok: bool, also: str = "") -> str:
    """A target set for CPUs with native bfloat16: met or not there; elsewhere (float32) not applicable, the
    figure reported (``also`` after it)."""
    if out["gauge_before"]["cpu_bf16_flags"]:
        return _yes(ok)
    return f"n/a: no native bfloat16, reported{also}"


def invariance_section(by_dtype: dict) -> list[str]:
    lines = [
        "## Batch invariance: what it costs", "",
        "`python -m scripts.bench_probe invariance 0 DTYPE`: the engine alone (no stack), 16 slots, five rounds; "
        "in each round one lone request (64 tokens, ITL the median of its gaps) and then 16 requests at once "
        "(32 tokens each), for each way in turn, each way first in its turn: as it runs (the kinds of linear "
        "layer that round a row differently by row count padded to their least rows, or to multiples of the rows "
        "they round alike at, or called on at most the few rows they round alike at, measured at start), "
        "unpadded (no padding or splitting at all: greedy text may then depend on the batch) and the whole pass "
        "padded to two rows instead. Figures are medians over the rounds; a ratio is the median of the rounds' own ratios.", "",
        "| dtype | layers padded (least rows, or multiples) or split (at most; decoding rows apart) | measured at start "
        "| lone ITL ms: as run / unpadded / whole pass | as run / unpadded | 16 at once tok/s: as run / unpadded / whole pass | as run / unpadded |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for dtype, inv in by_dtype.items():
        padded = ", ".join(f"{kind}: {rule}" for kind, rule in inv["padded"].items() if str(rule) != "1") or "none"
        itl, tps = inv["itl_ms"], inv["batch16_tps"]
        whole = "unpadded" if inv["min_rows"] == 1 else f"padded to {inv['min_rows']} rows"
        lines.append(f"| {dtype} ({inv['dtype_reason']}) | {padded}; whole passes {whole} | "
                     f"{inv['measured_at_start_s']} s | {itl['as_run']:.2f} / {itl['unpadded']:.2f} / "
                     f"{itl['whole_pass']:.2f} | {inv['itl_as_run_over_unpadded']:.3f}x | {tps['as_run']:.1f} / "
                     f"{tps['unpadded']:.1f} / {tps['whole_pass']:.1f} | {inv['batch16_as_run_over_unpadded']:.3f}x |")
    return lines


def markdown(out: dict) -> str:
    g, r = out["gauge_before"], out["ratios"]
    lines = [
        "# Benchmarks", "",
        f"Measured by {out.get('command', '`make bench` (`python -m scripts.bench`)')}: the real stack "
        "(gunicorn, Redis, PostgreSQL primary and replica, Celery workers, the model) on loopback, driven through "
        f"the WebSocket API by `scripts/loadgen.py`; greedy, {NEW_TOKENS} new tokens, eight short prompts in turn. "
        "Figures are ratios within this one run: the machine's speed drifts.", "",
        f"- CPU capability `{g['cpu_capability']}`, native bfloat16 flags: {', '.join(g['cpu_bf16_flags']) or 'none'}",
        f"- dtype `{g['dtype']}` ({g['dtype_reason']}), {g['torch_threads']} torch threads, {g['kernels']}",
        "- the engine's own figures come from `python -m scripts.bench_probe engine` (no stack), generate() alone "
        "from `python -m scripts.bench_probe generate` and the gauge from `python -m scripts.bench_probe gauge`, "
        "each in a process of its own; the gauge and the engine load the model as a batching worker does, "
        "generate() as the baseline worker does: the same dtype, threads and prepacked linear layers, with "
        f"transformers' own attention and MLP modules: {out['generate_alone']['kernels']}",
        f"- raw gauge (bare forward pass of that model with transformers' DynamicCache and SDPA, best of three): "
        f"{g['raw_step1_ms']:.1f} ms a step at batch 1 "
        f"({g['raw_tps1']:.1f} tok/s), {g['raw_step16_ms']:.1f} ms at batch 16 ({g['raw_tps16']:.1f} tok/s); "
        f"batch 16 over batch 1: {r['raw16_over_raw1']}x; after the run: {out['gauge_after']['raw_tps16']:.1f} "
        f"tok/s at 16 (drift {r['gauge_drift_raw16']}x)", "",
        "## Targets", "",
        "| figure | measured | target | met |", "| --- | --- | --- | --- |",
        f"| stack at 16 chats, while all 16 are in flight (two runs) / raw gauge at batch 16 (mean of the gauges "
        f"before, between and after them, "
        f"{r['raw16_mean_tps']} tok/s) | {r['stack_c16_over_raw16']}x (each run against the gauges beside it: "
        f"{' and '.join(f'{x}x' for x in r['stack_c16_runs_over_raw16'])}; whole runs with ramp-up and drain: "
        f"{r['stack_c16_whole_run_over_raw16']}x; engine alone, 16 requests: {r['engine_alone16_over_raw16']}x) | "
        f"≥ 0.8x | "
        f"{_yes(r['stack_c16_over_raw16'] >= 0.8)} |",
        f"| stack at 16 chats / generate() baseline at 16 chats | {r['stack_c16_over_baseline_c16']}x | ≥ 8x "
        f"(native bfloat16) | "
        f"{_where_native(out, r['stack_c16_over_baseline_c16'] >= 8)} |",
        f"| lone request ITL p50, engine alone ({r['lone_itl_engine_ms']} ms) / generate() alone, two alternated pairs "
        f"({r['lone_itl_generate_ms']} ms), no stack | {r['lone_itl_engine_over_generate_alone']}x | ≤ 1x | "
        f"{_yes(r['lone_itl_engine_over_generate_alone'] <= 1)} |",
        f"| lone request ITL p50 through the stack, batching worker ({r['lone_itl_stack_ms']} ms, mean of its runs "
        f"right before and after the other's) / generate() worker ({out['baseline']['c1']['itl_ms']['p50']} ms) | "
        f"{r['lone_itl_stack_over_baseline_stack']}x | ≤ 1x | "
        f"{_yes(r['lone_itl_stack_over_baseline_stack'] <= 1)} |",
        f"| lone ITL / raw batch-1 step ({r['raw_step1_ms']} ms) | {r['lone_itl_stack_over_raw_step1']}x | ≤ 1.25x | "
        f"{_yes(r['lone_itl_stack_over_raw_step1'] <= 1.25)} |",
        f"| TTFT through the stack minus the engine's own (per request, from `done.timing`), p50 at C=1, "
        f"{out['stack_ttft']['completed']} requests with {TTFT_TOKENS}-token replies (the {NEW_TOKENS}-token C=1 run: "
        f"{r['ttft_stack_minus_engine_c1_ms']} ms) | "
        f"{r['ttft_stack_minus_engine_ms']} ms | < 15 ms | "
        f"{_yes(r['ttft_stack_minus_engine_ms'] < 15)} |",
        f"| 2 workers x 1 thread / 1 worker x 1 thread, saturated | {r['two_workers_over_one_1t']}x | ≥ 1.6x | "
        f"{_yes(r['two_workers_over_one_1t'] >= 1.6)} |",
        *(f"| lone request ITL p50 with batch invariance / without (engine alone, {dtype}"
          f"{_with_float16(inv)}) | "
          f"{inv['itl_as_run_over_unpadded']:.3f}x | ≤ 1.05x | {_yes(inv['itl_as_run_over_unpadded'] <= 1.05)} |"
          for dtype, inv in out["invariance"].items()),
        "", *invariance_section(out["invariance"]),
        "", "## Every load", "",
        "| run | offered | completed | errors | tok/s | TTFT p50 / p95 / p99 ms | ITL p50 / p95 / p99 ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in out["runs"]:
        t, i = run["ttft_ms"], run["itl_ms"]
        lines.append(f"| {run['label']} | {run['offered']} | {run['completed']}/{run['requests']} | {run['errors']} | "
                     f"{run['tokens_per_s']} | {t['p50']} / {t['p95']} / {t['p99']} | "
                     f"{i['p50']} / {i['p95']} / {i['p99']} |")
    lines += ["", *peers_section(out), "", *quantized_section(out), *float16_section(out), "", *compiled_section(out["compiled"]), "", *reuse_section(out["reuse"]), "", *v1_section(out), "", *metrics_section(out["metrics_on_off"]),
              "", *overload_section(out["overload"]), "", *sockets_section(out["sockets"])]
    lines += ["", "## Memory", "",
              f"- a worker with the model loaded: {out['memory']['worker_rss_mb']} MB resident",
              "", "![throughput and latency against offered load](benchmarks.png)", ""]
    return "\n".join(lines)


def peers_section(out: dict) -> list[str]:
    """The stack against the peer servers started in this run, each alone on the machine."""
    stack = out["stack"]
    lines = ["## Peers, same run", "",
             "Each peer alone (the stack's worker stopped), started by `make bench` from `.venv-peers` "
             "(`scripts/peers.py`) and driven through its OpenAI-compatible API by the same load generator, "
             f"greedy, {NEW_TOKENS} new tokens; the stack through `/ws` just before.", "",
             "| server | C | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | errors |",
             "| --- | --- | --- | --- | --- | --- |"]
    ok = {name: p for name, p in out["peers"].items()
          if "problem" not in p and all(p[f"c{c}"]["completed"] for c in (1, 4, 16))}
    def row(name: str, c: int, run: dict) -> str:
        t, i = run["ttft_ms"], run["itl_ms"]
        return (f"| {name} | {c} | {run['tokens_per_s']} | {t['p50']} / {t['p99']} | {i['p50']} / {i['p99']} "
                f"| {run['errors']} |")

    for name, runs in [("this stack (`/ws`)", stack), *((n, p) for n, p in ok.items())]:
        label = f"{name} ({runs['detail']})" if "detail" in runs else name
        lines += [row(label, c, runs[f"c{c}"]) for c in (1, 4, 16)]
        if "c1_one_thread" in runs:
            lines.append(row(f"{name}, 1 thread", 1, runs["c1_one_thread"]))
    for name, p in out["peers"].items():
        if "problem" in p:
            lines += ["", f"- {name}: not measured here: {p['problem']}"]
        elif name not in ok:
            lines += ["", f"- {name}: started, but completed no request of some load (its log: `{name}.log`)"]
    if not ok:
        return lines
    best_ttft = min(p["c16"]["ttft_ms"]["p50"] for p in ok.values())
    lines += ["", "| figure | measured | target | met |", "| --- | --- | --- | --- |"]
    for name, p in ok.items():
        lines.append(f"| tok/s at 16 chats, stack / {name} | {stack['c16']['tokens_per_s'] / p['c16']['tokens_per_s']:.2f}x "
                     f"| > 1x | {_yes(stack['c16']['tokens_per_s'] > p['c16']['tokens_per_s'])} |")
    if "llama.cpp" in ok:
        # It serves one request at a time: each of its runs measures a lone request's gaps, and its speed may
        # change from one run to the next; the stack is set against the fastest (one thread's too).
        llama = ok["llama.cpp"]
        runs = {f"C={c}": llama[f"c{c}"] for c in (1, 4, 16)}
        if llama.get("c1_one_thread", {}).get("completed"):
            runs["C=1, 1 thread"] = llama["c1_one_thread"]
        at, lone = min(((k, r["itl_ms"]["p50"]) for k, r in runs.items()), key=lambda x: x[1])
        ratio = stack["c1"]["itl_ms"]["p50"] / lone
        lines.append(f"| lone ITL p50, stack / llama.cpp's fastest of its runs ({lone} ms, {at}: one request "
                     f"at a time) | {ratio:.2f}x | ≤ 1x (native bfloat16) | {_where_native(out, ratio <= 1)} |")
        for mode, run in out.get("stack_quantized", {}).items():
            ratio = run["c1"]["itl_ms"]["p50"] / lone
            kept = not out["quantized"]["lost"][mode]
            met = _where_native(out, ratio <= 1 and kept, f" (none lost: {_yes(kept)})")
            lines.append(f"| lone ITL p50, stack with {mode.upper()} weights (`CHAT_QUANTIZE={mode}`) / llama.cpp | "
                         f"{ratio:.2f}x | ≤ 1x, and no right answer lost (below) | {met} |")
    ratio = stack["c16"]["ttft_ms"]["p50"] / best_ttft
    lines.append(f"| TTFT p50 at 16 chats, stack / best peer ({best_ttft} ms) | {ratio:.2f}x | < 0.3x | "
                 f"{_yes(ratio < 0.3)} |")
    budgets = out.get("budgets", {})
    if "small" in budgets:  # the smaller budget's runs, later in the run (below), with what they cost the ITL
        small = budgets["small"]
        ratio = statistics.median(r["ttft_ms"]["p50"] for r in small) / best_ttft
        itl = pair_ratio(small, budgets["default"], lambda r: r["itl_ms"]["p50"])
        lines.append(f"| TTFT p50 at 16 chats with `CHAT_PREFILL_TOKENS_PER_PASS={SMALL_BUDGET}` (median of its "
                     f"{len(small)} runs) / best peer; its ITL p50 / the default's | {ratio:.2f}x; {itl:.2f}x | "
                     f"< 0.3x; ≤ 1.1x | {_yes(ratio < 0.3 and itl <= 1.1)} |")
    return lines + ttft_trace_section(out)


def ttft_trace_section(out: dict) -> list[str]:
    """Where the stack's time to first token goes at 16 chats: means of each stage, from the worker's histograms."""
    runs = [r for r in (out["stack"]["c16"], out.get("stack_c16_again"), *out.get("budgets", {}).get("256", []),
                        *out.get("budgets", {}).get("small", []), *out.get("nice", {}).get("0", []))
            if r and "ttft_trace" in r]
    if not runs:
        return []
    stages = [("web_and_relay", "the web tier before acceptance, and the first token's way back (client less worker)"),
              ("queue", "in the queue: acceptance to a worker's task (`chat_queue_wait_seconds`)"),
              ("before_engine", "in the worker before the engine: the request read, the prompt built"),
              ("engine_wait", "waiting for a cache row: a free slot and the pass under way "
                              "(`chat_engine_wait_seconds`)"),
              ("prompt_passes", "the passes that compute the prompt, up to its first token "
                                "(`chat_engine_first_token_seconds` less the wait)")]
    lines = ["", f"Where the time to first token goes at 16 chats, means over each run's requests (ms); a pass takes "
             f"up to {Settings().prefill_tokens_per_pass} prompt tokens beside decoding rows "
             "(`CHAT_PREFILL_TOKENS_PER_PASS`), more when none decodes:", "",
             "| stage | " + " | ".join(r["label"] for r in runs) + " |", "| --- |" + " --- |" * len(runs)]
    for key, what in stages:
        lines.append(f"| {what} | " + " | ".join(f"{r['ttft_trace'][key]:.1f}" for r in runs) + " |")
    lines.append("| the client's time to first token, mean | " +
                 " | ".join(f"{r['ttft_trace']['client']:.1f}" for r in runs) + " |")
    if "budgets" in out:
        budget = Settings().prefill_tokens_per_pass
        lines += alternated_table(
            out["budgets"]["default"], out["budgets"]["256"], str(budget), "256",
            f"The prefill budget beside decoding rows, {budget} tokens (the default) against 256 (as it was)")
        if "small" in out["budgets"]:
            lines += alternated_table(
                out["budgets"]["small"], out["budgets"]["default"], str(SMALL_BUDGET), str(budget),
                f"A smaller prefill budget, {SMALL_BUDGET} tokens (one of these prompts a pass), against the default "
                f"({budget}), in the same alternation")
    if "nice" in out:
        nice = Settings().engine_nice
        lines += alternated_table(
            out["nice"]["default"], out["nice"]["0"], f"nice {nice}", "nice 0",
            f"The engine thread {nice} below the rest of the host (`CHAT_ENGINE_NICE`, the default) against at the "
            "worker's priority (0)")
    return lines


def pair_ratio(new: list[dict], old: list[dict], pick) -> float:
    """The median of the ratios of runs taken in pairs, close together: ``pick(new[i]) / pick(old[i])``."""
    return statistics.median(pick(a) / pick(b) for a, b in zip(new, old))


def alternated_table(new: list[dict], old: list[dict], new_name: str, old_name: str, what: str) -> list[str]:
    """Two settings on the same 16-chat load, alternated (``old`` first): medians, and the median of the pairs'
    ratios, each pair taken close together."""

    def med(runs: list[dict], pick) -> float:
        return statistics.median(pick(r) for r in runs)

    rows = [("TTFT p50 ms", lambda r: r["ttft_ms"]["p50"], ""),
            ("TTFT mean ms", lambda r: r["ttft_mean_ms"], ""),
            ("TTFT p99 ms", lambda r: r["ttft_ms"]["p99"], ""),
            ("ITL p50 ms", lambda r: r["itl_ms"]["p50"], "≤ 1.1x"),
            ("ITL mean ms (prompt passes among the gaps)", lambda r: r["itl_mean_ms"], ""),
            ("ITL p99 ms", lambda r: r["itl_ms"]["p99"], ""),
            ("tok/s", lambda r: r["tokens_per_s"], "")]
    lines = ["", f"{what}: the same 16-chat load, a fresh worker each, alternated {len(new)} times ({old_name} first); "
             "medians, and the median of the pairs' ratios:", "",
             f"| figure | {new_name} | {old_name} | {new_name} / {old_name} | target |", "| --- | --- | --- | --- | --- |"]
    for name, pick, target in rows:
        r = pair_ratio(new, old, pick)
        met = f"{target}: {_yes(r <= 1.1)}" if target else ""
        lines.append(f"| {name} | {med(new, pick):.1f} | {med(old, pick):.1f} | {r:.2f}x | {met} |")
    return lines


def quantized_section(out: dict) -> list[str]:
    """INT8 and INT4 weights against the model's dtype: engine alone, and through the stack."""
    q = out["quantized"]
    modes = list(q["lost"])
    names = {"int8": "INT8", "int4": "INT4"}
    lines = ["## Quantized weights", "",
             f"`python -m scripts.bench_probe quantized 0 {q['rounds']}`: the engine alone (no stack), 16 slots, "
             f"{q['dtype']}, each engine in a process of its own, with "
             "its linear layers as loaded and prepacked (`CHAT_QUANTIZE=none`, the default"
             + ("; float16 weights where it computes in float32, as below" if "float16" in out else "")
             + "); with INT8 weights, one "
             "scale per output, through `torch.ops.aten._weight_int8pack_mm` (`CHAT_QUANTIZE=int8`); and with INT4 "
             "weights, 16 steps between each group of 32 weights' least and largest (as a Q4_1 file holds them), "
             "through `torch.ops.aten._weight_int4pack_mm_for_cpu` (`CHAT_QUANTIZE=int4`)"
             + (", both computed in bfloat16, their inputs and outputs rounded to it (the kernels' float32 paths "
                "are far slower)" if all("computed in bfloat16" in q["kernels"][m] for m in modes) else "")
             + ". The vocabulary projection keeps the model's dtype in both. First "
             f"the {q['questions']} short factual questions of `scripts/factual_questions.json` (fixed before any "
             "quantized run), greedy; then "
             + (f"in each of {q['rounds']} rounds a lone request's ITL and 16 requests at once on every engine in "
                "turn, medians." if q["rounds"] > 1 else "in one round a lone request's ITL and 16 requests at once "
                "on every engine in turn."), "",
             "| | model's dtype | " + " | ".join(f"{names[m]} weights | {names[m]} / dtype" for m in modes) + " |",
             "| --- | --- | " + " | ".join("--- | ---" for _ in modes) + " |",
             f"| factual questions answered right | {q['right']['none']} | "
             + " | ".join(f"{q['right'][m]} | " for m in modes) + " |",
             f"| lone request ITL p50, engine alone | {q['itl_ms']['none']:.1f} ms | "
             + " | ".join(f"{q['itl_ms'][m]:.1f} ms | {q['itl_over_none'][m]:.2f}x" for m in modes) + " |",
             f"| 16 at once, tok/s, engine alone | {q['batch16_tps']['none']:.1f} | "
             + " | ".join(f"{q['batch16_tps'][m]:.1f} | {q['tps_over_none'][m]:.2f}x" for m in modes) + " |"]
    stacked = out.get("stack_quantized", {})
    if all(m in stacked for m in modes):
        s = out["stack"]
        lines += [f"| lone request ITL p50, through the stack | {s['c1']['itl_ms']['p50']} ms | " + " | ".join(
                      f"{stacked[m]['c1']['itl_ms']['p50']} ms | "
                      f"{stacked[m]['c1']['itl_ms']['p50'] / s['c1']['itl_ms']['p50']:.2f}x" for m in modes) + " |",
                  f"| 16 chats, tok/s, through the stack | {s['c16']['tokens_per_s']} | " + " | ".join(
                      f"{stacked[m]['c16']['tokens_per_s']} | "
                      f"{stacked[m]['c16']['tokens_per_s'] / s['c16']['tokens_per_s']:.2f}x" for m in modes) + " |"]
    if "control_lost" in q:
        lines.append(f"| control: the same weights unquantized in {q['control_dtype']}, answered right | "
                     f"{q['right_control']} | " + " | ".join("|" for _ in modes) + " |")
    lines.append("")
    if "control_lost" in q:
        turned = ", ".join(f"\"{x}\"" for x in q["control_lost"]) or "none"
        lines.append(f"- the control: right in {q['dtype']}, wrong with the same weights in {q['control_dtype']}: "
                     f"{turned}. Such answers turn with rounding alone.")
    for m in modes:
        lost = ", ".join(f"\"{x}\"" for x in q["lost"][m]) or "none"
        gained = ", ".join(f"\"{x}\"" for x in q["gained"][m]) or "none"
        keep = not q["lost"][m] and q["tps_over_none"][m] >= 1 and q["itl_over_none"][m] < 1
        lines += [f"- {names[m]}: right with the model's dtype, wrong with {names[m]} weights: {lost}",
                  f"- {names[m]}: wrong with the model's dtype, right with {names[m]} weights: {gained}"]
        if "lost_in_both" in q:
            both = ", ".join(f"\"{x}\"" for x in q["lost_in_both"][m]) or "none"
            lines.append(f"- {names[m]}: right unquantized in both dtypes, wrong with {names[m]} weights: {both}")
        lines.append(f"- {names[m]}: kept as the default: {_yes(keep)} (only with no right answer lost, a faster "
                     "lone request and 16 chats no slower)")
    return lines


def _with_float16(inv: dict) -> str:
    """What an invariance probe's engine ran where its layers held float16 weights (FBGEMM pads a lone row)."""
    return "; float16 weights: FBGEMM takes a lone row padded to 3" if "float16 weights" in inv.get("kernels", "") else ""


def float16_section(out: dict) -> list[str]:
    """A float32 engine's linear layers with float16 weights (FBGEMM) against float32 ones (oneDNN)."""
    if "float16" not in out:
        return []
    h = out["float16"]
    padded = "; ".join(f"{kind}: {rule}" for kind, rule in h["padded"]["float16"].items()) or "none"
    lost = ", ".join(f"\"{x}\"" for x in h["lost"]) or "none"
    gained = ", ".join(f"\"{x}\"" for x in h["gained"]) or "none"
    engine_dtype = out["gauge_before"]["dtype"]
    return [
        "", "## Float16 weights on a float32 engine", "",
        f"`python -m scripts.bench_probe float16 0 {h['rounds']}`: the engine alone (no stack), 16 slots, each "
        "engine in a process of its own, computing "
        "in float32 (the dtype it picks on a CPU without native bfloat16; it picked "
        f"{engine_dtype} on this one), with its linear layers' weights in float16 through FBGEMM "
        "(`CHAT_FLOAT16_WEIGHTS=auto`, the default; the checkpoint's bfloat16 values, every one kept) against "
        "float32 weights through oneDNN (`off`). The factual questions first, greedy; then "
        + (f"in each of {h['rounds']} rounds a lone request and 16 requests at once on each engine in turn; "
           "medians, and the median of the rounds' own ratios." if h["rounds"] > 1 else
           "in one round a lone request and 16 requests at once on each engine in turn."), "",
        "| figure | float16 weights | float32 weights | float16 / float32 |", "| --- | --- | --- | --- |",
        f"| lone request ITL p50, engine alone | {h['itl_ms']['float16']:.1f} ms | {h['itl_ms']['float32']:.1f} ms "
        f"| {h['itl_ms_ratio']:.2f}x |",
        f"| lone request TTFT, engine alone | {h['ttft_ms']['float16']:.1f} ms | {h['ttft_ms']['float32']:.1f} ms "
        f"| {h['ttft_ms_ratio']:.2f}x |",
        f"| 16 at once, tok/s, engine alone | {h['batch16_tps']['float16']:.1f} | {h['batch16_tps']['float32']:.1f} "
        f"| {h['batch16_tps_ratio']:.2f}x |",
        f"| factual questions answered right | {h['right']['float16']} | {h['right']['float32']} | |",
        f"| greedy replies to them the same word for word | {h['same_replies']} of {h['questions']} | | |", "",
        f"- right with float32 weights, wrong with float16 ones: {lost}",
        f"- wrong with float32 weights, right with float16 ones: {gained}",
        f"- FBGEMM's float16 layers padded to (rows a call takes, for batch invariance): {padded}",
    ]


def compiled_section(c: dict) -> list[str]:
    return [
        "## Compiling the decoding pass", "",
        "`python -m scripts.bench_probe compiled 0`: the lean pass of one decoding row (the lone request's step), "
        "compiled whole by `torch.compile` (inductor, freezing: one graph, every weight a constant it prepacks "
        f"itself) against the engine's eager pass on its prepacked layers, {c['dtype']}, alternated over 10 rounds "
        "of 20 passes.", "",
        "| figure | measured |", "| --- | --- |",
        f"| compile time (2 threads, one row count, one span) | {c['compile_s']:.1f} s |",
        f"| memory the compiled pass added | {c['memory_mb']:.0f} MB |",
        f"| lone pass, compiled / eager | {c['compiled_ms']:.1f} ms / {c['eager_ms']:.1f} ms = "
        f"{c['compiled_over_eager']:.2f}x |",
        f"| logits bit for bit the eager pass's | {_yes(c['bit_for_bit'])} (largest difference "
        f"{c['max_logit_difference']:.3g}; same greedy token: {_yes(c['same_greedy_token'])}) |", "",
        ("The engine does not compile: here the compiled pass was no faster (a lone pass is mostly one read of "
         "the weights, which compiling leaves as it is)" if c["compiled_over_eager"] >= 0.95 else
         "The compiled pass was faster here; the engine still does not compile") +
        ", and a pass that rounds otherwise than the eager one would give a request different text alone (the "
        "one row count compiled) than in a batch, unless every row count and span were compiled alike.",
    ]


def reuse_section(r: dict) -> list[str]:
    on, off = r["load_on"], r["load_off"]
    return [
        "## Prompts kept across turns", "",
        f"`python -m scripts.bench_probe reuse 0`: the engine alone (no stack), 16 slots, {r['dtype']}; one engine "
        f"keeping prompts (`CHAT_PREFIX_CACHE_MB={r['prefix_cache_mb']:g}`), one not (`0`), nothing else changed, each in "
        "a process of its own as in a worker, "
        f"taken in turn (each first in turn; first turns prompt by prompt), {r['rounds']} rounds, medians. Turn 6 of a conversation whose history is "
        f"{r['history_tokens']} tokens (five turns, the model's own replies of up to 200 tokens); turn 5 served by "
        "the same engine just before, as affinity sends it, and its reply computed again to be kept (the engine "
        "does so when it has nothing else to do, one 128-token piece a pass: a request that comes meanwhile waits "
        "that one pass at most).", "",
        "| time to first token | kept | computed whole | whole / kept | target |", "| --- | --- | --- | --- | --- |",
        f"| turn 6, alone | {r['ttft_on_alone_ms']:.0f} ms | {r['ttft_off_alone_ms']:.0f} ms | "
        f"{r['alone_off_over_on']:.2f}x | ≥ 5x: {_yes(r['alone_off_over_on'] >= 5)} |",
        f"| turn 6, beside 15 chats decoding | {r['ttft_on_beside15_ms']:.0f} ms | {r['ttft_off_beside15_ms']:.0f} ms "
        f"| {r['beside15_off_over_on']:.2f}x | ≥ 5x: {_yes(r['beside15_off_over_on'] >= 5)} |",
        f"| first turns (short prompts), alone, the engine idle before each | {r['ttft_on_first_turn_ms']:.1f} ms | "
        f"{r['ttft_off_first_turn_ms']:.1f} ms | {r['first_turn_off_over_on']:.2f}x | no slower: "
        f"{_yes(r['first_turn_off_over_on'] >= 0.95)} (within 5%) |", "",
        f"A mixed load: {on['chats']} conversations at once, {on['turns']} turns each of the short prompts, "
        f"{NEW_TOKENS}-token replies. Kept: {on['hit_rate']:.0%} of prompts started from a kept one, "
        f"{on['reused_share']:.0%} of all prompt tokens were taken rather than computed (short turns have few "
        f"whole 128-token pieces); TTFT p50 of the later turns {on['later_ttft_p50_ms']:.0f} ms, against "
        f"{off['later_ttft_p50_ms']:.0f} ms computed whole.",
    ]


def v1_section(out: dict) -> list[str]:
    ws, v1 = out["stack"], out["v1"]

    def row(name: str, run: dict) -> str:
        t, i = run["ttft_ms"], run["itl_ms"]
        return (f"| {name} | {run['offered']} | {t['p50']} / {t['p99']} | {i['p50']} / {i['p99']} | "
                f"{run['tokens_per_s']} | {run['errors']} |")

    share_ws, share_v1 = out["stack_ttft"]["ttft_stack_overhead_ms"]["p50"], v1["ttft"]["ttft_stack_overhead_ms"]["p50"]
    return [
        "## The OpenAI-compatible API against the WebSocket", "",
        f"The same loads through `POST /v1/chat/completions` with `stream: true` (server-sent events, read with "
        f"`requests`), next to the WebSocket's. The stack's share of the time to first token is the client's TTFT "
        f"minus the engine's own (the WebSocket's `done.timing`; the last chunk's `timing` on `/v1`), p50 over "
        f"{v1['ttft']['completed']} requests with {TTFT_TOKENS}-token replies at C=1.", "",
        "| API | load | TTFT p50 / p99 ms | ITL p50 / p99 ms | tok/s | errors |",
        "| --- | --- | --- | --- | --- | --- |",
        row("/ws", ws["c1"]), row("/v1 SSE", v1["c1"]), row("/ws", ws["c16"]), row("/v1 SSE", v1["c16"]), "",
        "| figure | measured | target | met |", "| --- | --- | --- | --- |",
        f"| the stack's share of TTFT, /ws | {share_ws} ms | < 15 ms | "
        f"{_yes(share_ws is not None and share_ws < 15)} |",
        f"| the stack's share of TTFT, /v1 SSE | {share_v1} ms | < 15 ms | "
        f"{_yes(share_v1 is not None and share_v1 < 15)} |",
    ]


def metrics_section(runs: dict) -> list[str]:
    on = [_busy_tps(r) for r in runs["on"]]
    off = [_busy_tps(r) for r in runs["off"]]
    ratio = statistics.mean(on) / statistics.mean(off)
    return [
        "## Metrics on against off", "",
        "The 16-chat load on a fresh worker with its metrics on (`CHAT_METRICS=true`: every request's histograms "
        "and counters, a histogram observation per piece of text) and off, alternated twice: "
        f"on {', '.join(f'{x:.1f}' for x in on)} tok/s, off {', '.join(f'{x:.1f}' for x in off)} tok/s "
        "(while all 16 chats are in flight).", "",
        "| figure | measured | target | met |", "| --- | --- | --- | --- |",
        f"| throughput with metrics on / off | {ratio:.3f}x | within 3% (≥ 0.97x) | {_yes(ratio >= 0.97)} |",
    ]


def overload_section(o: dict) -> list[str]:
    t, h, m = o["ttft_ms"], o["healthz_ms"], o["web_rss_mb"]
    refused = ", ".join(f"{n} `{code}`" for code, n in o["refused"].items()) or "none"
    return [
        "## Overload: twice what the stack serves", "",
        f"Capacity: {o['capacity_per_s']} chats/s, the saturated rate of the 16-chat run above. Offered "
        f"{o['offered_per_s']} chats/s ({OVERLOAD_FACTOR}x) for {o['duration_s']} s as Poisson arrivals "
        f"({o['arrivals']} chats, {o['arrived_per_s']}/s arrived), each a new visitor with a token of its own "
        f"opening its socket on arrival; default admission settings (`CHAT_MAX_QUEUE_WAIT_S`, "
        f"`CHAT_MAX_QUEUE_DEPTH`). `python -m scripts.bench` (the `overload` step), `scripts/overload.py`.", "",
        "| figure | measured | target | met |", "| --- | --- | --- | --- |",
        f"| connections answered (handshakes: {o['handshakes']}) | "
        f"{sum(n for k, n in o['handshakes'].items() if k == 'open' or k.startswith('refused'))}/{o['arrivals']} | "
        f"all | {_yes(o['contract']['every connection answered'])} |",
        f"| accepted chats completed | {o['completed']}/{o['accepted']} | all | "
        f"{_yes(o['contract']['every accepted chat completed'])} |",
        f"| refusals ({'; '.join(f'{k}: {n}' for k, n in o['refusal_reasons'].items()) or 'none'}) | {refused} | "
        f"only `busy`/`rate_limited` | {_yes(o['contract']['every refusal busy, rate_limited or 503'])} |",
        f"| TTFT of accepted chats, p50 / p95 / p99 / max ms | {t['p50']} / {t['p95']} / {t['p99']} / {t['max']} | "
        f"p99 ≤ {OVERLOAD_TTFT_P99_S * 1000} | "
        f"{_yes(t['p99'] is not None and t['p99'] <= OVERLOAD_TTFT_P99_S * 1000)} |",
        f"| `/healthz` p50 / p99 / max ms, failures | {h['p50']} / {h['p99']} / {h['max']}, "
        f"{o['healthz_failures']} | max ≤ {HEALTHZ_LIMIT_MS}, none failed | "
        f"{_yes(o['healthz_failures'] == 0 and h['max'] is not None and h['max'] <= HEALTHZ_LIMIT_MS)} |",
        f"| web process RSS p50 / max MB | {m['p50']} / {m['max']} | ≤ {WEB_RSS_LIMIT_MB} | "
        f"{_yes(m['max'] is not None and m['max'] <= WEB_RSS_LIMIT_MB)} |",
    ]


def sockets_section(s: dict) -> list[str]:
    past = s.get("one_past_the_limit") or {}
    return [
        "## Idle sockets held by one web process", "",
        f"`python -m scripts.sockets` (asyncio, its own process) opened {s['sockets_asked']} WebSockets against one "
        f"gunicorn gevent worker with the default `CHAT_MAX_SOCKETS`, held them 30 s (past the server's 25 s "
        f"ping), asked `/healthz` meanwhile, then one more socket.", "",
        "| figure | measured | target | met |", "| --- | --- | --- | --- |",
        f"| sockets open, and still open after the hold | {s['sockets_open']}, {s['still_open_after_hold']} "
        f"(opened in {s['open_s']} s) | {s['sockets_asked']} | "
        f"{_yes(s['sockets_open'] == s['still_open_after_hold'] == s['sockets_asked'])} |",
        f"| web process RSS: idle, with the sockets (per socket) | {s['web_rss_before_mb']} MB, "
        f"{s['web_rss_with_sockets_mb']} MB ({s['web_rss_per_socket_kb']} KB) | ≤ {WEB_RSS_LIMIT_MB} MB | "
        f"{_yes(s['web_rss_with_sockets_mb'] <= WEB_RSS_LIMIT_MB)} |",
        f"| one socket past the limit | HTTP {past.get('status')} in {past.get('ms')} ms | 503 at once | "
        f"{_yes(past.get('status') == 503)} |",
        f"| `/healthz` while holding them, median / max ms ({s['healthz_ms']['probes']} probes) | "
        f"{s['healthz_ms']['median']} / {s['healthz_ms']['max']} | max ≤ {HEALTHZ_LIMIT_MS} | "
        f"{_yes(s['healthz_ms']['max'] <= HEALTHZ_LIMIT_MS)} |",
        f"| a held socket's `ping` answered after the hold | {s.get('held_socket_pong')} "
        f"({s.get('held_socket_pong_ms')} ms) | yes | {_yes(bool(s.get('held_socket_pong')))} |",
    ]


def with_scale(out: dict, path: Path) -> dict:
    """``out`` and the figures of :data:`SCALE_KEYS` that ``path`` holds from scripts.scale's last run."""
    earlier = json.loads(path.read_text()) if path.exists() else {}
    return {**out, **{key: earlier[key] for key in SCALE_KEYS if key in earlier}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--quick", action="store_true",
                        help="half the requests per load, one round of the quantized probe")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    with scratch_folder("chat-bench-") as root:
        out = Bench(root, args.quick).run()
    given = sys.argv[1:] if argv is None else argv
    if given:  # a run other than `make bench`'s own says how it was made
        out["command"] = f"`python -m scripts.bench {' '.join(given)}`"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "benchmarks.json"
    out = with_scale(out, path)
    path.write_text(json.dumps(out, indent=2))
    plot(out, args.out / "benchmarks.png")
    (args.out / "benchmarks.md").write_text(markdown(out))
    print(json.dumps(out["ratios"], indent=2))
    print(f"wrote {args.out / 'benchmarks.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
