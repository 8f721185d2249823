"""Metrics logic (README: Metrics): metrics ports from one base, the runner's outcome counts, a
worker's GPU gauges from an NVML reading (replayed: there is no GPU here), a result's latency
from its request's JetStream timestamp, and the fleet's worker figures from heartbeats."""

from __future__ import annotations

import socket
import subprocess
import sys
from types import SimpleNamespace

import msgspec
import pytest
from nats.aio.msg import Msg
from prometheus_client import REGISTRY

from schemas.messages import ResultMessage
from services.api.metrics import heartbeat_families
from services.inference.gpu import GpuMonitor
from services.inference.instant_engine import InstantEngine
from services.inference.metrics import WorkerMetrics, published_at_ns
from services.inference.service import Worker
from services.results_writer.metrics import final_status
from shared import config, metrics
from shared.config import ConfigError
from shared.consumer import Counts

SETTINGS = config.load({"JETBATCH_ENGINE": "instant"})
CHAT = SETTINGS.model("SmolLM2-135M-Instruct")


def value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_each_service_gets_its_port_from_one_base_and_workers_do_not_share_one() -> None:
    off = config.load({})
    assert metrics.port_of(off, "watchdog") is None  # 0 = off: the default
    on = config.load({"JETBATCH_METRICS_PORT": "9400"})
    ports = {s: metrics.port_of(on, s) for s in ("results_writer", "webhook_notifier", "watchdog")}
    assert ports == {"results_writer": 9400, "webhook_notifier": 9401, "watchdog": 9402}
    assert [metrics.port_of(on, "inference", gpu) for gpu in (None, 0, 1, 7)] == [
        9410, 9410, 9411, 9417,
    ]  # fmt: skip
    pinned = config.load({"JETBATCH_METRICS_PORT": "9400", "JETBATCH_METRICS_WORKER": "3"})
    assert metrics.port_of(pinned, "inference", 0) == 9413  # the index wins over --gpu
    assert metrics.port_of(on, "api") is None  # the api serves /metrics on its own port
    many = config.load({"JETBATCH_METRICS_PORT": "9400", "JETBATCH_MODELS": "a=/a,b=/b,c=/c"})
    listed = metrics.up_urls(many, "http://127.0.0.1:8000")
    assert listed[0] == "http://127.0.0.1:8000/metrics"
    assert len(set(listed)) == len(listed) == 1 + 3 + 3


def test_a_taken_metrics_port_is_a_config_error_naming_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = config.load({"JETBATCH_METRICS_PORT": str(port)})
        with pytest.raises(ConfigError, match="JETBATCH_METRICS_PORT"):
            metrics.expose(settings, "results_writer")
        settings = config.load({"JETBATCH_METRICS_PORT": str(port - 10)})
        with pytest.raises(ConfigError, match="JETBATCH_METRICS_WORKER"):
            metrics.expose(settings, "inference", 0)


def test_a_service_process_on_a_taken_metrics_port_exits_2_naming_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {
            "PATH": "/usr/bin:/bin",
            "JETBATCH_METRICS_PORT": str(taken.getsockname()[1] - 2),  # the watchdog's: +2
            # Checked to be set, never reached: the port is taken before anything connects.
            "JETBATCH_NATS_URL": "nats://127.0.0.1:9",
            "JETBATCH_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none",
        }
        done = subprocess.run(
            [sys.executable, "-m", "services.watchdog"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "JETBATCH_METRICS_PORT" in done.stderr and "not available" in done.stderr


def test_runner_counts_reach_the_consumer_metrics_by_outcome() -> None:
    counts = Counts(metrics=metrics.ConsumerCounter("test_consumer", "TESTS"))
    counts.add("acked", 3)
    counts.add("retried")
    counts.add("rejected")
    counts.add("failed_fetches")
    assert (counts.acked, counts.retried, counts.rejected, counts.failed_fetches) == (3, 1, 1, 1)
    key = {"consumer": "test_consumer", "stream": "TESTS"}
    total = "jetbatch_consumer_messages_total"
    assert value(total, **key, outcome="acked") == 3
    assert value(total, **key, outcome="retried") == 1
    assert value(total, **key, outcome="rejected") == 1
    assert value("jetbatch_consumer_failed_fetches_total", **key) == 1


class FakeNvml:
    """What pynvml answers for an H100 at work (recorded values)."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def nvmlDeviceGetMemoryInfo(self, handle: object) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(used=73_400 * 1024 * 1024, total=81_559 * 1024 * 1024)

    def nvmlDeviceGetName(self, handle: object) -> bytes:  # noqa: N802
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetTemperature(self, handle: object, sensor: int) -> int:  # noqa: N802
        return 61

    def nvmlDeviceGetUtilizationRates(self, handle: object) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(gpu=97)


def gpu_worker(worker_id: str) -> Worker:
    monitor = GpuMonitor(None)
    monitor.index, monitor._handle, monitor._nvml = 3, object(), FakeNvml()  # type: ignore[assignment]
    return Worker(SETTINGS, CHAT, InstantEngine(CHAT), monitor, worker_id)


def test_a_heartbeat_sets_the_workers_gpu_and_capacity_gauges() -> None:
    beat = gpu_worker("w-gpu").heartbeat()
    assert beat.gpu_temperature_c == 61
    gpu = {"worker": "w-gpu", "gpu": "3"}
    assert value("jetbatch_worker_gpu_temperature_celsius", **gpu) == 61
    assert value("jetbatch_worker_gpu_utilization_ratio", **gpu) == 0.97
    assert value("jetbatch_worker_gpu_memory_used_bytes", **gpu) == 73_400 * 1024 * 1024
    assert value("jetbatch_worker_gpu_memory_total_bytes", **gpu) == 81_559 * 1024 * 1024
    worker = {"model": CHAT.name, "worker": "w-gpu"}
    assert value("jetbatch_worker_capacity", **worker) == 256
    assert value("jetbatch_worker_in_flight", **worker) == 0
    assert value("jetbatch_worker_healthy", **worker) == 1
    assert value("jetbatch_worker_last_heartbeat_timestamp_seconds", **worker) == beat.seen_at


def test_without_a_gpu_the_gpu_gauges_are_absent() -> None:
    Worker(SETTINGS, CHAT, InstantEngine(CHAT), GpuMonitor(None), "w-cpu").heartbeat()
    assert value("jetbatch_worker_capacity", model=CHAT.name, worker="w-cpu") == 256
    assert value("jetbatch_worker_gpu_temperature_celsius", worker="w-cpu", gpu="0") is None


def test_the_fleet_reads_worker_figures_and_heartbeat_age_from_heartbeats() -> None:
    beat = gpu_worker("w-fleet").heartbeat()
    stale = msgspec.structs.replace(beat, worker_id="w-old", seen_at=beat.seen_at - 90)
    cpu = msgspec.structs.replace(beat, worker_id="w-cpu", gpu_index=None, gpu_memory_used_mb=None)
    samples = {
        (s.name, s.labels.get("worker"), s.labels.get("gpu")): s.value
        for family in heartbeat_families([beat, stale, cpu], beat.seen_at + 5)
        for s in family.samples
    }
    age = "jetbatch_fleet_worker_heartbeat_age_seconds"
    assert samples[(age, "w-fleet", None)] == 5
    assert samples[(age, "w-old", None)] == 95
    assert samples[("jetbatch_fleet_worker_gpu_temperature_celsius", "w-fleet", "3")] == 61
    assert not any(k[1] == "w-cpu" and "gpu" in k[0] for k in samples)
    assert samples[("jetbatch_fleet_worker_capacity", "w-cpu", None)] == 256


def jetstream_msg(reply: str) -> Msg:
    return Msg(None, subject="jetbatch.requests.m.p.batch", reply=reply)  # type: ignore[arg-type]


def test_a_results_latency_runs_from_its_requests_jetstream_timestamp() -> None:
    published_ns = 1_700_000_000_000_000_000
    v1 = jetstream_msg(f"$JS.ACK.REQUESTS.inference-m.1.42.42.{published_ns}.0")
    v2 = jetstream_msg(f"$JS.ACK.domain.ACCHASH.REQUESTS.inference-m.1.42.42.{published_ns}.0.tok")
    assert published_at_ns(v1) == published_at_ns(v2) == published_ns
    assert published_at_ns(jetstream_msg("")) == 0

    model = "latency-test-model"
    before = value("jetbatch_line_latency_seconds_count", model=model) or 0
    m = WorkerMetrics(model)
    ok = ResultMessage(batch_id="b", line=0, custom_id="c", request_id="r", status_code=200,
                       input_tokens=7, output_tokens=11, gpu_ms=1500)  # fmt: skip
    failed = ResultMessage.failure(
        batch_id="b", line=1, custom_id="d", request_id="r2", status_code=500, code="engine_error",
        message="x", worker_id="w",
    )  # fmt: skip
    m.published(ok, v1, now=published_ns / 1e9 + 2.5)
    m.published(failed, v2, now=published_ns / 1e9 + 4)
    assert value("jetbatch_line_latency_seconds_count", model=model) == before + 2
    assert value("jetbatch_line_latency_seconds_sum", model=model) == pytest.approx(6.5)
    assert value("jetbatch_worker_lines_total", model=model, outcome="finished") == 1
    assert value("jetbatch_worker_lines_total", model=model, outcome="failed") == 1
    assert value("jetbatch_worker_input_tokens_total", model=model) == 7
    assert value("jetbatch_worker_output_tokens_total", model=model) == 11
    assert value("jetbatch_worker_engine_gpu_seconds_total", model=model) == 1.5


def test_finalization_is_labelled_with_the_status_the_batch_ends_in() -> None:
    assert final_status("finalizing") == "completed"
    assert final_status("cancelling") == "cancelled"
    assert final_status("in_progress") == "expired"  # an expiring batch closed by the writer


def test_no_metric_carries_a_batch_line_or_key_label() -> None:
    forbidden = {"batch", "batch_id", "line", "custom_id", "request_id", "key", "api_key", "body"}
    # Every module above is imported, so all of jetbatch's metrics are registered.
    for family in REGISTRY.collect():
        if family.name.startswith("jetbatch_"):
            for sample in family.samples:
                assert not forbidden & set(sample.labels), (family.name, sample.labels)
