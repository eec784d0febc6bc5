"""The admission's estimate of how fast workers drain the queue: from their counter, over a recent window."""

from __future__ import annotations

from app.web.admission import DrainRate


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
