"""`Shares`: how a worker's engine is split between the classes of its requests.

A worker reads two classes through two consumers (schemas.messages.Priority): the lines the
api dispatched (already in fair-share order between projects: services/api/dispatcher.py) and
the lines other services published straight to JetStream. While both have lines waiting, each
class may hold at most half the engine; while one has nothing waiting, the other may use all of
it. So a flood of direct lines never holds back the api's batches, nor the other way round.

What waits is learned from the fetches: each message carries how many more wait behind it on its
consumer (`num_pending`). A class not known to have lines waiting is looked at one line at a time:
that fetch waits for a line, and tells how many follow. A "waiting" learned more than
`FRESH_S` ago is forgotten, so a class whose lines were taken by other workers stops holding
this one's other class to half, and a class held out of a full engine learns again with a look
of one line (at most one over capacity, and only while it holds under its half).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

FRESH_S = 2.0


class Shares:
    def __init__(
        self,
        classes: Iterable[str],
        capacity: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.running: dict[str, int] = dict.fromkeys(classes, 0)
        self.half = max(1, capacity // 2)
        self._clock = clock
        self._waiting_since: dict[str, float] = dict.fromkeys(self.running, -math.inf)

    def fetched(self, cls: str, pending: int) -> None:
        """A fetch of `cls` came back, leaving `pending` lines behind it (0 if it came back
        empty)."""
        self._waiting_since[cls] = self._clock() if pending > 0 else -math.inf

    def waiting(self, cls: str) -> bool:
        return self._clock() - self._waiting_since[cls] < FRESH_S

    def allowance(self, cls: str, free: int) -> int:
        """How many lines of `cls` to fetch now, `free` being the engine's free slots (0: none
        now; wait for a slot)."""
        if not self.waiting(cls):
            return 1 if free > 0 or self.running[cls] < self.half else 0
        if any(self.waiting(other) for other in self.running if other != cls):
            free = min(free, self.half - self.running[cls])
        return max(0, free)
