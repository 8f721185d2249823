"""Logging and tracing set-up, once per process. Trace context travels in NATS headers."""

from __future__ import annotations

import logging
import sys

from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from shared.lane import freeze_heap

__all__ = ["extract_context", "freeze_heap", "inject_headers", "setup", "tracer"]


def setup(service: str, level: str = "INFO") -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s",
        force=True,
    )
    for noisy in ("nats", "asyncio", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Spans are recorded; exporters (OTLP) are wired by the standard OTEL_* environment variables.
    trace.set_tracer_provider(TracerProvider(resource=Resource.create({"service.name": service})))
    freeze_heap()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject_headers(headers: dict[str, str]) -> dict[str, str]:
    inject(headers)
    return headers


def extract_context(headers: dict[str, str] | None):  # type: ignore[no-untyped-def]
    return extract(headers or {})
