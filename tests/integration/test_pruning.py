"""A finished batch's request_results rows are folded into usage_minutes (per model and minute)
and deleted (README: Retention): by the results writer as the batch reaches its final status,
by the watchdog for batches that ended before (an upgraded deployment) or without the writer.
A result arriving for a pruned batch is skipped, never written again. On a real PostgreSQL and
nats-server."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec
import pytest
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from schemas.messages import ResultMessage
from services.api import store as api_store
from services.results_writer import service as results_writer
from services.watchdog import service as watchdog
from services.watchdog import store as watchdog_store
from shared import bus, config, db
from shared.domain import retention
from tests.helpers import CHAT, CHAT_MODEL, stored_bytes, wait_until

MINUTE_1 = 1_700_000_040  # a minute's start (divisible by 60)
MINUTE_2 = MINUTE_1 + 60


@pytest.fixture
def settings(tmp_path: Path, nats_url: str, database_url: str) -> config.Settings:
    return config.Settings(data_dir=tmp_path / "data", nats_url=nats_url, database_url=database_url)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await db.connect_pool(database_url, max_size=4)
    yield p
    await p.close()


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc = await bus.connect(nats_url, "test-pruning")
    ctx = nc.jetstream()
    await bus.ensure_streams(ctx)
    yield ctx
    await nc.close()


async def add_batch(
    pool: asyncpg.Pool | asyncpg.Connection,
    batch_id: str,
    status: str,
    total: int,
    *,
    completed_at: int | None = None,
) -> None:
    await pool.execute(
        "INSERT INTO batches (id, endpoint, model, input_file_id, completion_window, status,"
        " created_at, in_progress_at, completed_at, total)"
        " VALUES ($1, $2, $3, 'file-in', '24h', $4, $5, $5, $6, $7)",
        batch_id, CHAT, CHAT_MODEL, status, MINUTE_1 - 600, completed_at, total,
    )  # fmt: skip


async def add_rows(
    pool: asyncpg.Pool | asyncpg.Connection,
    batch_id: str,
    n: int,
    finished_at: int | None = None,
    *,
    finished_column: bool = True,
) -> None:
    """Result rows as the writer leaves them: line i has i input tokens, 1 cached, 2 output;
    every third line failed."""
    for i in range(n):
        values = [batch_id, f"req-{i}", i, i % 3 != 2, 200, f"r{i}", i, 1, 2]
        columns = "batch_id, custom_id, line, ok, status_code, request_id, input_tokens,"
        columns += " cached_tokens, output_tokens"
        if finished_column:
            values.append(finished_at)
            columns += ", finished_at"
        marks = ", ".join(f"${k + 1}" for k in range(len(values)))
        await pool.execute(f"INSERT INTO request_results ({columns}) VALUES ({marks})", *values)


async def usage(pool: asyncpg.Pool | asyncpg.Connection, batch_id: str) -> list[tuple]:  # type: ignore[type-arg]
    rows = await pool.fetch(
        "SELECT model, minute, requests, failed, input_tokens, cached_tokens, output_tokens"
        " FROM usage_minutes WHERE batch_id = $1 ORDER BY minute",
        batch_id,
    )
    return [tuple(r) for r in rows]


async def rows_left(pool: asyncpg.Pool | asyncpg.Connection, batch_id: str) -> int:
    n: int = await pool.fetchval(
        "SELECT count(*) FROM request_results WHERE batch_id = $1", batch_id
    )
    return n


def result(batch_id: str, line: int, finished_at_ms: int, ok: bool = True) -> ResultMessage:
    return ResultMessage(
        batch_id=batch_id,
        line=line,
        custom_id=f"req-{line}",
        request_id=f"r{line}",
        status_code=200 if ok else 400,
        response_body=msgspec.Raw(b'{"object": "chat.completion"}'),
        input_tokens=10,
        cached_tokens=line,
        output_tokens=5,
        finished_at_ms=finished_at_ms,
    )


async def publish(js: JetStreamContext, results: list[ResultMessage], suffix: str = "") -> None:
    for r in results:
        await js.publish(
            ResultMessage.subject_for(r.batch_id),
            msgspec.json.encode(r),
            headers={bus.MSG_ID: r.msg_id + suffix},
        )


async def wait_status(pool: asyncpg.Pool, batch_id: str, status: str) -> asyncpg.Record:
    async def reached() -> asyncpg.Record | None:
        row = await pool.fetchrow("SELECT * FROM batches WHERE id = $1", batch_id)
        return row if row is not None and row["status"] == status else None

    return await wait_until(reached, f"batch {batch_id} to be {status}")


async def wait_all_acked(js: JetStreamContext) -> None:
    async def acked() -> bool:
        try:
            info = await js.consumer_info(bus.RESULTS.name, results_writer.DURABLE)
        except NotFoundError:
            return False
        return info.num_ack_pending == 0 and info.num_pending == 0

    await wait_until(acked, "every result to be acked")


# The results writer prunes what it finalizes -------------------------------------------------


async def test_a_finished_batchs_lines_become_usage_per_minute_and_are_pruned(
    settings: config.Settings, pool: asyncpg.Pool, js: JetStreamContext
) -> None:
    batch_id = "batch_pruned"
    await add_batch(pool, batch_id, "in_progress", 6)
    results = [
        result(batch_id, 0, MINUTE_1 * 1000 + 1_000),
        result(batch_id, 1, MINUTE_1 * 1000 + 59_999, ok=False),
        result(batch_id, 2, MINUTE_2 * 1000),
        result(batch_id, 3, MINUTE_2 * 1000 + 30_000),
        result(batch_id, 4, MINUTE_2 * 1000 + 30_000, ok=False),
        result(batch_id, 5, 0),  # no finish time: the minute it is written in
    ]
    await publish(js, results)
    stop = asyncio.Event()
    started = int(time.time())
    task = asyncio.create_task(results_writer.run(settings, stop))
    try:
        row = await wait_status(pool, batch_id, "completed")
        await wait_all_acked(js)
        # A result that comes again afterwards (a re-publish JetStream cannot dedup) is skipped:
        # nothing is written back for a batch whose rows are gone.
        await publish(js, results[:2], suffix=":again")
        await wait_all_acked(js)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    ended = int(time.time())

    assert await rows_left(pool, batch_id) == 0
    assert row["results_pruned_at"] is not None
    first, second, written = await usage(pool, batch_id)
    assert first == (CHAT_MODEL, MINUTE_1, 2, 1, 20, 0 + 1, 10)
    assert second == (CHAT_MODEL, MINUTE_2, 3, 1, 30, 2 + 3 + 4, 15)
    assert written[0] == CHAT_MODEL and written[2:] == (1, 0, 10, 5, 5)
    assert started // 60 * 60 <= written[1] <= ended // 60 * 60
    after = await pool.fetchrow("SELECT * FROM batches WHERE id = $1", batch_id)
    assert (after["completed"], after["failed"], after["input_tokens"]) == (4, 2, 60)
    # The lines live on in the files.
    assert settings.nats_url is not None
    output = await stored_bytes(settings.nats_url, row["output_file_id"]) or b""
    errors = await stored_bytes(settings.nats_url, row["error_file_id"]) or b""
    assert (len(output.splitlines()), len(errors.splitlines())) == (4, 2)


# Pruning itself ------------------------------------------------------------------------------


async def test_pruning_leaves_open_batches_alone_and_runs_once(pool: asyncpg.Pool) -> None:
    await add_batch(pool, "batch_open", "in_progress", 4)
    await add_rows(pool, "batch_open", 4, MINUTE_1 + 5)
    for status in retention.OPEN_STATUSES:
        await pool.execute("UPDATE batches SET status = $1 WHERE id = 'batch_open'", status)
        async with pool.acquire() as conn:
            assert await retention.prune_results(conn, ["batch_open"]) == []
        assert await rows_left(pool, "batch_open") == 4

    await pool.execute("UPDATE batches SET status = 'cancelled' WHERE id = 'batch_open'")
    async with pool.acquire() as conn:
        assert await retention.prune_results(conn, ["batch_open"]) == ["batch_open"]
        assert await retention.prune_results(conn, ["batch_open"]) == []
    assert await rows_left(pool, "batch_open") == 0
    # Lines 0..3: line 2 failed; input tokens 0+1+2+3.
    assert await usage(pool, "batch_open") == [(CHAT_MODEL, MINUTE_1, 4, 1, 6, 4, 8)]


async def test_the_watchdog_catches_up_on_ended_batches_a_few_per_round(
    settings: config.Settings,
    pool: asyncpg.Pool,
    js: JetStreamContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(watchdog, "PRUNE_BATCHES_PER_ROUND", 2)
    # Ended before pruning existed: rows without a finish time, which count in the minute the
    # batch ended.
    for i in range(3):
        await add_batch(pool, f"batch_old_{i}", "completed", 3, completed_at=MINUTE_2 + 7)
        await add_rows(pool, f"batch_old_{i}", 3)
    await add_batch(pool, "batch_failed", "failed", 0)  # no rows: marked all the same
    await add_batch(pool, "batch_running", "in_progress", 3)
    await add_rows(pool, "batch_running", 2, MINUTE_1)
    wd = watchdog.Watchdog(
        settings,
        pool,
        js,
        await bus.workers_kv(js),
        await bus.cancelled_kv(js),
        await bus.files_bucket(js),
    )

    async def unpruned() -> list[str]:
        async with pool.acquire() as conn:
            return await watchdog_store.unpruned_batches(conn, 10)

    assert await unpruned() == ["batch_failed", "batch_old_0", "batch_old_1", "batch_old_2"]
    await wd.round()
    assert await unpruned() == ["batch_old_1", "batch_old_2"]
    await wd.round()
    assert await unpruned() == []

    for i in range(3):
        assert await rows_left(pool, f"batch_old_{i}") == 0
        assert await usage(pool, f"batch_old_{i}") == [(CHAT_MODEL, MINUTE_2, 3, 1, 3, 3, 6)]
    assert await rows_left(pool, "batch_running") == 2  # open: its rows stay


async def test_close_out_lines_carry_the_time_they_were_written(pool: asyncpg.Pool) -> None:
    await add_batch(pool, "batch_closing", "cancelling", 2)
    before = int(time.time())
    filled = await api_store.fill_missing_lines(
        pool, "batch_closing", [(0, "req-0", "r0"), (1, "req-1", "r1")], "batch_cancelled", "x"
    )
    assert filled == 2
    stamps = await pool.fetch("SELECT finished_at FROM request_results")
    assert all(before <= r["finished_at"] <= int(time.time()) for r in stamps)


# Upgrading -----------------------------------------------------------------------------------


@pytest.fixture
async def empty_database(postgres_server: str) -> AsyncIterator[str]:
    name = f"jetbatch_upgrade_{int(time.time() * 1000)}"
    conn = await asyncpg.connect(postgres_server)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    yield urlunsplit(urlsplit(postgres_server)._replace(path=f"/{name}"))
    conn = await asyncpg.connect(postgres_server)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def test_migration_004_carries_an_existing_deployments_results_forward(
    empty_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = tmp_path / "migrations"
    before.mkdir()
    for path in sorted(db.MIGRATIONS_DIR.glob("*.sql")):
        if path.stem < "004":
            shutil.copy(path, before / path.name)
    with monkeypatch.context() as m:
        m.setattr(db, "MIGRATIONS_DIR", before)
        await db.migrate(empty_database)
    conn = await asyncpg.connect(empty_database)
    try:
        await add_batch(conn, "batch_legacy", "completed", 3, completed_at=MINUTE_2 + 30)
        await add_rows(conn, "batch_legacy", 3, finished_column=False)
        await add_batch(conn, "batch_legacy_open", "in_progress", 3)
        await add_rows(conn, "batch_legacy_open", 1, finished_column=False)

        later = sorted(p.stem for p in db.MIGRATIONS_DIR.glob("*.sql") if p.stem >= "004")
        assert await db.migrate(empty_database) == later  # 004_usage and what came after
        assert await rows_left(conn, "batch_legacy") == 3  # kept until pruning catches up
        assert await watchdog_store.unpruned_batches(conn, 10) == ["batch_legacy"]
        assert await retention.prune_results(conn, ["batch_legacy"]) == ["batch_legacy"]
        assert await usage(conn, "batch_legacy") == [(CHAT_MODEL, MINUTE_2, 3, 1, 3, 3, 6)]
        assert await rows_left(conn, "batch_legacy_open") == 1
    finally:
        await conn.close()
