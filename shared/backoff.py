"""The one backoff policy of the whole system: redeliveries, pauses of a consumer whose fetch
failed, retries of start-up calls through a NATS leader election, webhook retries (with jitter)."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["BACKOFF", "Backoff"]


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: after the n-th failure, min(max_s, base_s * 2**(n-1)); with full
    jitter (AWS architecture blog, "Exponential Backoff And Jitter"), uniform in [0, that]."""

    base_s: float = 1.0
    max_s: float = 30.0
    jitter: bool = False

    def delay_s(self, failures: int, rng: random.Random | None = None) -> float:
        ceiling = min(self.max_s, self.base_s * 2 ** min(max(failures, 1) - 1, 62))
        return (rng or random).uniform(0, ceiling) if self.jitter else ceiling


# The one policy for redelivering messages (1, 2, 4, 8, 16, 30, 30 ... s) and for pausing a
# consumer whose fetch failed as a whole (the database is most likely down).
BACKOFF = Backoff()
