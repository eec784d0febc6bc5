"""The benchmark's summary of a load: counts, latency percentiles, throughput."""

from __future__ import annotations

from scripts.loadgen import Run, Sample, summarize


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
