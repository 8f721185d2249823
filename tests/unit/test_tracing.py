"""Traces (shared.tracing), with an in-memory exporter: a line's spans from the api, the worker
and the results writer share one trace with the right parents and link to their batch's trace;
the batch's spans share the trace its id names; an unsampled line records nothing; a collector
that is down costs one log line."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared import tracing


@dataclass
class Line:  # what the runner sees of a RequestMessage or ResultMessage
    batch_id: str
    line: int
    custom_id: str


@dataclass
class Event:  # a batch-level message (BatchEvent)
    batch_id: str


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    memory = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.add_span_processor(SimpleSpanProcessor(memory))
    else:
        tracing.install("test", SimpleSpanProcessor(memory))
    return memory


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    exporter.clear()
    return exporter


def by_name(spans: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans.get_finished_spans()}


def test_one_lines_spans_share_a_trace_with_the_right_parents(spans: InMemorySpanExporter) -> None:
    batch_id = "batch_abc"
    # api: the publishing child mints the line's ids, the api records the span.
    sampler = tracing.LineSampler(1.0)
    request_headers = sampler.start(0, "line-0")
    sampler.end()
    tracing.record_minted("requests publish", batch_id, sampler.minted)
    assert request_headers is not None
    # worker: its pull of the line, the engine call in it, the result's headers.
    worker = tracing.start_message_span(
        "requests process", request_headers, Line(batch_id, 0, "line-0")
    )
    engine = tracing.start_child(worker, "engine /v1/chat/completions")
    tracing.end(engine)
    result_headers = tracing.headers_of(worker)
    tracing.end(worker)
    # results writer: a fetch holding this result and one of a line that was not sampled.
    fetch = [(result_headers, Line(batch_id, 0, "line-0")), (None, Line(batch_id, 1, "line-1"))]
    with tracing.fetch_spans("results process", fetch):
        pass

    got = by_name(spans)
    assert set(got) == {
        "requests publish",
        "requests process",
        "engine /v1/chat/completions",
        "results process",
    }
    publish, pulled = got["requests publish"], got["requests process"]
    call, written = got["engine /v1/chat/completions"], got["results process"]
    trace_ids = {s.context.trace_id for s in got.values()}
    assert trace_ids == {int(sampler.minted[0].trace_id, 16)}
    assert publish.parent is None
    assert publish.context.span_id == int(sampler.minted[0].span_id, 16)
    assert pulled.parent is not None and pulled.parent.span_id == publish.context.span_id
    assert call.parent is not None and call.parent.span_id == pulled.context.span_id
    assert written.parent is not None and written.parent.span_id == pulled.context.span_id
    batch = tracing.batch_span_context(batch_id)
    for span in (publish, pulled, written):
        assert [(lk.context.trace_id, lk.context.span_id) for lk in span.links] == [
            (batch.trace_id, batch.span_id)
        ]
    assert written.attributes is not None and written.attributes["jetbatch.custom_id"] == "line-0"


def test_a_batchs_spans_share_the_trace_its_id_names(spans: InMemorySpanExporter) -> None:
    batch_id = "batch_xyz"
    tracing.batch_created(batch_id, 0)
    with tracing.batch_span("batch validate", batch_id):
        with trace.get_tracer(__name__).start_as_current_span("requests publish"):
            pass
    with tracing.message_span("events process", None, Event(batch_id)):
        pass

    got = by_name(spans)
    root = tracing.batch_span_context(batch_id)
    assert got["batch create"].context.trace_id == root.trace_id
    assert got["batch create"].context.span_id == root.span_id
    assert got["batch create"].parent is None
    for name in ("batch validate", "events process"):
        parent = got[name].parent
        assert parent is not None and parent.span_id == root.span_id
        assert got[name].context.trace_id == root.trace_id
    nested = got["requests publish"].parent
    assert nested is not None and nested.span_id == got["batch validate"].context.span_id


def test_a_line_that_was_not_sampled_records_nothing(spans: InMemorySpanExporter) -> None:
    assert tracing.start_message_span("requests process", None, Line("b", 3, "c")) is None
    with tracing.message_span("requests process", {}, Line("b", 3, "c")):
        pass
    with tracing.fetch_spans("results process", [(None, Line("b", 3, "c"))] * 100):
        pass
    assert spans.get_finished_spans() == ()
    assert tracing.headers_of(None) is None


def test_lines_are_sampled_evenly_at_the_ratio() -> None:
    assert sum(tracing.line_sampled(n, 0.01) for n in range(50_000)) == 500
    assert tracing.line_sampled(0, 0.01)
    assert sum(tracing.line_sampled(n, 1.0) for n in range(1_000)) == 1_000
    assert not any(tracing.line_sampled(n, 0.0) for n in range(1_000))
    sampler = tracing.LineSampler(0.5)
    assert [sampler.start(n, str(n)) is not None for n in range(4)] == [True, False, True, False]


def test_the_exporter_comes_from_the_standard_variables() -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    assert tracing.exporter_from_env({}) is None
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert tracing.exporter_from_env({**endpoint, "OTEL_TRACES_EXPORTER": "none"}) is None
    assert isinstance(tracing.exporter_from_env(endpoint), Http)
    grpc = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317"}
    assert isinstance(
        tracing.exporter_from_env({**grpc, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}), Grpc
    )


class Down(SpanExporter):
    def __init__(self) -> None:
        self.calls = 0
        self.up = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        if self.up:
            return SpanExportResult.SUCCESS
        raise ConnectionRefusedError("collector down")


def test_a_collector_that_is_down_costs_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    inner = Down()
    quiet = tracing.Quiet(inner, pause_s=0.0)
    caplog.set_level(logging.INFO, logger="shared.tracing")
    for _ in range(5):
        assert quiet.export([]) is SpanExportResult.FAILURE
    inner.up = True
    assert quiet.export([]) is SpanExportResult.SUCCESS
    messages = [r.getMessage() for r in caplog.records if r.name == "shared.tracing"]
    assert len(messages) == 2
    assert "spans are dropped" in messages[0] and "takes spans again" in messages[1]
    paused = tracing.Quiet(Down(), pause_s=60.0)
    for _ in range(5):
        paused.export([])
    assert isinstance(paused.inner, Down) and paused.inner.calls == 1  # no retry while paused
