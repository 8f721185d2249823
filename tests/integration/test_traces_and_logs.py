"""Traces and logs across service processes: one batch through the api, an inference worker and
the results writer (separate processes, tests/harness.py), its spans exported over OTLP/HTTP to
a real receiver (tests/otlp_receiver.py) and its records in each service's log file, read back
by `jetbatch logs`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from services import logs_cli
from shared import tracing
from shared.embedded import EmbeddedNats
from tests.harness import API_KEY, Harness
from tests.helpers import chat_jsonl
from tests.otlp_receiver import Receiver, Span

SERVICES = ("api", "results_writer", "worker-1")
LINES = 4  # at ratio 0.5: lines 0 and 2 are traced, 1 and 3 are not


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def harness(
    nats_server: EmbeddedNats, database_url: str, tmp_path: Path, receiver: Receiver
) -> Iterator[Harness]:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "JETBATCH_TRACE_LINE_RATIO": "0.5",
        "JETBATCH_LOG_FORMAT": "json",
    }
    h = Harness(tmp_path / "harness", env, nats=nats_server, database_url=database_url)
    h.start_servers()
    for name in SERVICES:  # each its own file, as `jetbatch up` does
        h.start(name, JETBATCH_LOG_FILE=str(logs_cli.log_path(h.root / "data", name)))
    h.wait_api()
    yield h
    h.stop_all()


def run_batch(h: Harness) -> str:
    client = openai.OpenAI(base_url=h.base_url, api_key=API_KEY, max_retries=3, timeout=30)
    upload = client.files.create(file=("in.jsonl", chat_jsonl(LINES, "tr")), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 60
    while batch.status != "completed":
        assert batch.status not in ("failed", "expired", "cancelled"), batch
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    return batch.id


def line_spans(spans: list[Span], custom_id: str) -> dict[str, Span]:
    return {s.service: s for s in spans if s.attributes.get("jetbatch.custom_id") == custom_id}


def test_a_sampled_lines_trace_crosses_three_services_and_links_its_batch(
    harness: Harness, receiver: Receiver
) -> None:
    batch_id = run_batch(harness)
    traced = ("tr-0", "tr-2")

    def complete(spans: list[Span]) -> bool:
        names = {s.name for s in spans}  # each service exports on its own schedule
        return {"batch create", "batch validate", "batch finalize"} <= names and all(
            {"api", "inference", "results_writer"} <= line_spans(spans, c).keys() for c in traced
        )

    spans = receiver.wait_for(complete)
    root = tracing.batch_span_context(batch_id)
    batch_trace = f"{root.trace_id:032x}"
    for custom_id in traced:
        line = line_spans(spans, custom_id)
        publish, pulled, written = line["api"], line["inference"], line["results_writer"]
        assert publish.trace_id == pulled.trace_id == written.trace_id != batch_trace
        assert publish.parent_id == ""
        assert pulled.parent_id == publish.span_id
        assert written.parent_id == pulled.span_id
        engine = [s for s in spans if s.parent_id == pulled.span_id and s.name.startswith("engine")]
        assert len(engine) == 1
        for span in (publish, pulled, written):
            assert span.links == ((batch_trace, f"{root.span_id:016x}"),)
    for untraced in ("tr-1", "tr-3"):
        assert line_spans(spans, untraced) == {}
    batch = {s.name: s for s in spans if s.trace_id == batch_trace}
    assert batch["batch create"].parent_id == "" and batch["batch create"].service == "api"
    assert batch["batch validate"].parent_id == f"{root.span_id:016x}"
    assert batch["batch finalize"].service == "results_writer"


def test_each_services_log_file_has_records_with_the_batch_id(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    batch_id = run_batch(harness)
    data = harness.root / "data"
    deadline = time.monotonic() + 20
    while True:
        records = logs_cli.read([logs_cli.log_path(data, "api")])
        if any(r.batch_id == batch_id for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {r.service for r in records} == {"api"}
    assert any(r.batch_id == batch_id and "created" in r.message for r in records)
    assert logs_cli.main(["api", "--tail", "1000"], {"JETBATCH_DATA_DIR": str(data)}) == 0
    out = capsys.readouterr().out
    assert f"batch_id={batch_id}" in out
    assert out.splitlines()[-1].startswith("-- ") and out.splitlines()[-1].endswith("in api")
