"""The results writer's Prometheus metrics (README: Metrics): results written, batches it
finalized by final status, and how long writing a batch's files and closing it took."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

from prometheus_client import Counter, Histogram

from schemas.messages import ResultMessage

# Seconds: a few lines take milliseconds, 50,000 lines' files some seconds.
FINALIZE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

RESULTS = Counter(
    "jetbatch_results_written",
    "Result messages written to PostgreSQL (redeliveries included): outcome finished or failed",
    ["outcome"],
)
STORED = Counter(
    "jetbatch_results_stored", "Result rows new to PostgreSQL (each line once, whatever delivery)"
)
FINALIZED = Counter(
    "jetbatch_batches_finalized",
    "Batches the results writer closed, by final status (completed, cancelled, expired)",
    ["status"],
)
FINALIZE_SECONDS = Histogram(
    "jetbatch_finalization_seconds",
    "Time to write a batch's output and error files, emit its event and close it",
    ["status"],
    buckets=FINALIZE_BUCKETS,
)


def written(results: Sequence[ResultMessage], stored: int) -> None:
    failed = sum(1 for r in results if r.error_code is not None or r.status_code >= 400)
    if len(results) > failed:
        RESULTS.labels("finished").inc(len(results) - failed)
    if failed:
        RESULTS.labels("failed").inc(failed)
    if stored:
        STORED.inc(stored)


def final_status(status: str) -> str:
    """The status a batch in `status` ends with when the results writer closes it."""
    return {"cancelling": "cancelled", "in_progress": "expired"}.get(status, "completed")


@contextlib.contextmanager
def finalizing(status: str) -> Iterator[None]:
    """Time closing a batch now in `status`; counted only once it is done."""
    started = time.monotonic()
    yield
    final = final_status(status)
    FINALIZE_SECONDS.labels(final).observe(time.monotonic() - started)
    FINALIZED.labels(final).inc()
