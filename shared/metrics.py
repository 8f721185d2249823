"""Prometheus metrics of every service process (README: Metrics), on prometheus-client.

Each service other than the api serves its metrics on a port of its own, derived from one base
(`JETBATCH_METRICS_PORT`, 0 = off) by the service's offset; inference workers add their worker
index, so several on one machine never share a port. The api serves `/metrics` on its own port.
The generic figures live here: what the one consumer runner (shared/consumer.py) did with each
consumer's messages. Labels name consumers, streams, models, projects, outcomes and workers,
never a batch, a line, a key or any content.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from prometheus_client import REGISTRY, Counter, start_http_server
from prometheus_client.registry import Collector

from shared.config import ConfigError, Settings, variable

log = logging.getLogger(__name__)

# Offsets from JETBATCH_METRICS_PORT (README: Metrics). Inference adds its worker index.
PORT_OFFSETS = {"results_writer": 0, "webhook_notifier": 1, "watchdog": 2, "inference": 10}

CONSUMER_MESSAGES = Counter(
    "jetbatch_consumer_messages",
    "Messages a consumer settled, by outcome: acked (handled), retried (nak, redelivered"
    " later), rejected (dead-lettered and termed)",
    ["consumer", "stream", "outcome"],
)
CONSUMER_FAILED_FETCHES = Counter(
    "jetbatch_consumer_failed_fetches",
    "Pulls of a consumer that failed (NATS unreachable, a leader election)",
    ["consumer", "stream"],
)


class ConsumerCounter:
    """One consumer's outcome counters, their label children looked up once (a message's
    settling is on the hot path: ~10-40k a second)."""

    OUTCOMES = ("acked", "retried", "rejected")

    def __init__(self, consumer: str, stream: str) -> None:
        self._children = {o: CONSUMER_MESSAGES.labels(consumer, stream, o) for o in self.OUTCOMES}
        self._failed_fetches = CONSUMER_FAILED_FETCHES.labels(consumer, stream)

    def count(self, outcome: str, n: int = 1) -> None:
        if outcome == "failed_fetches":
            self._failed_fetches.inc(n)
        elif n:
            self._children[outcome].inc(n)


def port_of(settings: Settings, service: str, worker: int | None = None) -> int | None:
    """The metrics port of `service` (None: metrics ports are off). Inference: the base + 10 +
    its worker index (JETBATCH_METRICS_WORKER, else its first GPU, else 0)."""
    base = settings.observability.metrics_port
    if not base or service not in PORT_OFFSETS:
        return None
    port = base + PORT_OFFSETS[service]
    if service == "inference":
        index = settings.observability.metrics_worker
        port += index if index >= 0 else (worker or 0)
    return port


def expose(settings: Settings, service: str, worker: int | None = None) -> str | None:
    """Serve this process's metrics on its port (a daemon thread); returns the URL, or None
    when metrics ports are off. A port already taken is a ConfigError naming the setting (the
    process exits 2)."""
    port = port_of(settings, service, worker)
    if port is None:
        return None
    host = settings.observability.metrics_host
    try:
        start_http_server(port, addr=host)
    except OSError as e:
        names = variable("observability.metrics_port")
        if service == "inference":
            names += f" (+ {variable('observability.metrics_worker')} or --gpu)"
        raise ConfigError(
            f"{service}: metrics port {host}:{port} is not available ({e.strerror or e}): set"
            f" {names} to free ports, or 0 for none"
        ) from None
    url = f"http://{host}:{port}/metrics"
    log.info("%s: metrics on %s", service, url)
    return url


def urls(settings: Settings, services: Iterable[tuple[str, int | None]]) -> list[str]:
    """The metrics URLs of (service, worker index) pairs."""
    host = settings.observability.metrics_host
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    ports = (port_of(settings, service, worker) for service, worker in services)
    return [f"http://{host}:{port}/metrics" for port in ports if port is not None]


def up_urls(settings: Settings, api_base: str) -> list[str]:
    """What `jetbatch up` starts: the api's `/metrics` (the fleet's figures included), then each
    other service's port, its inference workers numbered in JETBATCH_MODELS' order."""
    services: list[tuple[str, int | None]] = [
        ("results_writer", None), ("webhook_notifier", None), ("watchdog", None),
    ]  # fmt: skip
    services += [("inference", index) for index in range(len(settings.models))]
    return [f"{api_base}/metrics", *urls(settings, services)]


class Chain:
    """Several collectors as one registry for `generate_latest` (the api: this process's
    metrics and the fleet's)."""

    def __init__(self, *collectors: Collector) -> None:
        self.collectors = collectors or (REGISTRY,)

    def collect(self):  # type: ignore[no-untyped-def]
        for collector in self.collectors:
            yield from collector.collect()
