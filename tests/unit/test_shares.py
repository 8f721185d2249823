"""How a worker splits its engine between the dispatched and the direct class (shares.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from schemas.messages import DIRECT, DISPATCHED
from services.inference.shares import FRESH_S, Shares


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def shares(capacity: int = 8) -> tuple[Shares, Clock]:
    clock = Clock()
    return Shares((DISPATCHED, DIRECT), capacity, clock), clock


def test_a_class_nothing_is_known_of_is_looked_at_one_line_at_a_time() -> None:
    s, _ = shares()
    assert s.allowance(DISPATCHED, free=8) == 1
    s.fetched(DISPATCHED, pending=100)
    assert s.allowance(DISPATCHED, free=7) == 7  # the other class waits for nothing: all of it


def test_while_both_wait_each_holds_at_most_half() -> None:
    s, _ = shares()
    s.fetched(DISPATCHED, pending=100)
    s.fetched(DIRECT, pending=100)
    s.running[DISPATCHED] = 3
    assert s.allowance(DISPATCHED, free=5) == 1
    s.running[DISPATCHED] = 4
    assert s.allowance(DISPATCHED, free=4) == 0
    assert s.allowance(DIRECT, free=4) == 4


def test_a_class_held_out_of_a_full_engine_may_look_for_one_line_while_under_half() -> None:
    s, _ = shares()
    s.fetched(DISPATCHED, pending=100)
    s.running[DISPATCHED] = 8  # took it all while the direct class had nothing
    assert s.allowance(DIRECT, free=0) == 1
    s.running[DIRECT] = 4
    assert s.allowance(DIRECT, free=0) == 0


def test_what_waits_is_forgotten_after_a_while() -> None:
    s, clock = shares()
    s.fetched(DIRECT, pending=100)
    s.fetched(DISPATCHED, pending=100)
    assert s.allowance(DISPATCHED, free=8) == 4
    clock.now += FRESH_S + 0.1  # the direct lines went to other workers, say
    s.fetched(DISPATCHED, pending=100)
    assert s.allowance(DISPATCHED, free=8) == 8
    s.fetched(DISPATCHED, pending=0)
    assert s.allowance(DISPATCHED, free=8) == 1


def test_a_worker_of_one_slot_still_serves_both() -> None:
    s, _ = shares(capacity=1)
    s.fetched(DISPATCHED, pending=10)
    s.fetched(DIRECT, pending=10)
    assert s.allowance(DISPATCHED, free=1) == 1
    s.running[DISPATCHED] = 1
    assert s.allowance(DIRECT, free=0) == 0
    s.running[DISPATCHED] = 0
    assert s.allowance(DIRECT, free=1) == 1


@given(
    capacity=st.integers(1, 512),
    running=st.tuples(st.integers(0, 512), st.integers(0, 512)),
    free=st.integers(-8, 512),
    pending=st.tuples(st.integers(0, 3), st.integers(0, 3)),
)
def test_allowance_never_exceeds_the_free_slots_but_for_one_look(
    capacity: int, running: tuple[int, int], free: int, pending: tuple[int, int]
) -> None:
    s, _ = shares(capacity)
    for cls, n, p in zip((DISPATCHED, DIRECT), running, pending, strict=True):
        s.running[cls] = n
        s.fetched(cls, p)
    for cls in (DISPATCHED, DIRECT):
        got = s.allowance(cls, free)
        assert got >= 0
        assert got <= max(free, 1)
        if got > max(free, 0):  # a look past a full engine: one line, only under half
            assert got == 1 and s.running[cls] < s.half
