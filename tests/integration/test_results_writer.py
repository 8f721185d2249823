"""The results writer against a real PostgreSQL and a real nats-server (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import nats
import pytest
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from schemas.messages import BatchEvent, ResultMessage
from schemas.openai import OutputLine
from services.results_writer import service
from services.results_writer.store import RESULT_COLUMNS
from shared import bus, db
from shared.bus.objects import FILES_BUCKET
from shared.config import Settings
from shared.ids import stable_id
from tests.helpers import stored_bytes, wait_until

TIMEOUT_S = 30
REPO = Path(__file__).resolve().parents[2]


# Fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path, nats_url: str, database_url: str) -> Settings:
    return Settings(data_dir=tmp_path / "data", nats_url=nats_url, database_url=database_url)


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(database_url)
    yield c
    await c.close()


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_url)
    ctx = nc.jetstream()
    await bus.ensure_streams(ctx)
    await bus.files_bucket(ctx)
    yield ctx
    await nc.drain()


@asynccontextmanager
async def running_writer(settings: Settings, count: int = 1) -> AsyncIterator[None]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(service.run(settings, stop)) for _ in range(count)]
    try:
        yield
    finally:
        stop.set()
        # Stopping is part of the contract: it must finish promptly and cleanly.
        for task in tasks:
            await asyncio.wait_for(task, TIMEOUT_S)


async def insert_batch(
    conn: asyncpg.Connection,
    batch_id: str,
    total: int,
    status: str = "in_progress",
    metadata: dict[str, str] | None = None,
    **counters: int,
) -> None:
    now = int(time.time())
    await conn.execute(
        """
        INSERT INTO batches (id, endpoint, model, input_file_id, completion_window, status,
                             created_at, in_progress_at, total, metadata, output_expires_after,
                             completed, failed, input_tokens, cached_tokens, output_tokens,
                             finalizing_at, cancelling_at)
        VALUES ($1, '/v1/chat/completions', 'm', 'file-in', '24h', $2::text, $3::bigint, $3, $4, $5::jsonb,
                3600, $6, $7, $8, $9, $10,
                CASE WHEN $2 = 'finalizing' THEN $3::bigint END,
                CASE WHEN $2 = 'cancelling' THEN $3::bigint END)
        """,
        batch_id,
        status,
        now,
        total,
        None if metadata is None else json.dumps(metadata),
        counters.get("completed", 0),
        counters.get("failed", 0),
        counters.get("input_tokens", 0),
        counters.get("cached_tokens", 0),
        counters.get("output_tokens", 0),
    )


def chat_body(line: int) -> bytes:
    return msgspec.json.encode(
        {
            "id": f"chatcmpl-{line}",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"é {line}"}}],
            "usage": {"prompt_tokens": 10 + line, "completion_tokens": 5, "total_tokens": 15},
        }
    )


def result(batch_id: str, line: int, kind: str = "ok") -> ResultMessage:
    """kind: ok | engine_error (answered with an error object) | expired (no answer at all)."""
    common: dict[str, Any] = {
        "batch_id": batch_id,
        "line": line,
        "custom_id": f"req-{line}",
        "request_id": f"req_{batch_id}_{line}",
        "worker_id": "w1",
    }
    if kind == "ok":
        return ResultMessage(
            **common,
            status_code=200,
            response_body=msgspec.Raw(chat_body(line)),
            input_tokens=10 + line,
            output_tokens=5,
            cached_tokens=line % 3,
        )
    if kind == "engine_error":
        error = {"error": {"message": "bad max_tokens", "type": "BadRequestError", "code": 400}}
        return ResultMessage(
            **common, status_code=400, response_body=msgspec.Raw(msgspec.json.encode(error))
        )
    return ResultMessage(
        **common,
        status_code=0,
        error_code=kind,
        error_message=f"This request could not be executed: {kind}.",
    )


def kind_of(line: int) -> str:
    return "engine_error" if line % 10 == 3 else "batch_expired" if line % 10 == 7 else "ok"


async def publish(js: JetStreamContext, results: Iterable[ResultMessage], suffix: str = "") -> None:
    publisher = bus.Publisher(js)
    for r in results:
        await publisher.publish(
            ResultMessage.subject_for(r.batch_id), msgspec.json.encode(r), r.msg_id + suffix
        )
    await publisher.flush()


async def wait_status(conn: asyncpg.Connection, batch_id: str, status: str) -> asyncpg.Record:
    async def check() -> asyncpg.Record | None:
        row = await conn.fetchrow("SELECT * FROM batches WHERE id = $1", batch_id)
        return row if row is not None and row["status"] == status else None

    return await wait_until(check, f"batch {batch_id} to be {status}")


async def wait_all_acked(js: JetStreamContext) -> None:
    async def check() -> bool:
        try:
            info = await js.consumer_info(bus.RESULTS.name, service.DURABLE)
        except NotFoundError:  # the writer has not created its consumer yet
            return False
        return info.num_ack_pending == 0 and info.num_pending == 0

    await wait_until(check, "every result message to be acked or termed")


async def batch_events(js: JetStreamContext) -> list[tuple[str, BatchEvent, str | None]]:
    """Every message on EVENTS: (subject, event, Nats-Msg-Id)."""
    info = await js.stream_info(bus.EVENTS.name)
    out: list[tuple[str, BatchEvent, str | None]] = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if info.state.messages == 0:
            break
        msg = await js.get_msg(bus.EVENTS.name, seq)
        assert msg.subject is not None and msg.data is not None
        headers = msg.headers or {}
        event = msgspec.json.decode(msg.data, type=BatchEvent)
        out.append((msg.subject, event, headers.get(bus.MSG_ID)))
    return out


async def usage_requests(conn: asyncpg.Connection) -> dict[str, int]:
    """Lines per batch in usage_minutes: a finished batch's rows end up there."""
    rows = await conn.fetch("SELECT batch_id, sum(requests) FROM usage_minutes GROUP BY batch_id")
    return {batch_id: int(n) for batch_id, n in rows}


async def read_lines(settings: Settings, file_id: str) -> list[OutputLine]:
    assert settings.nats_url is not None
    data = await stored_bytes(settings.nats_url, file_id)
    assert data is not None and data.endswith(b"\n")
    return [msgspec.json.decode(line, type=OutputLine) for line in data.splitlines()]


# Tests -------------------------------------------------------------------------------------


async def test_batch_is_written_finalized_and_announced(
    settings: Settings, conn: asyncpg.Connection, js: JetStreamContext
) -> None:
    batch_id, n = "batch_main", 60
    await insert_batch(conn, batch_id, n, metadata={"team": "search"})
    results = [result(batch_id, line, kind_of(line)) for line in range(n)]
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    await publish(js, results[::-1])  # arrival order is not line order

    async with running_writer(settings):
        row = await wait_status(conn, batch_id, "completed")
        await wait_all_acked(js)

    assert (row["total"], row["completed"], row["failed"]) == (n, len(ok), len(failed))
    assert row["input_tokens"] == sum(r.input_tokens for r in results)
    assert row["output_tokens"] == sum(r.output_tokens for r in results)
    assert row["cached_tokens"] == sum(r.cached_tokens for r in results)
    assert row["finalizing_at"] is not None and row["completed_at"] >= row["finalizing_at"]
    assert row["output_file_id"] == stable_id("file-", batch_id, "output")
    assert row["error_file_id"] == stable_id("file-", batch_id, "error")

    output = await read_lines(settings, row["output_file_id"])
    errors = await read_lines(settings, row["error_file_id"])
    assert [x.custom_id for x in output] == [r.custom_id for r in sorted(ok, key=lambda r: r.line)]
    custom_ids = [x.custom_id for x in output + errors]
    assert sorted(custom_ids) == sorted(r.custom_id for r in results)  # each exactly once
    for line in output + errors:
        assert line.id == stable_id("batch_req_", batch_id, line.custom_id)
    for line in output:
        assert line.error is None and line.response is not None
        assert line.response.status_code == 200
        n_line = int(line.custom_id.split("-")[1])
        assert json.loads(bytes(line.response.body)) == json.loads(chat_body(n_line))
        assert line.response.request_id == f"req_{batch_id}_{n_line}"
    engine_errors = [x for x in errors if x.response is not None]
    batch_errors = [x for x in errors if x.response is None]
    assert len(engine_errors) == sum(kind_of(i) == "engine_error" for i in range(n))
    assert all(x.error is None and x.response.status_code == 400 for x in engine_errors)  # type: ignore[union-attr]
    assert len(batch_errors) == sum(kind_of(i) == "batch_expired" for i in range(n))
    assert all(x.error is not None and x.error.code == "batch_expired" for x in batch_errors)

    files = {
        f["id"]: f
        for f in await conn.fetch(
            "SELECT * FROM files WHERE id = ANY($1::text[])",
            [row["output_file_id"], row["error_file_id"]],
        )
    }
    out_file, err_file = files[row["output_file_id"]], files[row["error_file_id"]]
    assert out_file["filename"] == f"{batch_id}_output.jsonl"
    assert err_file["filename"] == f"{batch_id}_error.jsonl"
    for f in (out_file, err_file):
        assert f["purpose"] == "batch_output"
        assert f["storage_key"] == f["id"]
        assert f["bytes"] == len(await stored_bytes(settings.nats_url, f["id"]) or b"")
        assert f["expires_at"] == f["created_at"] + 3600

    events = await batch_events(js)
    assert len(events) == 1
    subject, event, msg_id = events[0]
    assert subject == "jetbatch.events.batch.proj_default.completed"
    assert event.type == "batch.completed" and event.batch_id == batch_id
    assert event.id == msg_id == stable_id("evt_", batch_id, "batch.completed")
    assert event.metadata == {"team": "search"}


async def test_redelivered_results_are_not_counted_twice(
    settings: Settings, conn: asyncpg.Connection, js: JetStreamContext
) -> None:
    batch_id, n = "batch_dups", 40
    await insert_batch(conn, batch_id, n)
    results = [result(batch_id, line, kind_of(line)) for line in range(n)]
    first, second = results[:25], results[25:]

    async with running_writer(settings):
        await publish(js, first)
        await publish(js, first[::3], suffix=":again")  # a re-publish JetStream cannot dedup

        async def first_counted() -> bool:
            done = await conn.fetchval(
                "SELECT completed + failed FROM batches WHERE id = $1", batch_id
            )
            return done == len(first)

        await wait_until(first_counted, "the first results to be counted")
        await wait_all_acked(js)
        row = await conn.fetchrow("SELECT * FROM batches WHERE id = $1", batch_id)
        # Not every line is in: the batch goes on.
        assert row["status"] == "in_progress"
        assert row["completed"] + row["failed"] == len(first)

        await publish(js, second + first[1::4], suffix=":third")
        row = await wait_status(conn, batch_id, "completed")

    assert row["completed"] == sum(r.ok for r in results)
    assert row["failed"] == sum(not r.ok for r in results)
    assert row["input_tokens"] == sum(r.input_tokens for r in results)
    assert row["cached_tokens"] == sum(r.cached_tokens for r in results)
    # One row per line was written, then folded into usage once the batch was final.
    assert await usage_requests(conn) == {batch_id: n}
    lines = await read_lines(settings, row["output_file_id"]) + await read_lines(
        settings, row["error_file_id"]
    )
    assert sorted(x.custom_id for x in lines) == sorted(r.custom_id for r in results)


async def test_results_for_unknown_or_closed_batches_are_acked_and_skipped(
    settings: Settings, conn: asyncpg.Connection, js: JetStreamContext
) -> None:
    await insert_batch(conn, "batch_known", 5)
    await insert_batch(conn, "batch_done", 2, status="completed", completed=2)
    await publish(js, [result("batch_someone_elses", i) for i in range(7)])
    await publish(js, [result("batch_done", i) for i in range(2, 5)])
    # Another project's results for this batch (a forged project): not this batch's.
    await publish(
        js,
        [msgspec.structs.replace(result("batch_known", i), project="proj_other") for i in range(5)],
        "-forged",
    )
    await publish(js, [result("batch_known", i) for i in range(5)])

    async with running_writer(settings):
        await wait_status(conn, "batch_known", "completed")
        await wait_all_acked(js)

    assert await usage_requests(conn) == {"batch_known": 5}
    known = await conn.fetchrow("SELECT * FROM batches WHERE id = 'batch_known'")
    assert (known["completed"], known["failed"]) == (5, 0)
    assert await conn.fetchval("SELECT count(*) FROM request_results") == 0
    done = await conn.fetchrow("SELECT * FROM batches WHERE id = 'batch_done'")
    assert (done["completed"], done["failed"], done["input_tokens"]) == (2, 0, 0)
    assert [e.batch_id for _, e, _ in await batch_events(js)] == ["batch_known"]


async def insert_results_directly(
    conn: asyncpg.Connection, batch_id: str, n: int, status: str
) -> list[ResultMessage]:
    """A batch whose results are all in the database already, with matching counters."""
    results = [result(batch_id, line, kind_of(line)) for line in range(n)]
    await insert_batch(
        conn,
        batch_id,
        n,
        status=status,
        completed=sum(r.ok for r in results),
        failed=sum(not r.ok for r in results),
    )
    await conn.copy_records_to_table(
        "request_results",
        records=[service.result_record(r)[: len(RESULT_COLUMNS)] for r in results],
        columns=RESULT_COLUMNS,
    )
    return results


@pytest.mark.parametrize(
    "status",
    [
        # Crashed between committing the last results and moving the batch to finalizing.
        "in_progress",
        # Crashed half-way through writing the files.
        "finalizing",
    ],
)
async def test_batch_left_unfinished_by_a_crash_is_finished_by_the_sweep(
    settings: Settings, conn: asyncpg.Connection, js: JetStreamContext, status: str
) -> None:
    batch_id, n = "batch_crashed", 30
    results = await insert_results_directly(conn, batch_id, n, status)
    # The crashed writer's chunks of the output file, without the meta that would make it exist.
    await js.publish(f"$O.{FILES_BUCKET}.C.crashednuid", b'{"id": "trunc')

    async with running_writer(settings):
        row = await wait_status(conn, batch_id, "completed")

    assert row["finalizing_at"] is not None
    lines = await read_lines(settings, row["output_file_id"]) + await read_lines(
        settings, row["error_file_id"]
    )
    assert sorted(x.custom_id for x in lines) == sorted(r.custom_id for r in results)
    assert [(s, e.type) for s, e, _ in await batch_events(js)] == [
        ("jetbatch.events.batch.proj_default.completed", "batch.completed")
    ]


async def test_concurrent_finalizations_of_one_batch_let_one_writer_do_it(
    settings: Settings, conn: asyncpg.Connection, js: JetStreamContext
) -> None:
    # Two writer processes' sweeps find the same batch: only one may write its files.
    batch_id, n = "batch_contended", 3000
    results = await insert_results_directly(conn, batch_id, n, "finalizing")
    assert settings.database_url is not None
    pools = [await db.connect_pool(settings.database_url, max_size=2) for _ in range(2)]
    try:
        files = await bus.files_bucket(js)
        writers = [service.ResultsWriter(p, js, files) for p in pools]
        outcomes = await asyncio.gather(*(w.finalize(batch_id) for w in writers))
    finally:
        for p in pools:
            await p.close()

    assert sorted(outcomes) == [False, True]
    row = await conn.fetchrow("SELECT * FROM batches WHERE id = $1", batch_id)
    assert row["status"] == "completed"
    lines = await read_lines(settings, row["output_file_id"]) + await read_lines(
        settings, row["error_file_id"]
    )
    assert sorted(x.custom_id for x in lines) == sorted(r.custom_id for r in results)
    assert len(await batch_events(js)) == 1


async def test_results_wait_out_a_database_failure_instead_of_being_dropped(
    settings: Settings, conn: asyncpg.Connection, js: JetStreamContext
) -> None:
    batch_id, n = "batch_outage", 20
    await insert_batch(conn, batch_id, n)
    # Every write fails, and not because of what the results say.
    await conn.execute("ALTER TABLE request_results RENAME TO request_results_away")
    results = [result(batch_id, i) for i in range(n)]

    async with running_writer(settings):
        await publish(js, results)

        async def delivered_and_failed() -> bool:
            try:
                info = await js.consumer_info(bus.RESULTS.name, service.DURABLE)
            except NotFoundError:  # the writer has not created its consumer yet
                return False
            return info.delivered.stream_seq >= n

        await wait_until(delivered_and_failed, "the writer to try the results")
        await asyncio.sleep(0.5)
        await conn.execute("ALTER TABLE request_results_away RENAME TO request_results")
        row = await wait_status(conn, batch_id, "completed")
        await wait_all_acked(js)

    assert (row["completed"], row["failed"]) == (n, 0)


async def test_process_stops_cleanly_on_sigterm(
    settings: Settings, conn: asyncpg.Connection, js: JetStreamContext
) -> None:
    batch_id = "batch_process"
    await insert_batch(conn, batch_id, 3)
    env = {
        **os.environ,
        "JETBATCH_DATA_DIR": str(settings.data_dir),
        "JETBATCH_NATS_URL": str(settings.nats_url),
        "JETBATCH_DATABASE_URL": str(settings.database_url),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.results_writer", env=env, cwd=REPO
    )
    try:
        await publish(js, [result(batch_id, i) for i in range(3)])
        await wait_status(conn, batch_id, "completed")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), TIMEOUT_S) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_fully_accounted_cancelling_batch_is_cancelled(
    settings: Settings, conn: asyncpg.Connection, js: JetStreamContext
) -> None:
    batch_id, n = "batch_cancel", 10
    await insert_batch(conn, batch_id, n, status="cancelling", metadata={"k": "v"})
    # What inference emits once a batch is cancelled: the few finished ones, then
    # batch_cancelled error lines for everything else.
    results = [result(batch_id, i) for i in range(3)]
    results += [result(batch_id, i, "batch_cancelled") for i in range(3, n)]

    async with running_writer(settings):
        await publish(js, results)
        row = await wait_status(conn, batch_id, "cancelled")

    assert row["cancelled_at"] is not None and row["completed_at"] is None
    assert (row["completed"], row["failed"]) == (3, 7)
    output = await read_lines(settings, row["output_file_id"])
    errors = await read_lines(settings, row["error_file_id"])
    assert [x.custom_id for x in output] == ["req-0", "req-1", "req-2"]
    assert {x.error.code for x in errors if x.error} == {"batch_cancelled"}
    assert len(errors) == 7
    [(subject, event, msg_id)] = await batch_events(js)
    assert subject == "jetbatch.events.batch.proj_default.cancelled"
    assert (event.type, event.batch_id, event.metadata) == ("batch.cancelled", batch_id, {"k": "v"})
    assert msg_id == event.id


async def test_batch_with_only_failures_has_no_output_file(
    settings: Settings, conn: asyncpg.Connection, js: JetStreamContext
) -> None:
    batch_id = "batch_all_failed"
    await insert_batch(conn, batch_id, 4)
    async with running_writer(settings):
        await publish(js, [result(batch_id, i, "batch_expired") for i in range(4)])
        row = await wait_status(conn, batch_id, "completed")
    assert row["output_file_id"] is None
    assert len(await read_lines(settings, row["error_file_id"])) == 4
    assert await conn.fetchval("SELECT count(*) FROM files") == 1


async def test_undecodable_message_is_terminated_and_does_not_block_others(
    settings: Settings, conn: asyncpg.Connection, js: JetStreamContext
) -> None:
    batch_id, n = "batch_garbage", 8
    await insert_batch(conn, batch_id, n)
    await js.publish("jetbatch.results.batch_garbage", b"not json at all")
    await js.publish("jetbatch.results.batch_garbage", b'{"batch_id": "batch_garbage"}')
    await publish(js, [result(batch_id, i) for i in range(n)])

    async with running_writer(settings):
        await wait_status(conn, batch_id, "completed")
        await wait_all_acked(js)
        info = await js.consumer_info(bus.RESULTS.name, service.DURABLE)
        assert info.num_redelivered == 0  # termed, not left to time out and come back


async def test_unwritable_result_is_rejected_and_the_rest_of_its_fetch_is_written(
    settings: Settings, conn: asyncpg.Connection, js: JetStreamContext
) -> None:
    batch_id, n = "batch_poison", 20
    await insert_batch(conn, batch_id, n)
    results = [result(batch_id, i) for i in range(n)]
    # Decodes fine, but PostgreSQL refuses NUL in text: only this one must be refused.
    poison = msgspec.structs.replace(result(batch_id, 99), custom_id="bad\x00id")
    await publish(js, [*results[:10], poison, *results[10:]])

    async with running_writer(settings):
        row = await wait_status(conn, batch_id, "completed")
        await wait_all_acked(js)

    assert (row["completed"], row["failed"]) == (n, 0)
    assert await usage_requests(conn) == {batch_id: n}


async def test_fetch_of_only_unwritable_results_is_retried_before_being_rejected(
    settings: Settings,
    conn: asyncpg.Connection,
    js: JetStreamContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # When nothing in a fetch can be written, the fault may be ours (a bug, a schema change):
    # the writer retries a few deliveries before it gives up on the messages.
    await insert_batch(conn, "batch_only_poison", 2)
    poison = [
        msgspec.structs.replace(result("batch_only_poison", i), custom_id=f"bad\x00{i}")
        for i in range(2)
    ]
    await publish(js, poison)

    with caplog.at_level(logging.WARNING, logger=service.__name__):
        async with running_writer(settings):
            await wait_all_acked(js)

    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    rejections = [r for r in caplog.records if "rejected result message" in r.getMessage()]
    assert len(retries) == service.SYSTEMATIC_RETRIES - 1
    assert len(rejections) == 2
    assert all(f"delivery={service.SYSTEMATIC_RETRIES}" in r.getMessage() for r in rejections)
    assert await conn.fetchval("SELECT count(*) FROM request_results") == 0


async def test_two_writers_share_the_work_and_finalize_once(
    settings: Settings, conn: asyncpg.Connection, js: JetStreamContext
) -> None:
    batches = {f"batch_multi_{i}": 300 + 50 * i for i in range(4)}
    for batch_id, total in batches.items():
        await insert_batch(conn, batch_id, total)
    results = [
        result(batch_id, line, kind_of(line))
        for batch_id, total in batches.items()
        for line in range(total)
    ]
    results.sort(key=lambda r: (r.line, r.batch_id))  # batches interleaved, as in real life

    async with running_writer(settings, count=2):
        await publish(js, results)
        await publish(js, results[::7], suffix=":dup")
        rows = [await wait_status(conn, b, "completed") for b in batches]

    for row in rows:
        assert row["completed"] + row["failed"] == batches[row["id"]]
        lines = await read_lines(settings, row["output_file_id"])
        lines += await read_lines(settings, row["error_file_id"])
        assert sorted(x.custom_id for x in lines) == sorted(
            f"req-{i}" for i in range(batches[row["id"]])
        )
    events = await batch_events(js)
    assert sorted(e.batch_id for _, e, _ in events) == sorted(batches)


@pytest.mark.slow
async def test_twenty_thousand_results_are_written_and_finalized(
    settings: Settings, conn: asyncpg.Connection, js: JetStreamContext
) -> None:
    """Correctness at volume; the rate is printed (-s) for information, never asserted."""
    batches = [f"batch_bulk_{i}" for i in range(4)]
    per_batch = 5000
    for batch_id in batches:
        await insert_batch(conn, batch_id, per_batch)
    results = [result(b, line, kind_of(line)) for line in range(per_batch) for b in batches]
    await publish(js, results)

    started = time.perf_counter()
    async with running_writer(settings):
        rows = [await wait_status(conn, b, "completed") for b in batches]
        elapsed = time.perf_counter() - started
    print(
        f"\nresults_writer: {len(results)} results written and 4 batches finalized in "
        f"{elapsed:.2f}s ({len(results) / elapsed:,.0f} results/s, start-up included)"
    )

    for row in rows:
        assert row["completed"] + row["failed"] == per_batch
        lines = await read_lines(settings, row["output_file_id"])
        lines += await read_lines(settings, row["error_file_id"])
        assert len({x.custom_id for x in lines}) == len(lines) == per_batch
    assert len(await batch_events(js)) == len(batches)
