"""Prometheus metrics against real servers (README: Metrics): the api's open `/metrics` carries
the fleet's figures from shared state, its queue depth equal to JetStream's own pending count
with no worker running; a service process serves its metrics on its port."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace

import asyncpg
import httpx
import msgspec
import nats
import openai
import pytest
from nats.js.api import AckPolicy, ConsumerConfig
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from schemas.messages import WorkerHeartbeat, subject_token
from services.api.deps import Deps
from services.api.metrics import database_families, queue_families
from shared import bus, config, nats_auth
from shared.db import connect_pool
from shared.embedded import EmbeddedNats, free_port
from tests.helpers import CHAT, CHAT_MODEL, chat_line, wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[nats.js.JetStreamContext]:
    nc = await nats.connect(nats_url)
    yield nc.jetstream()
    await nc.close()


async def scrape(api: str) -> Samples:
    """GET /metrics with no key (as a Prometheus scraper does), every sample by name and labels."""
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.get(api.removesuffix("/v1") + "/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def published_batch(client: openai.AsyncOpenAI, database_url: str, lines: int) -> str:
    content = b"\n".join(chat_line(f"req-{i}") for i in range(lines))
    file_id = (await client.files.create(file=("in.jsonl", content), purpose="batch")).id
    batch = await client.batches.create(
        input_file_id=file_id, endpoint=CHAT, completion_window="24h"
    )
    conn = await asyncpg.connect(database_url)
    try:
        sql = "SELECT published_at FROM batches WHERE id = $1"
        await wait_until(lambda: conn.fetchval(sql, batch.id), "the batch to be published")
    finally:
        await conn.close()
    return batch.id


async def test_queue_depth_equals_jetstreams_pending_count_with_no_worker_running(
    api: str, client: openai.AsyncOpenAI, js: nats.js.JetStreamContext, database_url: str
) -> None:
    jobs = "jetbatch_api_child_jobs_total"
    validated = REGISTRY.get_sample_value(jobs, {"kind": "validation", "outcome": "ok"}) or 0
    await published_batch(client, database_url, 25)
    # The model's durable, as its first worker creates it; no worker pulls from it.
    token = subject_token(CHAT_MODEL)
    durable = f"inference-{token}"
    await js.add_consumer(
        bus.REQUESTS.name,
        ConsumerConfig(
            durable_name=durable,
            filter_subject=f"jetbatch.requests.{token}.>",
            ack_policy=AckPolicy.EXPLICIT,
        ),
    )
    # A worker last heard from 42 s ago.
    workers = await bus.workers_kv(js)
    beat = WorkerHeartbeat(
        worker_id="w-metrics", host="h", pid=1, model=CHAT_MODEL, endpoints=[CHAT],
        engine="instant", started_at=0, seen_at=int(time.time()) - 42, in_flight=3, capacity=8,
    )  # fmt: skip
    await workers.put(beat.worker_id, msgspec.json.encode(beat))

    samples = await scrape(api)

    stream = await js.stream_info(bus.REQUESTS.name, subjects_filter=f"jetbatch.requests.{token}.>")
    in_stream = sum((stream.state.subjects or {}).values())
    consumer = await js.consumer_info(bus.REQUESTS.name, durable)
    depth = sample(samples, "jetbatch_queue_depth", model=CHAT_MODEL, project="proj_default")
    assert depth == in_stream == consumer.num_pending == 25
    assert sample(samples, "jetbatch_queue_undelivered", model=CHAT_MODEL) == 25
    assert sample(samples, "jetbatch_queue_unacked", model=CHAT_MODEL) == 0
    batches = sample(
        samples, "jetbatch_batches", model=CHAT_MODEL, project="proj_default", status="in_progress"
    )
    assert batches == 1
    for source in ("nats", "postgres", "workers"):
        assert sample(samples, "jetbatch_fleet_up", source=source) == 1, source
    age = sample(
        samples, "jetbatch_fleet_worker_heartbeat_age_seconds", model=CHAT_MODEL, worker="w-metrics"
    )
    assert age is not None and 42 <= age < 60
    worker = {"model": CHAT_MODEL, "worker": "w-metrics"}
    assert sample(samples, "jetbatch_fleet_worker_in_flight", **worker) == 3
    # The api's own: its validation child's job and the requests its publishing child sent.
    assert (sample(samples, jobs, kind="validation", outcome="ok") or 0) >= validated + 1
    assert (sample(samples, "jetbatch_api_requests_published_total", model=CHAT_MODEL) or 0) >= 25
    assert sample(samples, "jetbatch_consumer_messages_total",
                  consumer="api", stream="CONTROL", outcome="acked") is not None  # fmt: skip


async def test_the_api_user_may_read_the_queue_figures(
    nats_server: EmbeddedNats, js: nats.js.JetStreamContext, database_url: str
) -> None:
    settings = config.load({"JETBATCH_ENGINE": "instant"})
    token = subject_token(CHAT_MODEL)
    await bus.ensure_streams(js)
    await js.add_consumer(
        bus.REQUESTS.name,
        ConsumerConfig(
            durable_name=f"inference-{token}",
            filter_subject=f"jetbatch.requests.{token}.>",
            ack_policy=AckPolicy.EXPLICIT,
        ),
    )
    nc = await bus.connect(nats_server.url_for(nats_auth.API), "test-api")  # the api's own user
    pool = await connect_pool(database_url)
    try:
        api_js = nc.jetstream()
        deps = Deps(
            settings=settings, pool=pool, nc=nc, js=api_js, workers=await bus.workers_kv(api_js),
            storage=await bus.files_bucket(api_js), started_at=0,
        )  # fmt: skip
        families = {f.name: f for f in await queue_families(deps)}
    finally:
        await pool.close()
        await nc.close()
    depth = {s.labels["model"]: s.value for s in families["jetbatch_queue_depth"].samples}
    assert depth == {m.name: 0 for m in settings.models}  # every served model, none queued
    undelivered = families["jetbatch_queue_undelivered"].samples
    assert [(s.labels, s.value) for s in undelivered] == [({"model": CHAT_MODEL}, 0)]


async def test_metrics_hold_no_batch_id_and_need_no_key(
    api: str, client: openai.AsyncOpenAI, database_url: str
) -> None:
    batch_id = await published_batch(client, database_url, 2)
    async with httpx.AsyncClient(timeout=30) as http:
        text = (await http.get(api.removesuffix("/v1") + "/metrics")).text
    assert "jetbatch_queue_depth" in text
    assert batch_id not in text and "req-0" not in text and "sk-" not in text


async def test_a_service_process_serves_its_metrics_on_its_port(
    nats_url: str, database_url: str
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "JETBATCH_NATS_URL": nats_url,
        "JETBATCH_DATABASE_URL": database_url,
        "JETBATCH_METRICS_PORT": str(port),  # the results writer's: + 0
    }
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.results_writer", env=env
    )
    try:

        async def consumer_counted() -> str | None:
            try:
                async with httpx.AsyncClient(timeout=5) as http:
                    text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            except httpx.HTTPError:
                return None
            wanted = (
                'jetbatch_consumer_messages_total{consumer="results_writer",outcome="acked",'
                'stream="RESULTS"}'
            )
            return text if wanted in text else None

        text = await wait_until(consumer_counted, "the results writer's metrics", timeout_s=30)
        assert "jetbatch_results_written_total" in text or "jetbatch_results_stored_total" in text
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(child.wait(), 30)
        finally:
            if child.returncode is None:
                child.kill()
    assert child.returncode == 0


async def test_lines_behind_the_dispatch_window_are_counted_as_waiting(database_url: str) -> None:
    pool = await connect_pool(database_url)
    try:
        await pool.execute(
            "INSERT INTO batches (id, endpoint, model, input_file_id, completion_window, status,"
            " created_at, in_progress_at, total, dispatched) VALUES"
            " ('batch_waiting', $1, $2, 'file-x', '24h', 'in_progress', 1, 1, 600, 256),"
            " ('batch_sent', $1, $2, 'file-x', '24h', 'in_progress', 1, 1, 50, 50)",
            CHAT,
            CHAT_MODEL,
        )
        await pool.execute("UPDATE batches SET published_at = 2 WHERE id = 'batch_sent'")
        families = await database_families(SimpleNamespace(pool=pool))  # type: ignore[arg-type]
    finally:
        await pool.close()
    waiting = next(f for f in families if f.name == "jetbatch_dispatch_waiting")
    assert [(s.labels, s.value) for s in waiting.samples] == [
        ({"model": CHAT_MODEL, "project": "proj_default"}, 344)
    ]
