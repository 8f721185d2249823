"""`EngineLoad`: what a vLLM engine holds now, as its scheduler reports after each step, and the
admission that follows from it.

A worker's capacity (vllm_engine.admission_capacity) is sized at start from the KV cache over a
typical line. The lines that come are not typical: with long prompts the cache fills with fewer
sequences than that, and what the worker handed over beyond them waits in vLLM's own queue, where
no other worker can take it and the fair-share order no longer reaches it. So the intake also
asks `room()`: while vLLM already has `queue_target` requests waiting (the quarter more than it
runs that the capacity adds for refills), nothing more is pulled; the rest waits in JetStream.
Short lines, which fit many at once, leave vLLM's queue short and the worker pulls up to its
capacity.

vLLM reports through stat loggers; this is one (duck-typed: vLLM's `StatLoggerBase` interface),
appended to the engine client's logger manager by `attach`. The figures come with the engine's
steps: a report older than `STALE_S` means the engine is idle (it steps while it has work), and
sets no limit. An engine that reports nothing (stats off, another vLLM) is not limited either.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

STALE_S = 2.0


@dataclass(frozen=True)
class Load:
    running: int
    waiting: int
    kv_cache_usage: float  # 0..1
    at: float  # monotonic


class EngineLoad:
    def __init__(self, queue_target: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.queue_target = queue_target
        self.last: Load | None = None
        self._clock = clock

    # -- vLLM's stat logger interface ---------------------------------------------------------
    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any = None,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is None:
            return
        self.last = Load(
            running=int(scheduler_stats.num_running_reqs),
            waiting=int(scheduler_stats.num_waiting_reqs),
            kv_cache_usage=float(scheduler_stats.kv_cache_usage),
            at=self._clock(),
        )

    def log(self) -> None:
        pass

    def log_engine_initialized(self) -> None:
        pass

    def record_sleep_state(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record_admission_rejection(self, *args: Any, **kwargs: Any) -> None:
        pass

    # -- admission ------------------------------------------------------------------------------
    def fresh(self) -> Load | None:
        last = self.last
        if last is None or self._clock() - last.at > STALE_S:
            return None
        return last

    def room(self, in_engine: int) -> int | None:
        """How many more requests to hand the engine now (None: no limit from here).
        `in_engine`: the requests this worker has in the engine; vLLM's waiting count is never
        taken above it (a report from before some of them finished)."""
        last = self.fresh()
        if last is None:
            return None
        return max(0, self.queue_target - min(last.waiting, in_engine))


def attach(client: Any, queue_target: int) -> EngineLoad | None:
    """An EngineLoad fed by the engine client's stat loggers; None if it has none."""
    loggers = getattr(getattr(client, "logger_manager", None), "stat_loggers", None)
    if not isinstance(loggers, list):
        return None
    load = EngineLoad(queue_target)
    loggers.append(load)
    return load
