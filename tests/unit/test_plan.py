"""The capacity planner's queueing: Erlang C against its closed forms and a simulated queue, and plans that follow
from the measured worker."""

from __future__ import annotations

import heapq
import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scripts.plan import Capacity, erlang_c, main, plan, predict, queue

CAP = Capacity(slots=16, row_tokens_per_s=30.0, first_token_s=0.2, first_token_p99_s=0.4, dispatch_s=0.01,
               service_cv2=1.0, measured="a test")


def test_erlang_c_meets_its_closed_forms():
    for rho in (0.1, 0.5, 0.9):
        assert erlang_c(1, rho) == pytest.approx(rho)  # M/M/1: an arrival waits while the one server is busy
        assert erlang_c(2, 2 * rho) == pytest.approx(2 * rho ** 2 / (1 + rho))  # M/M/2
    assert erlang_c(16, 0) == 0 and erlang_c(16, 16) == 1 and erlang_c(16, 20) == 1


@given(st.integers(1, 200), st.floats(0.01, 0.99))
def test_waiting_grows_with_the_load_and_shrinks_with_servers(servers, rho):
    c = erlang_c(servers, rho * servers)
    assert 0 <= c <= 1
    assert erlang_c(servers, min(0.999, rho + 0.01) * servers) >= c
    assert erlang_c(servers + 1, rho * servers) <= c


def simulated_mean_wait(servers: int, rate: float, service: float, n: int = 60000, seed: int = 3) -> float:
    """First come, first served, Poisson arrivals, exponential service times: the mean wait for a server."""
    rng = random.Random(seed)
    free_at = [0.0] * servers
    now = waited = 0.0
    for _ in range(n):
        now += rng.expovariate(rate)
        earliest = heapq.heappop(free_at)
        start = max(now, earliest)
        waited += start - now
        heapq.heappush(free_at, start + rng.expovariate(1 / service))
    return waited / n


@pytest.mark.parametrize("load", [0.5, 0.8, 0.9])
def test_the_predicted_wait_is_the_simulated_queues(load):
    service = CAP.service_s(64)
    rate = load * CAP.slots / service
    predicted = predict(CAP, rate, 64, 1).mean_wait_s - CAP.dispatch_s
    simulated = simulated_mean_wait(CAP.slots, rate, service)
    print(f"load {load}: predicted {predicted:.4f} s, simulated {simulated:.4f} s")
    assert predicted == pytest.approx(simulated, rel=0.15, abs=0.002)


@pytest.mark.parametrize("workers,load", [(1, 0.5), (1, 0.9), (3, 0.8)])
def test_with_one_speed_the_chain_is_erlang_c(workers, load):
    servers, service = workers * CAP.slots, CAP.service_s(64)
    rate = load * servers / service
    waits, waiting, busy = queue(CAP, rate, 64, workers)
    assert waits == pytest.approx(erlang_c(servers, rate * service))
    assert waiting == pytest.approx(waits * rate * service / (servers - rate * service))  # Lq of M/M/c
    assert busy == pytest.approx(rate * service)  # Little's law for the slots


def test_rows_that_decode_faster_when_fewer_are_busy_wait_less():
    faster = Capacity(**{**CAP.__dict__, "half_row_tokens_per_s": 45.0})
    assert faster.step_s(16) == pytest.approx(1 / 30) and faster.step_s(8) == pytest.approx(1 / 45)
    assert faster.service_s(64, 4) < faster.service_s(64, 8) < faster.service_s(64)
    rate = 0.9 * CAP.slots / CAP.service_s(64)
    one_speed, load_dependent = predict(CAP, rate, 64, 1), predict(faster, rate, 64, 1)
    assert load_dependent.utilization < one_speed.utilization
    assert load_dependent.mean_wait_s < one_speed.mean_wait_s


def test_littles_law_and_the_spread_of_service_times():
    p = predict(CAP, 4.0, 64, 1)
    assert p.busy_slots == pytest.approx(4.0 * CAP.service_s(64))
    assert p.waiting == pytest.approx(4.0 * (p.mean_wait_s - CAP.dispatch_s))
    even = predict(Capacity(**{**CAP.__dict__, "service_cv2": 0.0}), 4.0, 64, 1)
    assert even.mean_wait_s - CAP.dispatch_s == pytest.approx((p.mean_wait_s - CAP.dispatch_s) / 2)


def test_plans_add_workers_with_the_load_and_the_target():
    per_worker = CAP.chats_per_s(64)
    assert plan(CAP, 0.5 * per_worker, 64).prediction.workers == 1
    assert plan(CAP, 3.5 * per_worker, 64).prediction.workers == 5  # 85% utilization at most
    relaxed, strict = plan(CAP, 0.8 * per_worker, 64), plan(CAP, 0.8 * per_worker, 64, ttft_p99=0.5)
    assert strict.feasible and strict.prediction.ttft_p99_s <= 0.5
    assert strict.prediction.workers > relaxed.prediction.workers
    assert strict.keda_list_length < relaxed.keda_list_length  # a tighter budget: scale out on a shorter queue
    impossible = plan(CAP, 1.0, 64, ttft_p99=0.3)  # the first token alone takes 0.4 s at p99
    assert not impossible.feasible and "first token" in impossible.why


def test_the_command_reads_the_measured_worker(tmp_path, capsys):
    path = tmp_path / "benchmarks.json"
    path.write_text(json.dumps({"capacity": {"worker": CAP.__dict__}}))
    assert main(["--rate", "2", "--reply-tokens", "64", "--benchmarks", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Workers needed: 1" in out and "KEDA: listLength" in out and "Little's law" in out
    assert main(["--rate", "2", "--reply-tokens", "64", "--ttft-p99", "0.1", "--benchmarks", str(path)]) == 1
    with pytest.raises(SystemExit):
        main(["--rate", "2", "--reply-tokens", "64", "--benchmarks", str(tmp_path / "none.json")])


def test_a_bench_run_keeps_the_capacity_the_planner_reads(tmp_path):
    from scripts.bench import with_scale

    path = tmp_path / "benchmarks.json"
    assert with_scale({"stack": 2}, path) == {"stack": 2}  # no earlier file
    path.write_text(json.dumps({"stack": 1, "capacity": {"worker": CAP.__dict__}, "hosts": {"two_over_one": 1.9}}))
    kept = with_scale({"stack": 2, "ratios": {}}, path)
    assert kept == {"stack": 2, "ratios": {}, "capacity": {"worker": CAP.__dict__}, "hosts": {"two_over_one": 1.9}}
