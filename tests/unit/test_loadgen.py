"""The benchmark's summary of a load: counts, latency percentiles, throughput."""

from __future__ import annotations

from scripts.loadgen import Run, Sample, saturated_tokens_per_s, summarize


def test_summary_counts_latencies_and_throughput():
    ok = Sample(sent=0.0, token_times=[0.1, 0.15, 0.25], done=0.3, completion_tokens=3, finish_reason="stop",
                accepted=True, engine_first_token_ms=90.0)
    ok2 = Sample(sent=1.0, token_times=[1.2, 1.25], done=1.3, completion_tokens=2, finish_reason="length",
                 accepted=True, engine_first_token_ms=170.0)
    failed = Sample(sent=2.0, error="unavailable")
    summary = summarize(Run("x", "C=2", [ok, ok2, failed], wall_s=2.5))
    assert (summary["requests"], summary["accepted"], summary["completed"], summary["errors"]) == (3, 2, 2, 1)
    assert summary["output_tokens"] == 5 and summary["tokens_per_s"] == 2.0
    assert summary["ttft_ms"]["p50"] == 150.0  # first tokens after 100 and 200 ms
    assert summary["itl_ms"]["p50"] == 50.0  # gaps of 50, 100 and 50 ms
    assert summary["itl_ms"]["p99"] <= 100.0
    assert summary["ttft_stack_overhead_ms"]["p50"] == 20.0  # 10 and 30 ms beyond the engine's first token


def test_empty_run_has_no_percentiles():
    summary = summarize(Run("x", "C=1", [], wall_s=1.0))
    assert summary["completed"] == 0 and summary["ttft_ms"] == {"p50": None, "p95": None, "p99": None}


def test_saturated_throughput_counts_only_while_every_chat_is_busy():
    def sample(sent, first, n, gap=0.5):
        times = [first + gap * i for i in range(n)]
        return Sample(sent=sent, token_times=times, done=times[-1] + 0.1, completion_tokens=n, accepted=True)

    # Two chats: A at 0..2.1 then 2.2..4.3; B starts late (first token at 1.0), its second request ends at 6.1.
    a1, b1 = sample(0.0, 0.1, 5), sample(0.5, 1.0, 5)
    a2, b2 = sample(2.2, 2.3, 5), sample(3.1, 4.0, 5)
    run = Run("x", "C=2", [a1, b1, a2, b2], wall_s=6.1, concurrency=2)
    # Window: from B's first token (1.0) to the first request done after the last send (a2, at 4.4).
    inside = sum(1 for s in (a1, b1, a2, b2) for t in s.token_times if 1.0 <= t <= 4.4)
    assert saturated_tokens_per_s(run) == inside / 3.4
    assert summarize(run)["saturated_tokens_per_s"] == round(inside / 3.4, 1)
    # An open loop, or too few requests to reach a steady state, has none.
    assert saturated_tokens_per_s(Run("x", "rate=1", [a1, b1, a2, b2], wall_s=6.1)) is None
    assert saturated_tokens_per_s(Run("x", "C=2", [a1, b1], wall_s=3.0, concurrency=2)) is None
