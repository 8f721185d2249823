"""Files expire, and deleting one deletes every copy of its content (README: Retention): the
watchdog deletes expired files (never the input file of a batch that has not ended) and sweeps
interrupted uploads; `DELETE /v1/files/{id}` refuses a file an open batch still needs; deleting
a batch's output or error file purges its results from RESULTS, deleting its input file its
requests left in REQUESTS, and both its dead letters. On a real nats-server and PostgreSQL."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import msgspec
import openai
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from schemas.messages import RequestMessage, ResultMessage
from schemas.projects import DEFAULT_PROJECT_ID
from services.api import store
from services.api.service import running
from services.watchdog import service as watchdog
from shared import bus, config, db
from shared.bus import FileObjects
from shared.bus.objects import FILES_BUCKET
from shared.domain import deadletters, retention
from shared.errors import NotFound
from tests.helpers import API_KEY, CHAT, CHAT_MODEL, as_chunks, chat_jsonl, wait_until
from tests.lifecycle_helpers import lifecycle_env, running_system

DAY_S = 86_400


@dataclass
class Parts:
    settings: config.Settings
    pool: asyncpg.Pool
    nc: NATS
    js: JetStreamContext
    files: FileObjects

    async def watchdog(self) -> watchdog.Watchdog:
        return watchdog.Watchdog(
            self.settings,
            self.pool,
            self.js,
            await bus.workers_kv(self.js),
            await bus.cancelled_kv(self.js),
            self.files,
        )


@pytest.fixture
def env(base_api_env: dict[str, str]) -> dict[str, str]:
    return base_api_env


@pytest.fixture
async def parts(env: dict[str, str]) -> AsyncIterator[Parts]:
    settings = config.load(env)
    assert settings.database_url is not None and settings.nats_url is not None
    pool = await db.connect_pool(settings.database_url, max_size=4)
    nc = await bus.connect(settings.nats_url, "test-expiry")
    js = nc.jetstream()
    await bus.ensure_streams(js)
    try:
        yield Parts(settings, pool, nc, js, await bus.files_bucket(js))
    finally:
        await nc.close()
        await pool.close()


@pytest.fixture
async def client(env: dict[str, str]) -> AsyncIterator[openai.AsyncOpenAI]:
    async with running(config.load(env)) as base_url:
        c = openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0)
        yield c
        await c.close()


# Helpers -------------------------------------------------------------------------------------


async def add_file(
    parts: Parts, file_id: str, *, expires_at: int | None, purpose: str = "batch"
) -> None:
    """A file as the api or the results writer leaves it: its object and its row."""
    size = await parts.files.put(file_id, as_chunks(chat_jsonl(2)))
    await parts.pool.execute(
        "INSERT INTO files (id, bytes, created_at, expires_at, filename, purpose, storage_key)"
        " VALUES ($1, $2, $3, $4, 'f.jsonl', $5, $1)",
        file_id, size, int(time.time()) - DAY_S, expires_at, purpose,
    )  # fmt: skip


async def add_batch(
    parts: Parts,
    batch_id: str,
    status: str,
    input_file_id: str,
    *,
    output_file_id: str | None = None,
    error_file_id: str | None = None,
) -> None:
    await parts.pool.execute(
        "INSERT INTO batches (id, endpoint, model, input_file_id, completion_window, status,"
        " created_at, output_file_id, error_file_id, total)"
        " VALUES ($1, $2, $3, $4, '24h', $5, $6, $7, $8, 2)",
        batch_id, CHAT, CHAT_MODEL, input_file_id, status, int(time.time()), output_file_id,
        error_file_id,
    )  # fmt: skip


async def set_status(parts: Parts, batch_id: str, status: str) -> None:
    await parts.pool.execute("UPDATE batches SET status = $2 WHERE id = $1", batch_id, status)


async def is_deleted(parts: Parts, file_id: str) -> bool:
    deleted_at = await parts.pool.fetchval("SELECT deleted_at FROM files WHERE id = $1", file_id)
    gone = await parts.files.size(file_id) is None
    assert (deleted_at is not None) == gone, f"{file_id}: row and bytes disagree"
    return gone


def result(batch_id: str, line: int) -> ResultMessage:
    return ResultMessage(
        batch_id=batch_id,
        line=line,
        custom_id=f"req-{line}",
        request_id=f"r{line}",
        status_code=200,
        response_body=msgspec.Raw(b'{"answer": "private"}'),
    )


def request(batch_id: str, line: int) -> RequestMessage:
    return RequestMessage(
        batch_id=batch_id,
        line=line,
        custom_id=f"req-{line}",
        endpoint=CHAT,
        model=CHAT_MODEL,
        body=msgspec.Raw(b'{"prompt": "private"}'),
    )


async def publish_results(parts: Parts, batch_id: str, n: int) -> None:
    for line in range(n):
        r = result(batch_id, line)
        await parts.js.publish(
            r.subject_for(batch_id), msgspec.json.encode(r), headers={bus.MSG_ID: r.msg_id}
        )


async def publish_requests(parts: Parts, batch_id: str, n: int) -> None:
    for line in range(n):
        r = request(batch_id, line)
        await parts.js.publish(
            RequestMessage.subject_for(CHAT_MODEL),
            msgspec.json.encode(r),
            headers={bus.MSG_ID: r.msg_id},
        )


async def results_on_bus(parts: Parts) -> dict[str, int]:
    """Messages per batch on RESULTS."""
    info = await parts.js.stream_info(bus.RESULTS.name, subjects_filter=">")
    return {s.rsplit(".", 1)[-1]: n for s, n in (info.state.subjects or {}).items()}


async def requests_on_bus(js: JetStreamContext) -> collections.Counter[str]:
    """Messages per batch in REQUESTS."""
    found: collections.Counter[str] = collections.Counter()
    seq = 1
    while True:
        try:
            msg = await js.get_msg(bus.REQUESTS.name, seq=seq, subject=">", next=True)
        except NotFoundError:
            return found
        found[msgspec.json.decode(msg.data or b"", type=RequestMessage).batch_id] += 1
        assert msg.seq is not None
        seq = msg.seq + 1


async def add_dead_letter(parts: Parts, payload: bytes, seq: int, source: str) -> None:
    await deadletters.record(
        parts.pool,
        source=source,
        stream_seq=seq,
        consumer="test",
        subject="jetbatch.test",
        payload=payload,
        headers=None,
        error="failed every time",
        deliveries=3,
    )


async def dead_letter_batches(parts: Parts) -> list[str]:
    rows = await parts.pool.fetch("SELECT batch_id FROM dead_letters ORDER BY batch_id")
    return [r["batch_id"] for r in rows]


# Expiry ---------------------------------------------------------------------------------------


async def test_the_watchdog_deletes_expired_files_with_their_bytes_and_keeps_the_rest(
    parts: Parts,
) -> None:
    now = int(time.time())
    await add_file(parts, "file-expired", expires_at=now - 1)
    await add_file(parts, "file-expired-output", expires_at=now - 60, purpose="batch_output")
    await add_file(parts, "file-later", expires_at=now + DAY_S)
    await add_file(parts, "file-forever", expires_at=None, purpose="user_data")

    await (await parts.watchdog()).round()

    assert await is_deleted(parts, "file-expired")
    assert await is_deleted(parts, "file-expired-output")
    assert not await is_deleted(parts, "file-later")
    assert not await is_deleted(parts, "file-forever")


async def test_an_expired_input_file_is_kept_until_its_batch_ends(parts: Parts) -> None:
    await add_file(parts, "file-in", expires_at=int(time.time()) - 1)
    await add_batch(parts, "batch_running", "in_progress", "file-in")
    wd = await parts.watchdog()
    for status in retention.OPEN_STATUSES:
        await set_status(parts, "batch_running", status)
        await wd.round()
        assert not await is_deleted(parts, "file-in"), f"deleted while its batch is {status}"

    await set_status(parts, "batch_running", "completed")
    await wd.round()
    assert await is_deleted(parts, "file-in")


async def test_expiry_works_off_a_backlog_a_bounded_number_per_round(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watchdog, "EXPIRE_FILES_PER_ROUND", 2)
    for i in range(5):
        await add_file(parts, f"file-old-{i}", expires_at=int(time.time()) - 100 + i)
    wd = await parts.watchdog()

    left = []
    for _ in range(3):
        await wd.round()
        left.append([i for i in range(5) if not await is_deleted(parts, f"file-old-{i}")])
    assert left == [[2, 3, 4], [4], []]  # oldest first


async def test_interrupted_uploads_are_swept_every_few_minutes_not_every_round(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweeps: list[float] = []
    sweep = FileObjects.sweep_orphans

    async def sweep_now(self: FileObjects, min_age_s: float = 0) -> int:
        sweeps.append(time.monotonic())
        return await sweep(self, min_age_s=0)  # the chunks below are new: sweep them anyway

    monkeypatch.setattr(FileObjects, "sweep_orphans", sweep_now)
    monkeypatch.setattr(watchdog, "ORPHAN_SWEEP_INTERVAL_S", 2.0)  # default: minutes
    await parts.files.put("file-whole", as_chunks(b"x" * 100))
    orphan = f"$O.{FILES_BUCKET}.C.crashednuid"
    await parts.js.publish(orphan, b"the start of an upload cut short")
    wd = await parts.watchdog()

    for _ in range(3):
        await wd.round()
    assert len(sweeps) == 1
    info = await parts.js.stream_info(parts.files.stream, subjects_filter=orphan)
    assert not info.state.subjects
    assert await parts.files.size("file-whole") == 100

    await asyncio.sleep(2.1)
    await wd.round()
    await wd.round()
    assert len(sweeps) == 2


# Deleting a file and its copies ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["api", "expiry"])
async def test_deleting_an_output_file_purges_its_batchs_results_and_dead_letters(
    parts: Parts, client: openai.AsyncOpenAI, how: str
) -> None:
    await add_file(parts, "file-in-a", expires_at=None)
    await add_file(parts, "file-out-a", expires_at=int(time.time()) - 1, purpose="batch_output")
    await add_batch(parts, "batch_a", "completed", "file-in-a", output_file_id="file-out-a")
    await add_file(parts, "file-in-b", expires_at=None)
    await add_batch(parts, "batch_b", "completed", "file-in-b")
    for batch_id in ("batch_a", "batch_b"):
        await publish_results(parts, batch_id, 3)
    await add_dead_letter(parts, msgspec.json.encode(result("batch_a", 5)), 101, "RESULTS")
    await add_dead_letter(parts, msgspec.json.encode(request("batch_a", 6)), 7, "REQUESTS")
    await add_dead_letter(parts, msgspec.json.encode(request("batch_b", 1)), 8, "REQUESTS")
    assert await results_on_bus(parts) == {"batch_a": 3, "batch_b": 3}

    if how == "api":
        deleted = await client.files.delete("file-out-a")
        assert deleted.deleted
    else:
        await (await parts.watchdog()).round()

    assert await is_deleted(parts, "file-out-a")
    assert await results_on_bus(parts) == {"batch_b": 3}
    assert await dead_letter_batches(parts) == ["batch_b"]
    assert not await is_deleted(parts, "file-in-a")  # its own file: deleted on its own


async def test_deleting_an_input_file_refused_while_its_batch_runs_then_takes_its_requests(
    database_url: str, nats_url: str, scratch_dir: Path
) -> None:
    """End to end: no worker, so the batch's requests wait in REQUESTS; cancelled, they stay
    there (no worker pulls them to skip them) until its input file is deleted."""
    env = lifecycle_env(database_url, nats_url, scratch_dir)
    async with running_system(env, start=("results_writer", "watchdog")) as system:
        file_id = await system.upload(chat_jsonl(3))
        other_id = await system.upload(chat_jsonl(2, prefix="other"))
        batch = await system.client.batches.create(
            input_file_id=file_id, endpoint=CHAT, completion_window="24h"
        )
        other = await system.client.batches.create(
            input_file_id=other_id, endpoint=CHAT, completion_window="24h"
        )
        nc = await bus.connect(nats_url, "test")
        try:
            js = nc.jetstream()

            async def queued() -> bool:
                return await requests_on_bus(js) == {batch.id: 3, other.id: 2}

            await wait_until(queued, "both batches' requests to be queued")
            with pytest.raises(openai.BadRequestError) as refused:
                await system.client.files.delete(file_id)
            assert refused.value.status_code == 400
            assert refused.value.code == "file_in_use"
            assert refused.value.param == "file_id"  # type: ignore[attr-defined]
            assert batch.id in refused.value.message and "in_progress" in refused.value.message
            assert (await system.client.files.retrieve(file_id)).id == file_id

            await system.client.batches.cancel(batch.id)
            with pytest.raises(openai.BadRequestError):  # cancelling: not ended yet
                await system.client.files.delete(file_id)
            ended = await system.wait_batch(batch.id, {"cancelled"})
            assert ended.request_counts.failed == 3
            assert await requests_on_bus(js) == {batch.id: 3, other.id: 2}

            assert (await system.client.files.delete(file_id)).deleted
            assert await requests_on_bus(js) == {other.id: 2}
            with pytest.raises(openai.NotFoundError):
                await system.client.files.content(file_id)
            # The output of the batch is its own: still there.
            assert len(await system.lines(ended.error_file_id)) == 3
        finally:
            await nc.close()


async def test_a_batch_created_while_its_file_is_deleted_never_loses_its_input(
    parts: Parts,
) -> None:
    await add_file(parts, "file-raced", expires_at=None)
    # The batch's insert holds the file's row until its transaction commits...
    async with parts.pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await store.insert_batch(
            conn,
            batch_id="batch_raced",
            endpoint=CHAT,
            input_file_id="file-raced",
            completion_window="24h",
            created_at=int(time.time()),
            expires_at=int(time.time()) + DAY_S,
            metadata=None,
            output_expires_after=None,
            project_id=DEFAULT_PROJECT_ID,
        )
        deleting = asyncio.create_task(
            retention.delete_file(parts.pool, parts.js, parts.files, "file-raced")
        )
        await asyncio.sleep(0.3)
        assert not deleting.done()  # ...so the delete waits for it,
        await tx.commit()
    with pytest.raises(retention.FileInUse) as refused:  # then sees the batch.
        await deleting
    assert refused.value.batch_id == "batch_raced"
    assert not await is_deleted(parts, "file-raced")

    # The other way round: deleted first, a batch cannot be created from it.
    await add_file(parts, "file-gone", expires_at=None)
    assert await retention.delete_file(parts.pool, parts.js, parts.files, "file-gone")
    with pytest.raises(NotFound):
        await store.insert_batch(
            parts.pool,
            batch_id="batch_late",
            endpoint=CHAT,
            input_file_id="file-gone",
            completion_window="24h",
            created_at=int(time.time()),
            expires_at=int(time.time()) + DAY_S,
            metadata=None,
            output_expires_after=None,
            project_id=DEFAULT_PROJECT_ID,
        )
    assert await retention.delete_file(parts.pool, parts.js, parts.files, "file-gone") is None
