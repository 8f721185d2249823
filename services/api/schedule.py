"""Which batch's lines go to REQUESTS next (README: Scheduling): the dispatcher's arithmetic,
free of I/O so that it is tested on its own (tests/unit/test_schedule.py).

Within a model, projects share the room in REQUESTS by weighted max-min fairness (each project
with work waiting gets a part in proportion to its `share`; what one cannot use goes to the
others), so no project starves another whatever it submits. Within a project, batches are served
by effective priority (the batch's, raised while it waits: services/inference/priority.aged),
then by deadline (earliest `expires_at` first), then in order of creation."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from services.inference.priority import aged


@dataclass(frozen=True, slots=True)
class Candidate:
    """A batch with lines not yet dispatched."""

    batch_id: str
    project: str
    share: float  # the project's weight (> 0)
    priority: int  # the batch's, -10 .. 10
    expires_at: int | None
    created_at: int
    remaining: int  # lines not yet dispatched
    waiting_since: int  # when it became ready to dispatch (its in_progress_at)
    seq: int = 0  # the order batches were created in, within a second too (migration 016)


def order_key(c: Candidate, now: float) -> tuple[int, float, int, int, str]:
    """A project's batches in the order they are served: highest effective priority, earliest
    deadline, oldest (by second, then by creation order), then by id (a total order)."""
    deadline = math.inf if c.expires_at is None else float(c.expires_at)
    return (-aged(c.priority, now - c.waiting_since), deadline, c.created_at, c.seq, c.batch_id)


def fair_split(demand: Mapping[str, int], shares: Mapping[str, float], room: int) -> dict[str, int]:
    """`room` lines split among projects by weighted max-min fairness: in rounds, every project
    still wanting lines gets its share's part of what is left (at least one line, so a small
    room still moves), capped by what it wants. The parts sum to min(room, total demand)."""
    parts = {p: 0 for p in demand}
    wanting = {p for p, d in demand.items() if d > 0}
    left = room
    while left > 0 and wanting:
        weight, round_room = sum(shares[p] for p in wanting), left
        for p in sorted(wanting, key=lambda p: (-shares[p], p)):
            if left <= 0:
                break
            quota = max(1, math.floor(round_room * shares[p] / weight))
            give = min(quota, demand[p] - parts[p], left)
            parts[p] += give
            left -= give
        wanting = {p for p in wanting if parts[p] < demand[p]}
    return parts


def allocate(candidates: Iterable[Candidate], room: int, now: float) -> dict[str, int]:
    """How many lines of each batch to dispatch into `room` free lines of a model's window."""
    by_project: dict[str, list[Candidate]] = defaultdict(list)
    for c in candidates:
        if c.remaining > 0:
            by_project[c.project].append(c)
    demand = {p: sum(c.remaining for c in cs) for p, cs in by_project.items()}
    shares = {p: cs[0].share for p, cs in by_project.items()}
    grants: dict[str, int] = {}
    for project, part in fair_split(demand, shares, max(0, room)).items():
        for c in sorted(by_project[project], key=lambda c: order_key(c, now)):
            if part <= 0:
                break
            take = min(part, c.remaining)
            grants[c.batch_id] = take
            part -= take
    return grants


@dataclass(frozen=True, slots=True)
class QueuePlace:
    position: int  # batches of its project served before it (0: its lines are being dispatched)
    lines_ahead: int  # their remaining lines
    estimated_start_at: int | None  # None: no rate measured yet


def queue_places(
    candidates: Iterable[Candidate], started: set[str], lines_per_s: float, now: float
) -> dict[str, QueuePlace]:
    """Where each waiting batch stands: the batches of its project ahead of it, and when it should
    start if the model drains `lines_per_s` shared fairly among the projects now waiting."""
    by_project: dict[str, list[Candidate]] = defaultdict(list)
    for c in candidates:
        by_project[c.project].append(c)
    weight = sum(cs[0].share for cs in by_project.values()) or 1.0
    places: dict[str, QueuePlace] = {}
    for cs in by_project.values():
        rate = lines_per_s * cs[0].share / weight
        position = ahead = 0
        for c in sorted(cs, key=lambda c: order_key(c, now)):
            if c.batch_id in started:
                places[c.batch_id] = QueuePlace(0, 0, int(now))
            else:
                eta = int(now + ahead / rate) if rate > 0 else (int(now) if ahead == 0 else None)
                places[c.batch_id] = QueuePlace(position, ahead, eta)
            position += 1
            ahead += c.remaining
    return places
