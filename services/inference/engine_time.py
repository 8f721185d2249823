"""What each request used of the worker's GPUs (README: Usage and costs), for the batch object's
`gpu_seconds` and costs per GPU-hour.

An engine runs many requests at once, so a request's own wall time overstates what it used: 64
requests decoding together for 10 s used 10 s of the GPU, not 640. Each moment of the engine's
busy time is shared equally by the requests in it then (processor sharing): a clock that
advances by dt/n while n requests run gives a request its share as the clock's advance between
its start and its end. The shares of all requests add up to the engine's busy time; times the
GPUs the worker owns, that is GPU time.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class EngineClock:
    def __init__(self, gpus: int = 1, now: Callable[[], float] = time.monotonic) -> None:
        self.gpus = max(1, gpus)
        self._now = now
        self._last = now()
        self._running = 0
        # Seconds of engine time one request running since the clock began would have had.
        self._shared = 0.0

    def _advance(self) -> None:
        t = self._now()
        if self._running:
            self._shared += (t - self._last) / self._running
        self._last = t

    def start(self) -> float:
        """A request enters the engine; pass what this returns to `stop`."""
        self._advance()
        self._running += 1
        return self._shared

    def stop(self, started: float) -> int:
        """The request has left the engine: its GPU milliseconds."""
        self._advance()
        self._running = max(0, self._running - 1)
        return round((self._shared - started) * 1000 * self.gpus)

    @property
    def running(self) -> int:
        return self._running
