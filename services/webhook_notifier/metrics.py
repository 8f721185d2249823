"""The webhook notifier's Prometheus metrics (README: Metrics): delivery attempts by outcome and
how long receivers took to answer."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

ATTEMPT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

DELIVERIES = Counter(
    "jetbatch_webhook_deliveries",
    "Webhook delivery attempts by outcome: delivered, retrying (failed, tried again later) or"
    " dead (failed for good: a dead letter)",
    ["outcome"],
)
ATTEMPT_SECONDS = Histogram(
    "jetbatch_webhook_attempt_seconds",
    "How long a receiver took to answer a delivery attempt",
    buckets=ATTEMPT_BUCKETS,
)


def attempted(new_status: str, latency_ms: int | None) -> None:
    """One attempt recorded with the delivery's `new_status` (delivered, dead or pending)."""
    DELIVERIES.labels("retrying" if new_status == "pending" else new_status).inc()
    if latency_ms is not None:
        ATTEMPT_SECONDS.observe(latency_ms / 1000)
