"""Logging and tracing set-up, once per process. Trace context travels in NATS headers."""

from __future__ import annotations

import logging

from opentelemetry import trace
from opentelemetry.propagate import extract, inject

from shared import logs, tracing
from shared.lane import freeze_heap
from shared.observability_config import ObservabilitySettings

__all__ = ["extract_context", "freeze_heap", "inject_headers", "setup", "tracer"]


def setup(
    service: str, level: str = "INFO", observability: ObservabilitySettings | None = None
) -> None:
    """Logs (shared.logs: text or JSON, stderr and the rotating file) and traces
    (shared.tracing: exported when the OTEL_* variables name a collector, else not recorded)."""
    obs = observability or ObservabilitySettings()
    handlers = logs.handlers(
        service,
        log_format=obs.log_format,
        log_file=obs.log_file,
        max_bytes=obs.log_file_max_bytes,
        backups=obs.log_file_backups,
    )
    logging.basicConfig(level=level, handlers=handlers, force=True)
    for noisy in ("nats", "asyncio", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    tracing.configure(service)
    freeze_heap()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject_headers(headers: dict[str, str]) -> dict[str, str]:
    inject(headers)
    return headers


def extract_context(headers: dict[str, str] | None):  # type: ignore[no-untyped-def]
    return extract(headers or {})
