"""The inference worker's Prometheus metrics (README: Metrics): lines it finished and failed,
tokens, time in the engine, latency from the request's publish to its result, and what its
heartbeat says (in flight, capacity, health, GPU readings)."""

from __future__ import annotations

import time

from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge, Histogram

from schemas.messages import ResultMessage, WorkerHeartbeat

# Seconds; a line waits in the queue from milliseconds to the batch's 24 h window.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600,
                   7200, 21600, 86400)  # fmt: skip
ENGINE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

LINES = Counter(
    "jetbatch_worker_lines",
    "Request lines whose result a worker published: outcome finished (a response) or failed"
    " (an error line)",
    ["model", "outcome"],
)
INPUT_TOKENS = Counter(
    "jetbatch_worker_input_tokens", "Prompt tokens of published results", ["model"]
)
OUTPUT_TOKENS = Counter(
    "jetbatch_worker_output_tokens", "Generated tokens of published results", ["model"]
)
GPU_SECONDS = Counter(
    "jetbatch_worker_engine_gpu_seconds",
    "Engine time the published results used (each request's share of the engine's busy time,"
    " times the worker's GPUs)",
    ["model"],
)
REQUEST_SECONDS = Histogram(
    "jetbatch_worker_request_seconds",
    "Wall time of one request in the worker, from taking it to its result",
    ["model"],
    buckets=ENGINE_BUCKETS,
)
LINE_LATENCY = Histogram(
    "jetbatch_line_latency_seconds",
    "From a request's publish on REQUESTS to its result's publish on RESULTS",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
IN_FLIGHT = Gauge(
    "jetbatch_worker_in_flight", "Requests in the worker's engine", ["model", "worker"]
)
CAPACITY = Gauge(
    "jetbatch_worker_capacity", "Requests the engine holds at most", ["model", "worker"]
)
HEALTHY = Gauge(
    "jetbatch_worker_healthy", "1 while the worker takes requests (its GPU under the thresholds)",
    ["model", "worker"],
)  # fmt: skip
HEARTBEAT = Gauge(
    "jetbatch_worker_last_heartbeat_timestamp_seconds",
    "When the worker last wrote its heartbeat (Unix time)",
    ["model", "worker"],
)
GPU_MEMORY_USED = Gauge(
    "jetbatch_worker_gpu_memory_used_bytes", "GPU memory in use (NVML)", ["worker", "gpu"]
)
GPU_MEMORY_TOTAL = Gauge("jetbatch_worker_gpu_memory_total_bytes", "GPU memory", ["worker", "gpu"])
GPU_TEMPERATURE = Gauge(
    "jetbatch_worker_gpu_temperature_celsius", "GPU temperature (NVML)", ["worker", "gpu"]
)
GPU_UTILIZATION = Gauge(
    "jetbatch_worker_gpu_utilization_ratio",
    "Share of the last sample period the GPU was busy, 0-1 (NVML)",
    ["worker", "gpu"],
)

MB = 1024 * 1024


class WorkerMetrics:
    """One worker's metrics, their label children looked up once (a result is on the hot path)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._finished = LINES.labels(model, "finished")
        self._failed = LINES.labels(model, "failed")
        self._input = INPUT_TOKENS.labels(model)
        self._output = OUTPUT_TOKENS.labels(model)
        self._gpu = GPU_SECONDS.labels(model)
        self._latency = LINE_LATENCY.labels(model)
        self.request_seconds = REQUEST_SECONDS.labels(model)

    def published(self, result: ResultMessage, request: Msg, now: float | None = None) -> None:
        """A result is on RESULTS: count its line and tokens, and its latency since the
        request's publish (the JetStream timestamp in the request's ack subject)."""
        if result.error_code is None and result.status_code < 400:
            self._finished.inc()
        else:
            self._failed.inc()
        if result.input_tokens:
            self._input.inc(result.input_tokens)
        if result.output_tokens:
            self._output.inc(result.output_tokens)
        if result.gpu_ms:
            self._gpu.inc(result.gpu_ms / 1000)
        published_ns = published_at_ns(request)
        if published_ns:
            now = time.time() if now is None else now
            self._latency.observe(max(0.0, now - published_ns / 1e9))

    def heartbeat(self, beat: WorkerHeartbeat) -> None:
        """What the heartbeat reports, GPU readings included (absent without a GPU)."""
        labels = (beat.model, beat.worker_id)
        IN_FLIGHT.labels(*labels).set(beat.in_flight)
        CAPACITY.labels(*labels).set(beat.capacity)
        HEALTHY.labels(*labels).set(1 if beat.healthy else 0)
        HEARTBEAT.labels(*labels).set(beat.seen_at)
        if beat.gpu_index is None or beat.gpu_memory_used_mb is None:
            return
        gpu = (beat.worker_id, str(beat.gpu_index))
        GPU_MEMORY_USED.labels(*gpu).set(beat.gpu_memory_used_mb * MB)
        GPU_MEMORY_TOTAL.labels(*gpu).set((beat.gpu_memory_total_mb or 0) * MB)
        if beat.gpu_temperature_c is not None:
            GPU_TEMPERATURE.labels(*gpu).set(beat.gpu_temperature_c)
        if beat.gpu_utilization_pct is not None:
            GPU_UTILIZATION.labels(*gpu).set(beat.gpu_utilization_pct / 100)


def published_at_ns(msg: Msg) -> int:
    """The JetStream timestamp (ns) of a pulled message, from its ack subject:
    `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>` or the 12-token form
    with a domain and account hash; 0 when there is none (a message not from JetStream)."""
    tokens = (msg.reply or "").split(".")
    try:
        if len(tokens) == 9:
            return int(tokens[7])
        if len(tokens) >= 12:
            return int(tokens[9])
    except ValueError:
        pass
    return 0
