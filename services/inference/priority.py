"""The engine priority of a request (README: Scheduling).

vLLM, run with `--scheduling-policy priority`, starts the waiting request with the lowest
priority number first (ties: the earliest arrival). jetbatch lays that number line out in bands:

    synchronous requests   -21 .. -1    (always ahead of every batch request)
    batch priority  10       0 .. 20
    batch priority   9      21 .. 41
    ...
    batch priority -10     420 .. 440

A line's own body `priority` (vLLM's extension, lower first; clamped to -10 .. 10) orders the
requests within its band only: no line can leave its batch's band, and no batch line can jump
ahead of synchronous traffic.

A batch's priority (jetbatch's: higher first) rises while its requests wait ("aging"): +1 per
AGING_STEP_S since the message was published to REQUESTS, up to the top batch priority (10), so
a low-priority batch is never starved by a stream of higher ones; it never reaches the
synchronous band.
"""

from __future__ import annotations

BATCH_MIN, BATCH_MAX = -10, 10  # a batch's priority: -10 last, 10 first
LINE_MIN, LINE_MAX = -10, 10  # a line's body priority, as vLLM reads it: lower first
BAND = LINE_MAX - LINE_MIN + 1  # engine priority numbers per band (21)
AGING_STEP_S = 300.0  # a waiting batch request gains +1 priority every 5 minutes


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def aged(batch_priority: int, waited_s: float) -> int:
    """The batch priority a request runs with after waiting `waited_s` since its publish:
    +1 per AGING_STEP_S, capped at BATCH_MAX."""
    steps = int(max(0.0, waited_s) // AGING_STEP_S)
    return _clamp(batch_priority + steps, BATCH_MIN, BATCH_MAX)


def engine_priority(line_priority: int, *, interactive: bool, batch_priority: int = 0) -> int:
    """vLLM's priority number (lower runs first) for a request whose body asked for
    `line_priority`: in the synchronous band when `interactive`, else in the band of its batch's
    (aged) `batch_priority`."""
    within = _clamp(line_priority, LINE_MIN, LINE_MAX) - LINE_MIN  # 0 .. BAND - 1
    if interactive:
        return within - BAND
    band = BATCH_MAX - _clamp(batch_priority, BATCH_MIN, BATCH_MAX)  # 0 (first) .. 20 (last)
    return band * BAND + within
