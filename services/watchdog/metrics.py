"""The watchdog's Prometheus metrics (README: Metrics), beside the runner's counts of the dead
letters it records (`jetbatch_consumer_messages_total{consumer="watchdog"}`)."""

from __future__ import annotations

from prometheus_client import Gauge

STALE_WORKERS = Gauge(
    "jetbatch_watchdog_stale_workers",
    "Workers whose last heartbeat is older than JETBATCH_WORKER_STALE_S, at the last round",
)
LAST_ROUND = Gauge(
    "jetbatch_watchdog_last_round_timestamp_seconds", "When the watchdog last checked (Unix time)"
)
