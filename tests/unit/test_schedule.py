"""services/api/schedule.py: the fair split, the order within a project, queue places."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.api.schedule import Candidate, allocate, fair_split, queue_places
from services.inference.priority import AGING_STEP_S

NOW = 1_000_000


def batch(
    batch_id: str,
    project: str = "proj_a",
    *,
    remaining: int = 100,
    priority: int = 0,
    expires_at: int | None = None,
    created_at: int = NOW - 10,
    share: float = 1.0,
    waiting_since: int | None = None,
    seq: int = 0,
) -> Candidate:
    return Candidate(
        batch_id=batch_id,
        project=project,
        share=share,
        priority=priority,
        expires_at=expires_at,
        created_at=created_at,
        remaining=remaining,
        waiting_since=created_at if waiting_since is None else waiting_since,
        seq=seq,
    )


def test_a_small_batch_of_another_project_gets_half_the_room_beside_a_huge_one() -> None:
    grants = allocate(
        [batch("huge", remaining=50_000), batch("small", "proj_b", remaining=20)], 1_000, NOW
    )
    assert grants == {"small": 20, "huge": 980}


def test_two_projects_with_work_split_the_room_evenly() -> None:
    grants = allocate(
        [batch("a", remaining=5_000), batch("b", "proj_b", remaining=5_000)], 1_000, NOW
    )
    assert grants == {"a": 500, "b": 500}


def test_shares_weigh_the_split() -> None:
    a = batch("a", remaining=5_000, share=3)
    b = batch("b", "proj_b", remaining=5_000, share=1)
    assert allocate([a, b], 1_000, NOW) == {"a": 750, "b": 250}


def test_within_a_project_priority_then_deadline_then_age() -> None:
    old = batch("old", remaining=10, created_at=NOW - 100)
    new = batch("new", remaining=10, created_at=NOW - 50)
    due = batch("due", remaining=10, created_at=NOW - 10, expires_at=NOW + 3_600)
    urgent = batch("urgent", remaining=10, created_at=NOW - 1, priority=5)
    assert allocate([old, new, due, urgent], 10, NOW) == {"urgent": 10}
    assert allocate([old, new, due], 10, NOW) == {"due": 10}
    assert allocate([old, new], 15, NOW) == {"old": 10, "new": 5}


def test_batches_created_in_the_same_second_go_in_the_order_they_were_created() -> None:
    # Ids are random: "zz" was created first, "aa" after it, in the same second.
    first = batch("zz", remaining=10, created_at=NOW - 5, seq=41)
    second = batch("aa", remaining=10, created_at=NOW - 5, seq=42)
    assert allocate([second, first], 10, NOW) == {"zz": 10}
    assert allocate([second, first], 15, NOW) == {"zz": 10, "aa": 5}


def test_waiting_raises_a_low_priority_batch_until_it_goes_first() -> None:
    low = batch("low", remaining=10, priority=-2, created_at=NOW - 1)
    assert allocate([low, batch("normal", remaining=10, created_at=NOW)], 10, NOW) == {"normal": 10}
    later = int(NOW + 3 * AGING_STEP_S)  # low has waited three steps: -2 + 3 = 1 > 0
    fresh = batch("fresh", remaining=10, created_at=later)  # ... a new batch of priority 0
    assert allocate([low, fresh], 10, later) == {"low": 10}


def test_a_tiny_room_still_moves_every_project() -> None:
    grants = allocate([batch("a"), batch("b", "proj_b"), batch("c", "proj_c")], 2, NOW)
    assert sum(grants.values()) == 2


@given(
    demand=st.dictionaries(st.sampled_from("abcdef"), st.integers(0, 10_000), min_size=1),
    shares=st.lists(st.floats(0.01, 100), min_size=6, max_size=6),
    room=st.integers(0, 20_000),
)
def test_the_split_never_exceeds_the_room_or_what_is_wanted(
    demand: dict[str, int], shares: list[float], room: int
) -> None:
    weights = {p: shares["abcdef".index(p)] for p in demand}
    parts = fair_split(demand, weights, room)
    assert sum(parts.values()) == min(room, sum(demand.values()))
    assert all(0 <= parts[p] <= demand[p] for p in demand)


def test_queue_places_count_the_batches_and_lines_ahead_in_the_project() -> None:
    running = batch("running", remaining=1_000, created_at=NOW - 30)
    next_ = batch("next", remaining=500, created_at=NOW - 20)
    last = batch("last", remaining=10, created_at=NOW - 10)
    other = batch("other", "proj_b", remaining=10)
    places = queue_places([running, next_, last, other], {"running"}, lines_per_s=200, now=NOW)
    assert places["running"].position == 0
    assert (places["next"].position, places["next"].lines_ahead) == (1, 1_000)
    assert (places["last"].position, places["last"].lines_ahead) == (2, 1_500)
    # Two projects waiting share 200 lines/s: 100 each; 1,500 lines ahead = 15 s.
    assert places["last"].estimated_start_at == NOW + 15
    assert places["other"].position == 0 and places["other"].estimated_start_at == NOW
    assert queue_places([next_], set(), lines_per_s=0, now=NOW)["next"].estimated_start_at == NOW
