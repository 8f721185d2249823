"""services/api/dispatcher: how often a dispatcher looks at a model's window (next_tick_s), and
the drain rate that sizes the window and the wait (Drain)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.api.dispatcher import (
    MAX_TICK_S,
    RATE_EVERY_S,
    RATE_STALE_S,
    TICK_S,
    Drain,
    next_tick_s,
)


def test_a_window_with_room_is_looked_at_every_tick() -> None:
    assert next_tick_s(backlog=100, window=256, capacity=80, lines_per_s=8.0) == TICK_S


def test_an_unmeasured_drain_rate_keeps_the_short_tick() -> None:
    assert next_tick_s(backlog=256, window=256, capacity=80, lines_per_s=0.0) == TICK_S


def test_a_full_window_of_slow_work_waits_the_longest() -> None:
    # vLLM chat on the 2-core box: 256 lines in the window, 80 in the workers, 8 lines/s drained:
    # 22 s before the workers could wait.
    assert next_tick_s(backlog=256, window=256, capacity=80, lines_per_s=8.0) == MAX_TICK_S


def test_a_fast_model_keeps_the_short_tick() -> None:
    # The instant engine: 1,000 lines in the window drain in 0.1 s.
    assert next_tick_s(backlog=1_000, window=1_000, capacity=256, lines_per_s=10_000) == TICK_S


def test_in_between_a_quarter_of_the_slack() -> None:
    # 800 lines above what the workers hold, 1,000 lines/s: 0.8 s of slack, looked at in 0.2 s.
    assert next_tick_s(1_000, 1_000, 200, 1_000.0) == pytest.approx(0.2)


def test_workers_holding_the_whole_backlog_keep_the_short_tick() -> None:
    assert next_tick_s(backlog=256, window=256, capacity=400, lines_per_s=50.0) == TICK_S


@given(
    backlog=st.integers(0, 100_000),
    window=st.integers(1, 100_000),
    capacity=st.integers(0, 10_000),
    rate=st.floats(0, 1e6, allow_nan=False),
)
def test_always_between_the_tick_and_the_longest_wait(
    backlog: int, window: int, capacity: int, rate: float
) -> None:
    delay = next_tick_s(backlog, window, capacity, rate)
    assert TICK_S <= delay <= MAX_TICK_S
    if backlog < window:
        assert delay == TICK_S


def test_the_drain_rate_counts_every_replicas_lines_from_the_consumer() -> None:
    drain = Drain(backlog=1_000, acked=5_000, since=0.0)
    # Another replica kept the backlog at 1,000 (this one granted nothing); the workers acked 500.
    drain.observe(backlog=1_000, acked=5_500, now=1.0)
    assert drain.lines_per_s == 500.0


def test_without_the_consumer_the_rate_comes_from_the_backlog_and_own_grants() -> None:
    drain = Drain(backlog=1_000, since=0.0)
    drain.granted = 100
    drain.observe(backlog=600, acked=None, now=1.0)
    assert drain.lines_per_s == 500.0
    # The consumer appears: its first count is the baseline, the backlog's figure still counts.
    drain.observe(backlog=600, acked=7, now=2.0)
    assert drain.lines_per_s == 250.0
    drain.observe(backlog=600, acked=407, now=3.0)
    assert drain.lines_per_s == 325.0  # half the old, half the new 400


def test_the_rate_is_measured_once_per_interval() -> None:
    drain = Drain(backlog=0, acked=0, since=0.0)
    assert not drain.due(RATE_EVERY_S / 2)
    drain.observe(backlog=0, acked=1_000, now=RATE_EVERY_S / 2)
    assert drain.lines_per_s == 0.0 and drain.acked == 0
    assert drain.due(RATE_EVERY_S)


def test_a_consumer_made_again_counts_no_negative_drain() -> None:
    drain = Drain(backlog=0, acked=10_000, since=0.0)
    drain.observe(backlog=0, acked=3, now=1.0)
    assert drain.lines_per_s == 0.0


def test_a_model_idle_for_a_while_measures_its_rate_afresh() -> None:
    drain = Drain(backlog=0, acked=0, since=0.0, lines_per_s=10_000.0)
    # 60 s without a batch of it here, then 6,000 lines: not 100 lines/s, but not measured yet.
    drain.observe(backlog=1_000, acked=6_000, now=60.0)
    assert drain.lines_per_s == 0.0
    assert next_tick_s(1_000, 1_000, 256, drain.lines_per_s) == TICK_S
    drain.observe(backlog=1_000, acked=16_000, now=61.0)
    assert drain.lines_per_s == 10_000.0
    assert RATE_STALE_S > RATE_EVERY_S + MAX_TICK_S  # a model looked at every tick never is
