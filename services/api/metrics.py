"""`GET /metrics` (README: Metrics): this api process's Prometheus metrics (its consumer, the
validation and publishing work of its child processes, counted here in the parent from each
job's outcome) and the fleet's figures read from shared state at scrape time: queue depth per
model and project from JetStream, batches and lines from PostgreSQL, every worker's heartbeat
from the workers KV bucket. So one scrape target shows the whole system.

Open, like `/healthz`: Prometheus scrapers carry no key, and nothing here is secret (model names,
project ids, worker ids and counts; never a batch id, a key or a body). The fleet's figures are
cached for FLEET_TTL_S, so scrapes from several Prometheus servers cost one read of each source.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator

from litestar import Request, Response, get
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from schemas.messages import RequestMessage, WorkerHeartbeat, subject_token
from schemas.projects import DEFAULT_PROJECT_ID
from services.api.admin import read_heartbeats
from services.api.deps import Deps, DepsParam
from shared import bus
from shared.metrics import Chain

log = logging.getLogger(__name__)

FLEET_TTL_S = 10.0
FLEET_TIMEOUT_S = 5.0  # per source; a source that does not answer is left out (jetbatch_fleet_up)
FLEET_STATE = "metrics_fleet"
MB = 1024 * 1024
REQUESTS_FILTER = "jetbatch.requests.>"

CHILD_JOBS = Counter(
    "jetbatch_api_child_jobs",
    "Validation and publishing jobs of the api's child processes, by kind and outcome (ok, failed)",
    ["kind", "outcome"],
)
CHILD_JOB_SECONDS = Histogram(
    "jetbatch_api_child_job_seconds",
    "How long a validation or publishing job took",
    ["kind"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
LINES_VALIDATED = Counter("jetbatch_api_lines_validated", "Input lines validated (pass 1)")
REQUESTS_PUBLISHED = Counter(
    "jetbatch_api_requests_published", "Request messages published on REQUESTS (pass 2)", ["model"]
)


@contextlib.contextmanager
def child_job(kind: str) -> Iterator[None]:
    """Count one validation or publishing job (in a child process or in this one)."""
    started = time.monotonic()
    try:
        yield
    except BaseException:
        CHILD_JOBS.labels(kind, "failed").inc()
        raise
    CHILD_JOBS.labels(kind, "ok").inc()
    CHILD_JOB_SECONDS.labels(kind).observe(time.monotonic() - started)


# The fleet's figures: (name, type, help, labels), for README and the dashboard's test.
FLEET_METRICS = (
    ("jetbatch_queue_depth", "gauge", "Requests on REQUESTS not yet acked (waiting or running)",
     ("model", "project")),
    ("jetbatch_queue_undelivered", "gauge", "Requests no worker has taken yet (the model's"
     " consumer's num_pending; absent before its first worker)", ("model",)),
    ("jetbatch_queue_unacked", "gauge", "Requests taken by a worker, result not yet stored"
     " (the consumer's num_ack_pending)", ("model",)),
    ("jetbatch_dispatch_waiting", "gauge", "Lines of batches in progress not yet dispatched to"
     " REQUESTS (README: Scheduling)", ("model", "project")),
    ("jetbatch_batches", "gauge", "Batches by status (PostgreSQL)", ("model", "project", "status")),
    ("jetbatch_lines", "counter", "Lines of batches with a result, by outcome finished or failed"
     " (PostgreSQL)", ("model", "project", "outcome")),
    ("jetbatch_dead_letters", "gauge", "Dead letters recorded, by source stream", ("source",)),
    ("jetbatch_webhook_dead_letters", "gauge", "Webhook deliveries that failed for good", ()),
    ("jetbatch_webhook_pending", "gauge", "Webhook deliveries waiting for an attempt", ()),
    ("jetbatch_fleet_worker_heartbeat_age_seconds", "gauge", "Seconds since a worker's last"
     " heartbeat", ("model", "worker")),
    ("jetbatch_fleet_worker_in_flight", "gauge", "Requests in a worker's engine", ("model", "worker")),
    ("jetbatch_fleet_worker_capacity", "gauge", "Requests a worker's engine holds at most",
     ("model", "worker")),
    ("jetbatch_fleet_worker_healthy", "gauge", "1 while a worker takes requests", ("model", "worker")),
    ("jetbatch_fleet_worker_gpu_memory_used_bytes", "gauge", "A worker's GPU memory in use",
     ("model", "worker", "gpu")),
    ("jetbatch_fleet_worker_gpu_memory_total_bytes", "gauge", "A worker's GPU memory",
     ("model", "worker", "gpu")),
    ("jetbatch_fleet_worker_gpu_temperature_celsius", "gauge", "A worker's GPU temperature",
     ("model", "worker", "gpu")),
    ("jetbatch_fleet_worker_gpu_utilization_ratio", "gauge", "A worker's GPU utilisation, 0-1",
     ("model", "worker", "gpu")),
    ("jetbatch_fleet_up", "gauge", "1 if the last read of a source (nats, postgres, workers)"
     " answered", ("source",)),
)  # fmt: skip


def _family(name: str) -> GaugeMetricFamily | CounterMetricFamily:
    _, kind, help_, labels = next(m for m in FLEET_METRICS if m[0] == name)
    if kind == "counter":
        return CounterMetricFamily(name, help_, labels=list(labels))
    return GaugeMetricFamily(name, help_, labels=list(labels))


class Fleet:
    """The fleet's figures as a prometheus-client collector: `refresh` reads the sources (at
    most once per `ttl_s`), `collect` yields what the last refresh read."""

    def __init__(self, ttl_s: float = FLEET_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._families: list[Metric] = []
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()

    async def refresh(self, deps: Deps) -> None:
        if time.monotonic() - self._read_at < self.ttl_s:
            return
        async with self._lock:
            if time.monotonic() - self._read_at < self.ttl_s:
                return  # another scrape refreshed it meanwhile
            families: list[Metric] = []
            up = _family("jetbatch_fleet_up")
            for source, read in (
                ("nats", queue_families),
                ("postgres", database_families),
                ("workers", worker_families),
            ):
                try:
                    async with asyncio.timeout(FLEET_TIMEOUT_S):
                        families += await read(deps)
                    up.add_metric([source], 1)
                except Exception as e:
                    log.warning("metrics: reading %s failed: %r", source, e)
                    up.add_metric([source], 0)
            self._families = [*families, up]
            self._read_at = time.monotonic()

    def collect(self) -> Iterator[Metric]:
        yield from self._families


async def queue_families(deps: Deps) -> list[Metric]:
    """Queue depth per model and project: REQUESTS' message count per subject (a work queue
    keeps a message until it is acked), and each model's consumer's pending counts."""
    names = {subject_token(m.name): m.name for m in deps.settings.models}
    info = await deps.js.stream_info(bus.REQUESTS.name, subjects_filter=REQUESTS_FILTER)
    depth: dict[tuple[str, str], int] = {}
    for subject, count in (info.state.subjects or {}).items():
        token = subject.split(".")[2]
        key = (names.get(token, token), RequestMessage.project_in(subject))
        depth[key] = depth.get(key, 0) + count
    queue = _family("jetbatch_queue_depth")
    for model in names.values():  # a served model with nothing queued reads 0, not absent
        if not any(m == model for m, _ in depth):
            depth[(model, DEFAULT_PROJECT_ID)] = 0
    for (model, project), count in sorted(depth.items()):
        queue.add_metric([model, project], count)
    undelivered = _family("jetbatch_queue_undelivered")
    unacked = _family("jetbatch_queue_unacked")
    for model in names.values():
        pending = ack_pending = 0
        found = False
        # Both classes' consumers: what the api dispatched and what was published directly.
        for durable in RequestMessage.class_durables(model).values():
            try:
                consumer = await deps.js.consumer_info(bus.REQUESTS.name, durable)
            except Exception:  # no worker of the model has run yet: no consumer
                continue
            found = True
            pending += consumer.num_pending or 0
            ack_pending += consumer.num_ack_pending or 0
        if found:
            undelivered.add_metric([model], pending)
            unacked.add_metric([model], ack_pending)
    return [queue, undelivered, unacked]


BATCHES_SQL = """
SELECT coalesce(model, '') AS model, project_id, status, count(*) AS batches,
       coalesce(sum(completed), 0) AS completed, coalesce(sum(failed), 0) AS failed
FROM batches GROUP BY 1, 2, 3
"""
DEAD_LETTERS_SQL = "SELECT source, count(*) AS n FROM dead_letters GROUP BY 1"
WAITING_SQL = """
SELECT model, project_id, sum(total - dispatched) AS lines FROM batches
WHERE status = 'in_progress' AND published_at IS NULL AND ending IS NULL GROUP BY 1, 2
"""
WEBHOOKS_SQL = """
SELECT status, count(*) AS n FROM webhook_deliveries WHERE status IN ('pending', 'dead')
GROUP BY 1
"""


async def database_families(deps: Deps) -> list[Metric]:
    async with deps.pool.acquire() as conn:
        batch_rows = await conn.fetch(BATCHES_SQL)
        dead_rows = await conn.fetch(DEAD_LETTERS_SQL)
        webhook_rows = await conn.fetch(WEBHOOKS_SQL)
        waiting_rows = await conn.fetch(WAITING_SQL)
    batches = _family("jetbatch_batches")
    lines = _family("jetbatch_lines")
    totals: dict[tuple[str, str, str], int] = {}
    for r in batch_rows:
        batches.add_metric([r["model"], r["project_id"], r["status"]], r["batches"])
        for outcome, column in (("finished", "completed"), ("failed", "failed")):
            key = (r["model"], r["project_id"], outcome)
            totals[key] = totals.get(key, 0) + r[column]
    for key, n in sorted(totals.items()):
        lines.add_metric(list(key), n)
    dead = _family("jetbatch_dead_letters")
    for r in dead_rows:
        dead.add_metric([r["source"]], r["n"])
    by_status = {r["status"]: r["n"] for r in webhook_rows}
    webhook_dead = _family("jetbatch_webhook_dead_letters")
    webhook_dead.add_metric([], by_status.get("dead", 0))
    webhook_pending = _family("jetbatch_webhook_pending")
    webhook_pending.add_metric([], by_status.get("pending", 0))
    waiting = _family("jetbatch_dispatch_waiting")
    for r in waiting_rows:
        waiting.add_metric([r["model"] or "", r["project_id"]], r["lines"] or 0)
    return [batches, lines, dead, webhook_dead, webhook_pending, waiting]


async def worker_families(deps: Deps) -> list[Metric]:
    beats = await read_heartbeats(deps)
    return heartbeat_families(beats, time.time())


def heartbeat_families(beats: list[WorkerHeartbeat], now: float) -> list[Metric]:
    """What the workers' heartbeats say, as the fleet's worker figures."""
    prefix = "jetbatch_fleet_worker_"
    families = {
        name: _family(prefix + name)
        for name in ("heartbeat_age_seconds", "in_flight", "capacity", "healthy")
    }
    gpu = {
        name: _family(prefix + "gpu_" + name)
        for name in ("memory_used_bytes", "memory_total_bytes", "temperature_celsius")
    }
    gpu["utilization_ratio"] = _family(prefix + "gpu_utilization_ratio")
    for b in beats:
        labels = [b.model, b.worker_id]
        families["heartbeat_age_seconds"].add_metric(labels, max(0.0, now - b.seen_at))
        families["in_flight"].add_metric(labels, b.in_flight)
        families["capacity"].add_metric(labels, b.capacity)
        families["healthy"].add_metric(labels, 1 if b.healthy else 0)
        if b.gpu_index is None or b.gpu_memory_used_mb is None:
            continue  # no GPU (the CPU engine) or no NVML reading
        g = [*labels, str(b.gpu_index)]
        gpu["memory_used_bytes"].add_metric(g, b.gpu_memory_used_mb * MB)
        gpu["memory_total_bytes"].add_metric(g, (b.gpu_memory_total_mb or 0) * MB)
        if b.gpu_temperature_c is not None:
            gpu["temperature_celsius"].add_metric(g, b.gpu_temperature_c)
        if b.gpu_utilization_pct is not None:
            gpu["utilization_ratio"].add_metric(g, b.gpu_utilization_pct / 100)
    return [*families.values(), *gpu.values()]


@get("/metrics", include_in_schema=False)
async def metrics(request: Request, deps: DepsParam) -> Response[bytes]:
    fleet: Fleet | None = request.app.state.get(FLEET_STATE)
    if fleet is None:
        fleet = request.app.state[FLEET_STATE] = Fleet()
    await fleet.refresh(deps)
    body = generate_latest(Chain(REGISTRY, fleet))  # type: ignore[arg-type]
    return Response(body, media_type=CONTENT_TYPE_LATEST)


ROUTES = (metrics,)
