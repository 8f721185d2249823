"""Issue 14's "done when", on the system as an operator runs it (`jetbatch up`, vLLM on the CPU,
OTEL_EXPORTER_OTLP_ENDPOINT and JETBATCH_METRICS_PORT set): one batch, and without reading any
code its lines are found in the metrics (the api's fleet figures and the worker's own port), its
trace across three services in a real OTLP receiver, its tokens in the usage API through the
SDK's admin client, and its log lines through `jetbatch logs`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from schemas.projects import DEFAULT_PROJECT_ID
from tests.e2e.conftest import REPO, System, run_batch
from tests.helpers import CHAT_MODEL, chat_jsonl, wait_until_sync
from tests.otlp_receiver import Receiver, Span

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

LINES = 3


def samples(url: str, name: str) -> list[tuple[dict[str, str], float]]:
    text = httpx.get(url, timeout=10).text
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def metrics_urls(system: System) -> list[str]:
    """The metrics URLs `jetbatch up` printed (README: Metrics)."""
    return re.findall(r"^metrics: (\S+)$", system.log_path.read_text(), re.MULTILINE)


def test_one_batch_is_seen_in_metrics_traces_usage_and_logs(
    system: System, client: openai.OpenAI, otlp: Receiver
) -> None:
    since = int(time.time()) - 120
    batch = run_batch(client, chat_jsonl(LINES, "seen", max_tokens=8), "observed.jsonl")
    assert batch.request_counts is not None and batch.request_counts.completed == LINES

    # Metrics: the api's /metrics carries the fleet (PostgreSQL's lines), the worker its own.
    api_metrics = f"{system.base_url.removesuffix('/v1')}/metrics"
    assert api_metrics in metrics_urls(system)
    finished = {
        (labels["model"], labels["project"]): value
        for labels, value in samples(api_metrics, "jetbatch_lines_total")
        if labels["outcome"] == "finished"
    }
    assert finished[(CHAT_MODEL, DEFAULT_PROJECT_ID)] >= LINES
    worker_urls = [u for u in metrics_urls(system) if u != api_metrics]
    worker_lines = sum(
        value
        for url in worker_urls
        for labels, value in samples(url, "jetbatch_worker_lines_total")
        if labels.get("model") == CHAT_MODEL
    )
    assert worker_lines >= LINES

    # Traces: line 0 is sampled at the default ratio; its trace crosses three services.
    def line_trace(spans: list[Span]) -> set[str]:
        return {
            s.service
            for s in spans
            if s.attributes.get("jetbatch.custom_id") == "seen-0"
            and s.attributes.get("jetbatch.batch_id", batch.id) == batch.id
        }

    spans = otlp.wait_for(lambda spans: {"api", "inference", "results_writer"} <= line_trace(spans))
    line = [s for s in spans if s.attributes.get("jetbatch.custom_id") == "seen-0"]
    assert len({s.trace_id for s in line if s.service in ("api", "inference")}) == 1

    # Usage: the batch's tokens through the SDK's admin client, grouped by batch.
    org = openai.OpenAI(base_url=system.base_url, admin_api_key=system.api_key, max_retries=0)
    page = org.admin.organization.usage.completions(
        start_time=since, bucket_width="1m", group_by=["batch"], limit=1440
    )
    used = [r for bucket in page.data for r in bucket.results]
    assert sum(r.input_tokens for r in used) >= batch.usage.input_tokens > 0  # type: ignore[union-attr]
    assert sum(r.output_tokens for r in used) >= batch.usage.output_tokens > 0  # type: ignore[union-attr]

    # Logs: `jetbatch logs` reads the services' files from the data dir.
    def logged() -> str | None:
        out = subprocess.run(
            [sys.executable, "-m", "services.cli", "logs", "--tail", "5000"],
            cwd=REPO,
            env={**os.environ, "JETBATCH_DATA_DIR": str(system.data_dir)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout if f"batch_id={batch.id}" in out.stdout else None

    out = wait_until_sync(logged, "the batch's records in `jetbatch logs`", timeout_s=30)
    assert re.search(r"^-- \d+ errors?, \d+ warnings?", out.splitlines()[-1])
