"""How many workers a load needs: ``python -m scripts.plan --rate R --reply-tokens N [--ttft-p99 S]``.

It reads what one worker was measured to do (the ``capacity`` that ``make bench`` writes into
docs/benchmarks.json): its slots (``CHAT_MAX_BATCH``: requests it decodes together), how fast each row decodes
with every slot busy and with half of them, its first token and the dispatch time from acceptance to a worker
that has a slot free. A reply of N tokens holds a slot for S(m) = first token + (N - 1) x step(m) seconds, where the time of a
decoding step grows with the rows m being decoded (a straight line through the two measured points).

- Little's law (L = lambda W): at R chats/s, the busy slots and the chats waiting.
- Erlang C: the queue of c = workers x slots servers, as a birth-death chain whose service rate at n chats is
  min(n, c) / S(rows per worker) (with one speed for every m this is exactly M/M/c, Erlang C's model): the chance
  that a chat finds every slot busy, and its mean wait, Lq / R; scaled by (1 + cv^2) / 2 for the spread of the
  service times (Allen-Cunneen: replies of one length wait about half what exponential ones would), plus the
  dispatch time.
- Workers needed: the fewest that keep utilization under ``--max-utilization`` and, with ``--ttft-p99``, the
  99th percentile of the wait plus the first token under it.
- KEDA's ``listLength``: the queue per worker that its slots drain within the wait budget (the TTFT target less
  the first token; else one reply's time): more than that waiting per replica, and KEDA adds one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from config.settings import ROOT

BENCHMARKS = ROOT / "docs" / "benchmarks.json"


@dataclass(frozen=True)
class Capacity:
    """One worker, measured."""

    slots: int
    row_tokens_per_s: float  # each row's decoding speed with every slot busy
    first_token_s: float  # from a worker taking a request to its first token, slots busy (median)
    first_token_p99_s: float
    dispatch_s: float  # from acceptance to a worker starting on it, with a slot free (mean)
    service_cv2: float  # squared coefficient of variation of the time a reply holds its slot
    measured: str = ""  # on what, when
    half_row_tokens_per_s: float = 0.0  # each row's speed with half the slots busy (0: as with all busy)

    @classmethod
    def load(cls, path: Path = BENCHMARKS) -> Capacity:
        try:
            found = json.loads(path.read_text())["capacity"]["worker"]
        except (OSError, ValueError, KeyError) as exc:
            raise SystemExit(f"no measured capacity in {path} ({exc}): run `make bench` first") from None
        return cls(**{k: found[k] for k in cls.__dataclass_fields__ if k in found})

    def step_s(self, rows: float) -> float:
        """A decoding step's time with ``rows`` rows busy (one token for each)."""
        full = 1 / self.row_tokens_per_s
        if not self.half_row_tokens_per_s:
            return full
        half = 1 / self.half_row_tokens_per_s
        return max(0.2 * full, half + (full - half) * (rows - self.slots / 2) / (self.slots / 2))

    def service_s(self, reply_tokens: float, rows: float | None = None) -> float:
        """How long a reply of ``reply_tokens`` holds a slot, with ``rows`` busy (every slot: None)."""
        return self.first_token_s + max(0.0, reply_tokens - 1) * self.step_s(self.slots if rows is None else rows)

    def chats_per_s(self, reply_tokens: float) -> float:
        """What one worker serves, every slot busy."""
        return self.slots / self.service_s(reply_tokens)


def erlang_c(servers: int, offered: float) -> float:
    """The chance that an arrival waits in an M/M/c queue with ``offered`` = arrival rate x service time."""
    if offered <= 0:
        return 0.0
    if offered >= servers:
        return 1.0
    blocked = 1.0  # Erlang B, built up one server at a time (no factorials to overflow)
    for k in range(1, servers + 1):
        blocked = offered * blocked / (k + offered * blocked)
    return blocked / (1 - offered / servers * (1 - blocked))


@dataclass(frozen=True)
class Prediction:
    workers: int
    utilization: float
    busy_slots: float  # Little's law: chats being served at once, on average
    waiting: float  # Little's law: chats in the queue, on average
    wait_probability: float
    mean_wait_s: float
    p99_wait_s: float
    ttft_p99_s: float


def queue(cap: Capacity, rate: float, reply_tokens: float, workers: int) -> tuple[float, float, float]:
    """The birth-death chain of ``workers`` x slots servers at ``rate``, chats spread evenly over the workers:
    the chance that a chat waits, the mean number waiting and the mean number being served (the rate must be
    under what every slot busy serves)."""
    servers = workers * cap.slots
    busy = np.arange(1, servers + 1)
    served = busy / np.array([cap.service_s(reply_tokens, n / workers) for n in busy])  # departures at n chats
    log_p = np.concatenate([[0.0], np.cumsum(np.log(rate) - np.log(served))])  # p(0) .. p(c), unnormalized
    ratio = rate / served[-1]  # beyond c, every further chat waits: a geometric tail
    top = log_p.max()
    p = np.exp(log_p - top)
    total = p[:-1].sum() + p[-1] / (1 - ratio)
    at_c = p[-1] / total
    return at_c / (1 - ratio), at_c * ratio / (1 - ratio) ** 2, float((p[:-1] * np.arange(servers)).sum() / total
                                                                  + servers * at_c / (1 - ratio))


def predict(cap: Capacity, rate: float, reply_tokens: float, workers: int) -> Prediction:
    service = cap.service_s(reply_tokens)
    servers = workers * cap.slots
    spread = (1 + cap.service_cv2) / 2  # Allen-Cunneen, Poisson arrivals
    if rate * service >= servers:
        return Prediction(workers, rate * service / servers, rate * service, math.inf, 1.0, math.inf, math.inf,
                          math.inf)
    waits, waiting, busy = queue(cap, rate, reply_tokens, workers)
    drain = servers / service - rate  # how fast the queue empties while every slot is busy
    queued = spread * waiting / rate  # Little's law: the mean wait
    p99 = spread * math.log(waits / 0.01) / drain if waits > 0.01 else 0.0
    p99 = max(p99, queued)  # never under the mean
    return Prediction(workers, busy / servers, busy, spread * waiting, waits, cap.dispatch_s + queued,
                      cap.dispatch_s + p99, cap.dispatch_s + p99 + cap.first_token_p99_s)


@dataclass(frozen=True)
class Plan:
    prediction: Prediction
    service_s: float
    keda_list_length: int
    feasible: bool
    why: str = ""


def plan(cap: Capacity, rate: float, reply_tokens: float, ttft_p99: float | None = None,
         max_utilization: float = 0.85, max_workers: int = 10000) -> Plan:
    service = cap.service_s(reply_tokens)
    budget = (ttft_p99 - cap.first_token_p99_s - cap.dispatch_s) if ttft_p99 is not None else service
    keda = max(1, math.floor(budget * cap.slots / service)) if budget > 0 else 1
    workers = math.floor(rate * service / cap.slots) + 1  # the fewest whose slots, all busy, keep up
    while workers <= max_workers:
        p = predict(cap, rate, reply_tokens, workers)
        if p.utilization > max_utilization:
            workers += 1
            continue
        if ttft_p99 is None or p.ttft_p99_s <= ttft_p99:
            return Plan(p, service, keda, True)
        if budget <= 0:
            break
        workers += 1
    why = (f"the first token alone takes {cap.first_token_p99_s:.2f} s (p99) with every slot busy"
           if budget <= 0 else f"not met with {max_workers} workers")
    return Plan(predict(cap, rate, reply_tokens, workers if workers <= max_workers else max_workers), service,
                keda, False, why)


def report(cap: Capacity, rate: float, reply_tokens: float, ttft_p99: float | None, result: Plan) -> str:
    p = result.prediction
    lines = [
        f"One worker (measured {cap.measured}): {cap.slots} slots, {cap.row_tokens_per_s:.1f} tokens/s per row with "
        f"every slot busy" + (f" ({cap.half_row_tokens_per_s:.1f} with half)" if cap.half_row_tokens_per_s else "")
        + f", first token {cap.first_token_s * 1000:.0f} ms, dispatch {cap.dispatch_s * 1000:.0f} ms.",
        f"A {reply_tokens:g}-token reply holds a slot {result.service_s:.2f} s: one worker serves "
        f"{cap.chats_per_s(reply_tokens):.2f} chats/s.",
        f"At {rate:g} chats/s, {p.busy_slots:.1f} slots are busy on average (Little's law, L = lambda x S).",
    ]
    if not result.feasible:
        lines.append(f"The TTFT target of {ttft_p99:g} s cannot be met: {result.why}.")
    lines += [
        f"Workers needed: {p.workers} (utilization {p.utilization:.0%}"
        + (f", TTFT p99 target {ttft_p99:g} s)" if ttft_p99 is not None else ")"),
        f"Expected queue wait: mean {p.mean_wait_s:.3f} s, p99 {p.p99_wait_s:.3f} s "
        f"({p.wait_probability:.1%} of chats find every slot busy; {p.waiting:.2f} waiting on average).",
        f"Time to first token, p99: about {p.ttft_p99_s:.2f} s.",
        f"KEDA: listLength \"{result.keda_list_length}\" (docker/k8s/keda.yaml) and minReplicaCount {p.workers} "
        f"for this load.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, required=True, help="chats per second (arrivals)")
    parser.add_argument("--reply-tokens", type=float, required=True, help="tokens per reply, on average")
    parser.add_argument("--ttft-p99", type=float, help="target time to first token, 99th percentile, seconds")
    parser.add_argument("--max-utilization", type=float, default=0.85)
    parser.add_argument("--benchmarks", type=Path, default=BENCHMARKS)
    parser.add_argument("--json", action="store_true", help="the plan as JSON")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.reply_tokens < 1 or not 0 < args.max_utilization < 1:
        parser.error("--rate must be above 0, --reply-tokens at least 1, --max-utilization between 0 and 1")
    cap = Capacity.load(args.benchmarks)
    result = plan(cap, args.rate, args.reply_tokens, args.ttft_p99, args.max_utilization)
    if args.json:
        print(json.dumps({"capacity": asdict(cap), **asdict(result)}, indent=2))
    else:
        print(report(cap, args.rate, args.reply_tokens, args.ttft_p99, result))
    return 0 if result.feasible else 1


if __name__ == "__main__":
    sys.exit(main())
