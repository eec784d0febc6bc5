"""Adding worker hosts, measured: ``python -m scripts.scale`` (run by ``make bench`` after scripts/bench.py).

The stack (Redis, the PostgreSQL pair, the web tier) listens on a bridge with passwords; worker hosts join it
from network namespaces of their own (scripts/hosts.py), each pinned to a core of its own (``taskset``) with one
torch thread. It measures:

- one host: the time from its start to its first served request, its dispatch time at idle, and its capacity
  with every slot busy: what the capacity planner (scripts/plan.py) reads;
- Poisson arrivals at 50% and 90% of that capacity: the mean queue wait (the workers' own
  ``chat_queue_wait_seconds``) against the planner's prediction;
- two hosts saturated against one, and the second host's start to its first served request.

It adds ``capacity`` and ``hosts`` to docs/benchmarks.json and writes docs/scaling.md. Needs root (namespaces).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from app import streams
from config.settings import DEFAULT_MODEL, ROOT, Settings
from scripts import loadgen
from scripts.hosts import Host, Network, join_env
from scripts.plan import Capacity, plan, predict, report
from scripts.services import PostgresPair, free_port, migrate, scratch_folder, start_redis, start_web
from workers.cpu import describe

logger = logging.getLogger("scale")

NEW_TOKENS = 64  # as scripts/bench.py's loads
LOADS = (0.5, 0.9)  # of the measured capacity
# An open-loop run: arrivals for about SETTLE_S + OPEN_LOOP_S seconds, its queue wait measured over the requests
# served after SETTLE_S (near 90% utilization a queue that starts empty needs about a minute to reach its steady
# state).
SETTLE_S = 40
OPEN_LOOP_S = 90
METRICS_PORT = 9400  # each host serves its worker's metrics on its own address


class Scale:
    def __init__(self, root: Path, quick: bool):
        self.root, self.scale = root, 0.5 if quick else 1.0
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)
        self.net = Network(2)
        self.settings = Settings(
            data_dir=root, host=self.net.server, redis_port=free_port(), primary_port=free_port(),
            replica_port=free_port(), web_port=free_port(), redis_password=os.urandom(12).hex(),
            db_password=os.urandom(12).hex(), secret_key=os.urandom(24).hex(), model=DEFAULT_MODEL,
            default_max_new_tokens=NEW_TOKENS, max_new_tokens_cap=NEW_TOKENS, log_level="WARNING", guests=True,
            rate_limit_per_minute=0, guest_rate_per_minute=0, max_queue_depth=10000, max_queue_wait_s=0)
        self.url = f"http://127.0.0.1:{self.settings.web_port}"
        self.procs = []
        self.hosts: list[Host] = []
        self.pg = PostgresPair(root / "pg", self.settings.primary_port, self.settings.replica_port, durable=False,
                               bind=self.net.server, password=self.settings.db_password)

    def start(self) -> None:
        s = self.settings
        self.procs.append(start_redis(s.redis_port, self.root / "redis", self.logs, s.resolved_bind,
                                      s.redis_password))
        self.pg.start()
        migrate(s.resolved_database_url)
        self.procs.append(start_web(s, self.logs))

    def stop(self) -> None:
        for host in self.hosts:
            host.stop()
        for proc in reversed(self.procs):
            proc.stop()
        self.pg.stop()
        self.net.remove()

    def host(self, i: int) -> tuple[Host, float]:
        """Start host ``i`` on core ``i`` while chats wait in the queue (more than the running hosts' slots): the
        host and the seconds from its start to its first request taken."""
        host = Host(self.root / "hosts", f"host-{i + 1}", self.net.namespaces[i],
                    join_env(self.settings, CHAT_TORCH_THREADS="1", CHAT_BIND="0.0.0.0",
                             CHAT_WORKER_METRICS_PORT=str(METRICS_PORT)),
                    cpus=str(i % (os.cpu_count() or 1)))  # core i
        self.hosts.append(host)
        chats = (i + 1) * self.settings.max_batch
        waiting = threading.Thread(target=loadgen.closed_loop, args=(self.url, chats, 8 * chats, 32))
        waiting.start()
        time.sleep(2)  # every slot of the hosts already running is busy, and chats wait
        started = time.perf_counter()
        host.start()
        deadline = time.monotonic() + 300
        while self.metric(self.net.addresses[i], "chat_requests_in_flight", "chat_requests_served_total") == 0:
            if time.monotonic() > deadline or host.proc.poll() is not None:
                raise RuntimeError(f"{host.name} took no request:\n{host.tail()}")
            time.sleep(0.05)
        took = time.perf_counter() - started
        logger.info("%s: first request taken %.1f s after its start", host.name, took)
        waiting.join()
        self.wait_live(len(self.hosts))
        return host, took

    def metric(self, address: str, *names: str) -> float:
        """The sum of the samples so named (all labels) of the worker at ``address``; 0 before it serves any."""
        try:
            text = requests.get(f"http://{address}:{METRICS_PORT}/metrics", timeout=2).text
        except requests.RequestException:
            return 0.0
        return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                   if sample.name in names)

    def wait_live(self, count: int) -> None:
        client = streams.connect(self.settings.resolved_redis_url, max_connections=1)
        try:
            deadline = time.monotonic() + 120
            while len(streams.live_workers(client, self.settings.queue)) < count:
                if time.monotonic() > deadline:
                    raise RuntimeError("hosts not live:\n" + "\n".join(h.tail() for h in self.hosts))
                time.sleep(0.2)
        finally:
            client.close()

    def queue_wait(self) -> tuple[float, float]:
        """The hosts' ``chat_queue_wait_seconds``: sum and count over all of them."""
        addresses = self.net.addresses[:len(self.hosts)]
        return (sum(self.metric(a, "chat_queue_wait_seconds_sum") for a in addresses),
                sum(self.metric(a, "chat_queue_wait_seconds_count") for a in addresses))

    def load(self, label: str, fn, settle_s: float = 0) -> tuple[dict, loadgen.Run, float]:
        """Run a load; its summary, its samples and the mean queue wait of its requests (of those served after
        the first ``settle_s`` seconds: a queue that starts empty takes a while to reach its steady state)."""
        result: list[loadgen.Run] = []
        running = threading.Thread(target=lambda: result.append(fn()))
        running.start()
        time.sleep(settle_s)
        before = self.queue_wait()
        running.join()
        run = result[0]
        after = self.queue_wait()
        served = after[1] - before[1]
        wait = (after[0] - before[0]) / served if served else float("nan")
        summary = loadgen.summarize(run)
        summary["label"], summary["mean_queue_wait_ms"] = label, round(wait * 1000, 1)
        logger.info("%-28s %-12s %6.1f tok/s (saturated %s)  ttft p50 %s ms  queue wait %.1f ms  errors %d", label,
                    summary["offered"], summary["tokens_per_s"], summary["saturated_tokens_per_s"],
                    summary["ttft_ms"]["p50"], wait * 1000, summary["errors"])
        return summary, run, wait

    def n(self, count: int) -> int:
        return max(8, int(count * self.scale))

    def run(self) -> dict:
        out: dict = {"cpu": describe(), "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        slots = self.settings.max_batch
        cores = sorted(os.sched_getaffinity(0))
        # The stack and the load generator on the last core, host i on core i: one host has a core to itself; the
        # second shares the last with the stack.
        os.sched_setaffinity(0, {cores[-1]})
        out["cores"] = len(cores)
        self.start()
        try:
            first_served = [self.host(0)[1]]
            self.load("warm-up", lambda: loadgen.closed_loop(self.url, slots, slots, 8))
            idle, _, _ = self.load("1 host, C=1", lambda: loadgen.closed_loop(self.url, 1, self.n(24), 4))
            one, one_run, _ = self.load("1 host, saturated", lambda: loadgen.closed_loop(
                self.url, slots, self.n(64), NEW_TOKENS))
            # The first token with every slot busy: chats that start spread over one reply's time, as arrivals
            # do (started together, replies of one length start and end in waves).
            reply_s = statistics.fmean(s.done - s.sent for s in one_run.samples if s.done and not s.error)
            spread, spread_run, _ = self.load("1 host, saturated, spread", lambda: loadgen.closed_loop(
                self.url, slots, self.n(64), NEW_TOKENS, stagger_s=reply_s / slots))
            # Each row's speed with half the slots busy (a decoding step costs less with fewer rows), and the
            # dispatch time while the worker is busy but has a slot free.
            half, half_run, dispatch = self.load("1 host, half the slots", lambda: loadgen.closed_loop(
                self.url, slots // 2, self.n(48), NEW_TOKENS, stagger_s=reply_s / slots))
            # What it serves with every slot busy and chats waiting: twice as many chats as slots, their starts
            # spread, so that each reply begins when one ends, at random phases, as under random arrivals.
            over, over_run, _ = self.load("1 host, 2x slots, spread", lambda: loadgen.closed_loop(
                self.url, 2 * slots, self.n(160), NEW_TOKENS, stagger_s=reply_s / slots / 2))
            cap, reply_tokens = capacity(over, over_run, spread_run, half_run, dispatch, slots, out["cpu"],
                                         out["when"])
            per_s = cap.chats_per_s(reply_tokens)
            logger.info("One host: %.2f chats/s of %.1f tokens (%s)", per_s, reply_tokens, cap)
            validation = []
            for load in LOADS:
                rate = round(load * per_s, 3)
                total = self.n(int(rate * (SETTLE_S + OPEN_LOOP_S)))
                summary, _, measured = self.load(f"1 host, {load:.0%} of capacity", lambda: loadgen.poisson(
                    self.url, rate, total, NEW_TOKENS, seed=11), settle_s=SETTLE_S * self.scale)
                expected = predict(cap, rate, reply_tokens, 1)
                validation.append({"load": load, "rate_per_s": rate, "requests": total,
                                   "predicted_mean_wait_ms": round(expected.mean_wait_s * 1000, 1),
                                   "measured_mean_wait_ms": round(measured * 1000, 1),
                                   "error": round(expected.mean_wait_s / measured - 1, 3) if measured else None,
                                   "ttft_ms": summary["ttft_ms"], "errors": summary["errors"]})
                logger.info("Planner at %.0f%%: predicted %.1f ms, measured %.1f ms", load * 100,
                            expected.mean_wait_s * 1000, measured * 1000)
            # One host saturated again, close in time to the two: the machine's speed drifts over minutes.
            one_again, _, _ = self.load("1 host, saturated, again", lambda: loadgen.closed_loop(
                self.url, slots, self.n(96), NEW_TOKENS, stagger_s=reply_s / slots))
            first_served.append(self.host(1)[1])
            self.load("warm-up, 2 hosts", lambda: loadgen.closed_loop(self.url, 2 * slots, 2 * slots, 8))
            two, _, _ = self.load("2 hosts, saturated", lambda: loadgen.closed_loop(
                self.url, 2 * slots, self.n(192), NEW_TOKENS, stagger_s=reply_s / slots / 2))
        finally:
            self.stop()
        ratio = two["saturated_tokens_per_s"] / one_again["saturated_tokens_per_s"]
        logger.info("2 hosts / 1 host, saturated: %.2fx", ratio)
        out["capacity"] = {"worker": cap.__dict__, "reply_tokens": reply_tokens, "chats_per_s": round(per_s, 3),
                           "idle": idle, "over": over, "spread": spread, "half": half, "saturated": one,
                           "validation": validation}
        out["hosts"] = {"one": one_again, "one_earlier": one, "two": two, "two_over_one": round(ratio, 2),
                        "first_served_s": first_served}
        return out


def capacity(over: dict, over_run: loadgen.Run, spread: loadgen.Run, half: loadgen.Run, dispatch: float,
             slots: int, cpu: str, when: str) -> tuple[Capacity, float]:
    """One worker's figures, and the mean reply length: its rate from the run with chats waiting (while every
    chat had a request in flight: every slot busy), its first token from the spread run (every slot busy, no
    queue), its rows' speed with half the slots busy from the half run."""
    done = [s for s in over_run.samples if s.done is not None and s.error is None and s.token_times]
    reply_tokens = statistics.fmean(s.completion_tokens for s in done)
    held = slots * reply_tokens / over["saturated_tokens_per_s"]  # a reply's time in its slot (Little's law)
    first = [s for s in spread.samples if s.done is not None and s.error is None and s.token_times]
    ttft = sorted(s.token_times[0] - s.sent for s in first)
    first_token = max(0.0, statistics.median(ttft) - dispatch)
    p99 = ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]
    spans = [s.done - s.token_times[0] for s in done]  # first token to the end: decoding, spread by the length
    half_held = statistics.fmean(s.done - s.sent for s in half.samples if s.done is not None and s.error is None)
    cap = Capacity(slots=slots, row_tokens_per_s=round((reply_tokens - 1) / max(1e-3, held - first_token), 2),
                   half_row_tokens_per_s=round((reply_tokens - 1) / max(1e-3, half_held - dispatch - first_token), 2),
                   first_token_s=round(first_token, 4), first_token_p99_s=round(max(0.0, p99 - dispatch), 4),
                   dispatch_s=round(dispatch, 4),
                   service_cv2=round(statistics.pvariance(spans) / statistics.fmean(spans) ** 2, 4),
                   measured=f"{when}, {cpu.split(';')[0]}, 1 core, 1 thread")
    return cap, round(reply_tokens, 1)


def markdown(out: dict) -> str:
    cap, hosts = out["capacity"], out["hosts"]
    w = cap["worker"]
    lines = [
        "# Adding worker hosts",
        "",
        f"Measured by `python -m scripts.scale` (part of `make bench`) on {out['when']}: {out['cpu']}.",
        "",
        "The stack (Redis, the PostgreSQL primary and replica, the web tier) listens on a bridge with passwords;"
        " each worker host runs in a network namespace of its own with its own data folder, HOME, TMPDIR and"
        " copy of the model, joined with the join settings only (scripts/hosts.py), pinned to a core of its own"
        " (`taskset`) with one torch thread. The web tier, the databases and the load generator are pinned to the"
        f" last of this machine's {out['cores']} cores: one host has its core to itself, and on two cores the"
        " second host shares the stack's.",
        "",
        "## One host against two, saturated",
        "",
        "| hosts | chats at once | output tokens/s (saturated) | TTFT p50 | inter-token p50 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for n, run in (("1", hosts["one"]), ("2", hosts["two"])):
        lines.append(f"| {n} | {run['offered']} | {run['saturated_tokens_per_s']} | {run['ttft_ms']['p50']} ms | "
                     f"{run['itl_ms']['p50']} ms |")
    first = ", ".join(f"{s:.1f} s" for s in hosts["first_served_s"])
    lines += [
        "",
        f"Two hosts serve **{hosts['two_over_one']}x** what one serves (the one-host run just before the"
        f" second host started; an earlier one made {hosts['one_earlier']['saturated_tokens_per_s']} tokens/s: this"
        " machine's speed drifts over minutes).",
        "",
        f"From a worker host's start (its launcher, the model loaded from its folder) to its first request taken"
        f" (chats waiting in the queue meanwhile): {first} (first host, second host).",
        "",
        "## The capacity planner against the real stack",
        "",
        f"One worker, measured: {w['slots']} slots; its rate with chats waiting ({cap['over']['offered']}, twice its"
        f" slots, their starts spread: every slot busy, each reply starting as one ends) {cap['chats_per_s']} chats/s of"
        f" {cap['reply_tokens']} tokens, so each row decodes {w['row_tokens_per_s']} tokens/s"
        f" ({w['half_row_tokens_per_s']} with half the slots busy: {cap['half']['offered']}); its first token"
        f" {w['first_token_s'] * 1000:.0f} ms (p99 {w['first_token_p99_s'] * 1000:.0f} ms) with every slot busy"
        f" (as many chats as slots, their starts spread over one reply's time); dispatch"
        f" {w['dispatch_s'] * 1000:.1f} ms with half the slots busy ({cap['idle']['mean_queue_wait_ms']} ms at"
        f" idle); the decoding times' cv^2 {w['service_cv2']}. `python -m scripts.plan` reads these figures from"
        " `docs/benchmarks.json`.",
        "",
        "Poisson arrivals at a share of that capacity, against what the planner predicts for them (mean queue"
        " wait: from acceptance to a worker starting on the request, the workers' own"
        f" `chat_queue_wait_seconds`, over the requests served after the first {SETTLE_S} s of each run):",
        "",
        "| load | chats/s | requests | predicted mean wait | measured mean wait | error | TTFT p50 / p99 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v in cap["validation"]:
        error = "-" if v["error"] is None else format(v["error"], "+.0%")
        lines.append(f"| {v['load']:.0%} | {v['rate_per_s']} | {v['requests']} | {v['predicted_mean_wait_ms']} ms | "
                     f"{v['measured_mean_wait_ms']} ms | {error} | {v['ttft_ms']['p50']} / {v['ttft_ms']['p99']} ms |")
    lines += ["", "Near full use, a queue's wait is most sensitive to the capacity it is measured against: at 90%, a"
              " capacity 10% higher than the one measured divides the wait of a 16-slot worker by three (Erlang C), and this machine's"
              " speed moves by tens of percent over minutes (compare the two one-host runs above); the planner's"
              " error there says mostly how far the machine's speed moved between the capacity run and the"
              " open-loop one. Plan with figures measured on the machines you deploy, and with headroom"
              " (`--max-utilization`, 85% by default)."]
    rate, tokens = max(0.1, round(cap["chats_per_s"] * 1.5, 1)), cap["reply_tokens"]
    worker = Capacity(**w)
    lines += ["", f"For example, `python -m scripts.plan --rate {rate} --reply-tokens {tokens} --ttft-p99 2`:", "",
              "```", report(worker, rate, tokens, 2.0, plan(worker, rate, tokens, 2.0)), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--quick", action="store_true", help="half the requests per load")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    with scratch_folder("chat-scale-") as root:
        out = Scale(root, args.quick).run()
    path = args.out / "benchmarks.json"
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update({"capacity": out["capacity"], "hosts": {**out["hosts"], "cpu": out["cpu"], "when": out["when"]}})
    path.write_text(json.dumps(merged, indent=2))
    (args.out / "scaling.md").write_text(markdown(out))
    print(f"wrote {args.out / 'scaling.md'}; two hosts over one: {out['hosts']['two_over_one']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
