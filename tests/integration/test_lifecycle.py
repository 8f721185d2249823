"""Cancel and expiry, end to end in one event loop: api, inference workers (instant engine with a
delay, so requests are in flight), results writer and watchdog on a real nats-server and
PostgreSQL. Driven with the openai SDK; every output and error line is decoded and counted."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import nats
import openai
import pytest

from schemas.messages import BatchEvent, BatchStop, RequestMessage
from schemas.projects import DEFAULT_PROJECT_ID
from services.api import ingest, store
from services.api.deps import Deps
from shared import bus, config
from shared.db import connect_pool
from tests.helpers import CHAT, CHAT_MODEL, as_chunks, chat_jsonl, wait_until
from tests.lifecycle_helpers import check_exactly_once, fetchrow, lifecycle_env, running_system


@pytest.fixture
def env(database_url: str, nats_url: str, scratch_dir: Path) -> dict[str, str]:
    # 0.4 s per request, 4 at a time: 40 lines take 4 s if nobody cancels them.
    return lifecycle_env(
        database_url,
        nats_url,
        scratch_dir,
        JETBATCH_INSTANT_DELAY_S="0.4",
        JETBATCH_MAX_IN_FLIGHT="4",
    )


async def events(nats_url: str) -> list[BatchEvent]:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(bus.EVENTS.name)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            if info.state.messages:
                msg = await js.get_msg(bus.EVENTS.name, seq)
                out.append(msgspec.json.decode(msg.data or b"", type=BatchEvent))
        return out
    finally:
        await nc.close()


async def test_cancel_stops_a_running_batch_within_seconds_and_keeps_finished_results(
    env: dict[str, str], nats_url: str
) -> None:
    async with running_system(env) as system:
        batch_id = await system.create(chat_jsonl(40))

        async def some_done() -> int | None:
            batch = await system.client.batches.retrieve(batch_id)
            done = batch.request_counts.completed if batch.request_counts else 0
            return done if done >= 4 else None

        await wait_until(some_done, "a few requests to finish")
        cancelling = await system.client.batches.cancel(batch_id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
        done_at_cancel = cancelling.request_counts.completed  # type: ignore[union-attr]
        batch = await system.wait_batch(batch_id, {"cancelled"})

    # Queued requests were answered without the engine and the running ones aborted: only the
    # 4 running at the cancel and the 4 before them (finished, their results not yet written)
    # can have completed since; the other ~30 did not run.
    assert batch.request_counts.completed <= done_at_cancel + 8
    assert batch.cancelled_at is not None and batch.cancelled_at >= batch.cancelling_at
    assert batch.completed_at is None and batch.finalizing_at is None
    counts = batch.request_counts
    assert counts.total == 40 and counts.completed + counts.failed == 40
    assert 4 <= counts.completed < 40
    output = await system.lines(batch.output_file_id)
    errors = await system.lines(batch.error_file_id)
    assert len(output) == counts.completed and len(errors) == counts.failed
    assert all(x.response is not None and x.response.status_code == 200 for x in output)
    assert {x.error.code for x in errors if x.error} == {"batch_cancelled"}
    assert all(x.response is None for x in errors)
    check_exactly_once([x.custom_id for x in output + errors], {f"req-{i}" for i in range(40)})
    assert [e.type for e in await events(nats_url) if e.batch_id == batch_id] == ["batch.cancelled"]


async def test_a_batch_cancelled_while_validating_ends_cancelled_with_every_line_cancelled(
    env: dict[str, str], database_url: str
) -> None:
    # No worker: nothing could run anyway. The batch row is left in `validating`, as by an api
    # that died before validating it; the close-out validates and fills it.
    async with running_system(env, start=("results_writer", "watchdog")) as system:
        file_id = await system.upload(chat_jsonl(7))
        pool = await connect_pool(database_url)
        try:
            now = int(time.time())
            await store.insert_batch(
                pool,
                batch_id="batch_stuck",
                endpoint=CHAT,
                input_file_id=file_id,
                completion_window="24h",
                created_at=now,
                expires_at=now + 86_400,
                metadata=None,
                output_expires_after=None,
                project_id=DEFAULT_PROJECT_ID,
            )
        finally:
            await pool.close()
        cancelling = await system.client.batches.cancel("batch_stuck")
        assert cancelling.status == "cancelling"
        batch = await system.wait_batch("batch_stuck", {"cancelled"})
    assert batch.in_progress_at is None
    assert batch.request_counts.total == 7 and batch.request_counts.failed == 7
    assert batch.output_file_id is None
    errors = await system.lines(batch.error_file_id)
    check_exactly_once([x.custom_id for x in errors], {f"req-{i}" for i in range(7)})
    assert {x.error.code for x in errors if x.error} == {"batch_cancelled"}


async def test_dispatch_keeps_a_window_in_requests_and_stops_at_a_cancel(
    env: dict[str, str], database_url: str, nats_url: str
) -> None:
    settings = config.load(
        {**env, "JETBATCH_MAX_BATCH_LINES": "50000", "JETBATCH_DISPATCH_MIN_WINDOW": "256"}
    )
    window = settings.dispatch.min_window  # no worker yet: nothing drains, no capacity known
    content = chat_jsonl(5_000)
    pool = await connect_pool(database_url)
    nc = await bus.connect(nats_url, "test")
    js = nc.jetstream()
    await bus.ensure_streams(js)
    storage = await bus.files_bucket(js)
    await storage.put("file-big", as_chunks(content))
    try:
        await pool.execute(
            "INSERT INTO files (id, bytes, created_at, filename, purpose, storage_key)"
            " VALUES ('file-big', $1, 1, 'big.jsonl', 'batch', 'file-big')",
            len(content),
        )
        await pool.execute(
            "INSERT INTO batches (id, endpoint, model, input_file_id, completion_window, status,"
            " created_at, in_progress_at, total) VALUES ('batch_big', $1, $2, 'file-big', '24h',"
            " 'in_progress', 1, 1, 5000)",
            CHAT,
            CHAT_MODEL,
        )
        deps = Deps(
            settings=settings,
            pool=pool,
            nc=nc,
            js=js,
            workers=await bus.workers_kv(js),
            storage=storage,
            started_at=0,
        )
        row = await store.get_batch(pool, "batch_big")
        assert row is not None
        dispatching = asyncio.create_task(ingest._publish(deps, row))

        async def dispatched() -> int:
            return await pool.fetchval("SELECT dispatched FROM batches WHERE id = 'batch_big'")

        assert await wait_until(dispatched, "the first grant") == window
        await asyncio.sleep(0.5)  # ten ticks: the window is full, no more is granted
        assert await dispatched() == window
        await pool.execute(
            "UPDATE batches SET status = 'cancelling', cancelling_at = 2 WHERE id = 'batch_big'"
        )
        await asyncio.wait_for(dispatching, 5)  # the dispatcher let it go
        await deps.dispatcher.close()
        info = await js.stream_info(bus.REQUESTS.name)
        assert info.state.messages == window
        raw = await js.get_msg(bus.REQUESTS.name, 1)
        assert msgspec.json.decode(raw.data or b"", type=RequestMessage).batch_id == "batch_big"
        assert (await store.get_batch(pool, "batch_big"))["published_at"] is None  # type: ignore[index]
    finally:
        await pool.close()
        await nc.close()


async def test_an_expired_batch_returns_finished_work_and_expires_the_rest(
    env: dict[str, str], nats_url: str, database_url: str
) -> None:
    # 60 x 0.4 s / 2 = 12 s: three times its window, which is long enough for some lines to
    # finish on a busy machine.
    env = {**env, "JETBATCH_COMPLETION_WINDOW_S": "4", "JETBATCH_MAX_IN_FLIGHT": "2"}
    async with running_system(env) as system:
        batch_id = await system.create(chat_jsonl(60))
        created = await system.client.batches.retrieve(batch_id)
        assert created.expires_at == created.created_at + 4
        batch = await system.wait_batch(batch_id, {"expired", "completed"})
    assert batch.status == "expired"
    assert batch.expired_at is not None and batch.expired_at >= batch.expires_at
    assert batch.completed_at is None and batch.finalizing_at is None
    assert batch.in_progress_at is not None
    counts = batch.request_counts
    assert counts.total == 60 and counts.completed + counts.failed == 60
    assert 0 < counts.completed < 60
    output = await system.lines(batch.output_file_id)
    errors = await system.lines(batch.error_file_id)
    assert len(output) == counts.completed
    assert {x.error.code for x in errors if x.error} == {"batch_expired"}
    check_exactly_once([x.custom_id for x in output + errors], {f"req-{i}" for i in range(60)})
    assert [e.type for e in await events(nats_url) if e.batch_id == batch_id] == ["batch.expired"]
    row = await fetchrow(database_url, "SELECT ending FROM batches WHERE id = $1", batch_id)
    assert row is not None and row["ending"] == "expired"


async def test_cancelling_a_finished_batch_is_a_409(env: dict[str, str]) -> None:
    async with running_system({**env, "JETBATCH_INSTANT_DELAY_S": "0"}) as system:
        batch_id = await system.create(chat_jsonl(3))
        batch = await system.wait_batch(batch_id, {"completed"})
        assert batch.finalizing_at is not None and batch.completed_at is not None
        assert batch.in_progress_at is not None
        assert batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
        with pytest.raises(openai.ConflictError) as conflict:
            await system.client.batches.cancel(batch_id)
        assert "completed" in conflict.value.message
        assert (await system.client.batches.retrieve(batch_id)).status == "completed"


async def test_workers_skip_requests_of_a_batch_cancelled_before_they_pulled_them(
    env: dict[str, str], nats_url: str
) -> None:
    # The workers start after the cancel: their snapshot of jetbatch_cancelled is read before
    # the first pull, so not one request of the batch reaches the engine.
    async with running_system(env, start=("results_writer",)) as system:
        batch_id = await system.create(chat_jsonl(20))

        async def published() -> bool:
            nc = await nats.connect(nats_url)
            try:
                info = await nc.jetstream().stream_info(bus.REQUESTS.name)
                return info.state.messages == 20
            finally:
                await nc.close()

        await wait_until(published, "the batch to be published")
        await system.client.batches.cancel(batch_id)
        system.start("worker:late")
        batch = await system.wait_batch(batch_id, {"cancelled"}, timeout_s=10)
    assert batch.request_counts.completed == 0 and batch.request_counts.failed == 20


async def test_a_cancel_reaches_the_workers_through_kv(env: dict[str, str], nats_url: str) -> None:
    async with running_system(env, start=()) as system:
        batch_id = await system.create(chat_jsonl(2))
        await system.client.batches.cancel(batch_id)
        nc = await nats.connect(nats_url)
        try:
            kv = await nc.jetstream().key_value(bus.CANCELLED_BUCKET)
            entry = await kv.get(batch_id)
            stop = msgspec.json.decode(entry.value or b"", type=BatchStop)
        finally:
            await nc.close()
    assert stop.reason == "cancelled" and stop.error_code == "batch_cancelled"
