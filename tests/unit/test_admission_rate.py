"""The admission's estimate of how fast workers drain the queue: from their counter, over a recent window; and
whether tasks have kept waiting long enough for that estimate to refuse anything."""

from __future__ import annotations

from app.web.admission import Backlog, DrainRate


def test_unknown_until_watched_long_enough_then_the_rate_over_the_window():
    rate = DrainRate(window_s=30, least_s=5)
    assert rate.observe(100, now=0.0) is None
    assert rate.observe(104, now=2.0) is None
    assert rate.observe(110, now=5.0) == 2.0
    assert rate.observe(170, now=30.0) == 70 / 30


def test_an_idle_spell_is_forgotten_rather_than_averaged_in():
    rate = DrainRate(window_s=30, least_s=5)
    rate.observe(100, now=0.0)
    rate.observe(110, now=5.0)
    # Ten minutes without a chat, then a burst: the old samples are gone, the rate is unknown again at first.
    assert rate.observe(400, now=605.0) is None
    assert rate.observe(430, now=611.0) == 5.0


def test_a_reset_counter_is_unknown_not_negative():
    rate = DrainRate(window_s=30, least_s=5)
    rate.observe(100, now=0.0)
    assert rate.observe(3, now=6.0) is None


def test_a_queue_behind_only_once_tasks_have_kept_waiting_for_a_moment():
    backlog = Backlog(least_s=1.0)
    assert not backlog.observe(0, now=0.0)
    assert not backlog.observe(12, now=0.1)  # a burst: the workers have not had a moment to take it
    assert not backlog.observe(15, now=0.6)
    assert backlog.observe(9, now=1.1)  # still waiting a second on: behind
    assert not backlog.observe(0, now=1.2)  # taken: a later burst starts afresh
    assert not backlog.observe(3, now=1.3)
