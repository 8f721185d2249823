"""Logging and tracing set-up, once per process. Trace context travels in NATS headers."""

from __future__ import annotations

import gc
import logging
import sys

from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider


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


def freeze_heap() -> None:
    """Move every object alive now (modules, classes, what start-up built) out of the garbage
    collector's sight. Full collections otherwise rescan them all and, under load, stall the
    event loop for 20-130 ms each (measured on the api and inference processes during a
    50,000-line batch: bench/interactive.py). Call again once a big import (vLLM) is done."""
    gc.collect()
    gc.freeze()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject_headers(headers: dict[str, str]) -> dict[str, str]:
    inject(headers)
    return headers


def extract_context(headers: dict[str, str] | None):  # type: ignore[no-untyped-def]
    return extract(headers or {})
