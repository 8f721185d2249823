"""Traces: the OTLP exporter (configured by the standard `OTEL_*` variables, off when unset),
the batch's trace and the lines' traces.

A batch is one trace (created, validated, published, finalized, its webhooks delivered). Its ids
are derived from the batch id, so every service that works on a batch joins that trace without
being told anything: the api's `batch create` span has exactly those ids (the root), the others
are its children. Each sampled line (JETBATCH_TRACE_LINE_RATIO) is a trace of its own, linked to
its batch's: the api's publish is its root, and the context travels in the NATS headers
(`traceparent`) of the request, then of the result. A line that is not sampled carries no trace
header and no service records anything for it, so a 50,000-line batch costs a few hundred spans.

With no exporter configured no SDK provider is installed: every span is the API's no-op.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from typing import Any

import msgspec
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
# After a failed export, spans are dropped without trying for this long: a collector that is
# down costs one attempt per interval, never a stalled exporter thread retrying every batch.
PAUSE_AFTER_FAILURE_S = 30.0

_tracer = trace.get_tracer(__name__)
# Ids the next span must have (the batch's root, a line's publish minted in another process).
_forced: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "jetbatch_forced_ids", default=None
)


class _Ids(RandomIdGenerator):
    def generate_trace_id(self) -> int:
        forced = _forced.get()
        return forced[0] if forced is not None else super().generate_trace_id()

    def generate_span_id(self) -> int:
        forced = _forced.get()
        return forced[1] if forced is not None else super().generate_span_id()


# -- set-up -------------------------------------------------------------------------------------


def exporter_from_env(env: dict[str, str] | None = None) -> SpanExporter | None:
    """The OTLP exporter the standard variables ask for, or None (tracing off): an endpoint
    must be set (OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT) and OTEL_TRACES_EXPORTER not `none`.
    OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL: `http/protobuf` (default) or `grpc`; headers,
    timeout and compression are read by the exporter itself."""
    env = dict(os.environ) if env is None else env
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() in ("none", ""):
        return None
    if not (
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    ):
        return None
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    if protocol.strip().lower() == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def install(service: str, processor: SpanProcessor) -> TracerProvider:
    """Make an SDK provider with `processor` this process's tracer provider (once)."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": service}), id_generator=_Ids()
    )
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    return provider


def configure(service: str) -> bool:
    """Export this process's spans when the OTEL_* variables say where; True if they do."""
    exporter = exporter_from_env()
    if exporter is None:
        return False
    # The exporter's own loggers report every failed attempt; Quiet reports an outage once.
    logging.getLogger("opentelemetry.exporter").setLevel(logging.CRITICAL)
    logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)
    # The queue is bounded (OTEL_BSP_MAX_QUEUE_SIZE, 2,048): when it is full new spans are
    # dropped; exporting runs on the processor's own thread, never on the event loop.
    install(service, BatchSpanProcessor(Quiet(exporter)))
    return True


def enabled() -> bool:
    """Whether spans are recorded in this process (an SDK provider is installed)."""
    return isinstance(trace.get_tracer_provider(), TracerProvider)


class Quiet(SpanExporter):
    """An exporter that reports an outage with one log line (and its end with another), and
    drops spans without trying for PAUSE_AFTER_FAILURE_S after a failure."""

    def __init__(self, inner: SpanExporter, pause_s: float = PAUSE_AFTER_FAILURE_S) -> None:
        self.inner = inner
        self.pause_s = pause_s
        self.dropped = 0
        self._down_since: float | None = None
        self._retry_at = 0.0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        now = time.monotonic()
        if self._down_since is not None and now < self._retry_at:
            self.dropped += len(spans)
            return SpanExportResult.FAILURE
        try:
            result = self.inner.export(spans)
        except Exception as e:
            result, reason = SpanExportResult.FAILURE, repr(e)
        else:
            reason = "the collector refused or did not answer"
        if result is SpanExportResult.SUCCESS:
            if self._down_since is not None:
                log.info(
                    "traces: the OTLP collector takes spans again; %d dropped meanwhile",
                    self.dropped,
                )
                self._down_since, self.dropped = None, 0
            return result
        self.dropped += len(spans)
        self._retry_at = time.monotonic() + self.pause_s
        if self._down_since is None:
            self._down_since = now
            log.warning(
                "traces: exporting to the OTLP collector failed (%s); spans are dropped until"
                " it takes them again (retried every %.0f s)",
                reason, self.pause_s,
            )  # fmt: skip
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)


# -- the batch's trace -------------------------------------------------------------------------


def _derived(batch_id: str, bits: int, salt: bytes) -> int:
    digest = hashlib.blake2b(batch_id.encode(), digest_size=bits // 8, person=salt).digest()
    return int.from_bytes(digest, "big") or 1


def batch_span_context(batch_id: str) -> SpanContext:
    """The span context of the batch's root span (`batch create`), derived from its id."""
    return SpanContext(
        trace_id=_derived(batch_id, 128, b"jetbatch-trace"),
        span_id=_derived(batch_id, 64, b"jetbatch-span"),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )


def batch_context(batch_id: str | None) -> Context | None:
    """A context whose parent is the batch's root span (None without a batch id)."""
    if not batch_id:
        return None
    return trace.set_span_in_context(NonRecordingSpan(batch_span_context(batch_id)))


def batch_link(batch_id: str) -> Link:
    return Link(batch_span_context(batch_id))


def batch_created(batch_id: str, start_ns: int, **attributes: Any) -> None:
    """Record the batch's root span, `batch create`, from `start_ns` to now."""
    if not enabled():
        return
    root = batch_span_context(batch_id)
    token = _forced.set((root.trace_id, root.span_id))
    try:
        span = _tracer.start_span(
            "batch create",
            context=Context(),
            kind=SpanKind.SERVER,
            start_time=start_ns,
            attributes={"jetbatch.batch_id": batch_id, **attributes},
        )
    finally:
        _forced.reset(token)
    span.end()


@contextlib.contextmanager
def batch_span(name: str, batch_id: str | None, **attributes: Any) -> Iterator[None]:
    """A span of the batch's trace, current while the block runs."""
    context = batch_context(batch_id)
    attrs = {"jetbatch.batch_id": batch_id or "", **attributes}
    with _tracer.start_as_current_span(name, context=context, attributes=attrs):
        yield


# -- the lines' traces -------------------------------------------------------------------------


def line_sampled(line: int, ratio: float) -> bool:
    """One line in every 1/ratio, evenly spread, the first line always (ratio > 0)."""
    return ratio > 0 and math.floor(line * ratio) != math.floor((line - 1) * ratio)


class MintedSpan(msgspec.Struct, kw_only=True):
    """A line's publish span made in a process that exports nothing (the api's publishing
    child): its ids went out in the request's `traceparent`; the api records it."""

    line: int
    custom_id: str
    trace_id: str  # hex
    span_id: str  # hex
    start_ns: int
    end_ns: int = 0


class LineSampler:
    """Picks the lines to trace and mints their publish spans' ids, without an SDK."""

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio
        self.minted: list[MintedSpan] = []

    def start(self, line: int, custom_id: str) -> dict[str, str] | None:
        """The line's trace headers, or None when it is not sampled."""
        if not line_sampled(line, self.ratio):
            return None
        trace_id = f"{random.getrandbits(128) or 1:032x}"
        span_id = f"{random.getrandbits(64) or 1:016x}"
        self.minted.append(
            MintedSpan(
                line=line,
                custom_id=custom_id,
                trace_id=trace_id,
                span_id=span_id,
                start_ns=time.time_ns(),
            )
        )
        return {TRACEPARENT: f"00-{trace_id}-{span_id}-01"}

    def end(self) -> None:
        self.minted[-1].end_ns = time.time_ns()


def record_minted(name: str, batch_id: str, minted: Sequence[MintedSpan]) -> None:
    """Record the publish spans a LineSampler minted, with their ids, linked to the batch."""
    if not enabled():
        return
    link = batch_link(batch_id)
    for m in minted:
        token = _forced.set((int(m.trace_id, 16), int(m.span_id, 16)))
        try:
            span = _tracer.start_span(
                name,
                context=Context(),
                kind=SpanKind.PRODUCER,
                links=[link],
                start_time=m.start_ns,
                attributes=_line_attributes(batch_id, m.line, m.custom_id),
            )
        finally:
            _forced.reset(token)
        span.end(end_time=m.end_ns or m.start_ns)


def _line_attributes(batch_id: str, line: int | None, custom_id: str | None) -> dict[str, Any]:
    attributes: dict[str, Any] = {"jetbatch.batch_id": batch_id}
    if line is not None:
        attributes["jetbatch.line"] = line
    if custom_id is not None:
        attributes["jetbatch.custom_id"] = custom_id
    return attributes


def traced(headers: dict[str, str] | None) -> bool:
    return bool(headers) and TRACEPARENT in headers  # type: ignore[operator]


def context_for(headers: dict[str, str] | None, value: object) -> Context | None:
    """Where a consumed message's span belongs: its own trace (a sampled line's headers), its
    batch's trace (a batch-level message), a new trace (anything else), or nowhere (None: a
    line that was not sampled records nothing)."""
    if traced(headers):
        return extract(headers)
    if hasattr(value, "line"):
        return None
    return batch_context(getattr(value, "batch_id", None)) or Context()


def _links(headers: dict[str, str] | None, value: object) -> list[Link]:
    batch_id = getattr(value, "batch_id", None)
    return [batch_link(batch_id)] if batch_id and traced(headers) else []


def start_message_span(name: str, headers: dict[str, str] | None, value: object) -> Any:
    """A consumer's span for one message (see context_for), not made current; None when the
    message records nothing."""
    context = context_for(headers, value)
    if context is None:
        return None
    return _tracer.start_span(
        name,
        context=context,
        kind=SpanKind.CONSUMER,
        links=_links(headers, value),
        attributes=_line_attributes(
            getattr(value, "batch_id", "") or "",
            getattr(value, "line", None),
            getattr(value, "custom_id", None),
        ),
    )


@contextlib.contextmanager
def message_span(name: str, headers: dict[str, str] | None, value: object) -> Iterator[None]:
    """start_message_span, current while the block runs."""
    span = start_message_span(name, headers, value)
    if span is None:
        yield
        return
    with trace.use_span(span, end_on_exit=True):
        yield


@contextlib.contextmanager
def fetch_spans(
    name: str, messages: Sequence[tuple[dict[str, str] | None, object]]
) -> Iterator[None]:
    """One span per message of a fetch that records something, all ending with the block
    (a fetch is handled, e.g. written, as one)."""
    spans = [s for h, v in messages if (s := start_message_span(name, h, v)) is not None]
    try:
        yield
    except BaseException as e:
        for span in spans:
            span.record_exception(e)
            span.set_status(trace.StatusCode.ERROR)
        raise
    finally:
        for span in spans:
            span.set_attribute("messaging.batch.message_count", len(messages))
            span.end()


def start_child(parent: Any, name: str, **attributes: Any) -> Any:
    """A span under `parent` (None: none)."""
    if parent is None:
        return None
    context = trace.set_span_in_context(parent)
    return _tracer.start_span(name, context=context, attributes=attributes)


def end(span: Any) -> None:
    if span is not None:
        span.end()


def headers_of(span: Any) -> dict[str, str] | None:
    """Trace headers that make `span` the parent of what a message leads to (None: none)."""
    if span is None:
        return None
    headers: dict[str, str] = {}
    inject(headers, context=trace.set_span_in_context(span))
    return headers or None
