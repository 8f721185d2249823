"""The api's Batches routes and the background validation + publishing (services/api/ingest.py),
driven through the official openai SDK against the api served by uvicorn, with a real PostgreSQL
and nats-server; published request messages are read back from the REQUESTS stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import msgspec
import nats
import openai
import pytest
from openai.types import Batch

from schemas.messages import DISPATCHED, BatchEvent, RequestMessage
from services.api import ingest
from services.api.deps import Deps
from shared import bus, config
from shared.db import connect_pool
from tests.helpers import API_KEY, CHAT, CHAT_MODEL, EMBED_MODEL, chat_line, wait_until
from tests.openai_schema import validate

OTHER_CHAT_MODEL = "other-chat"


@pytest.fixture
def api_env(base_api_env: dict[str, str]) -> dict[str, str]:
    return {
        **base_api_env,
        "JETBATCH_MODELS": f"{CHAT_MODEL},{OTHER_CHAT_MODEL}=/models/other@generate,{EMBED_MODEL}",
        "JETBATCH_MAX_BATCH_LINES": "50",
    }


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[nats.js.JetStreamContext]:
    nc = await nats.connect(nats_url)
    yield nc.jetstream()
    await nc.close()


async def upload(client: openai.AsyncOpenAI, content: bytes, purpose: str = "batch") -> str:
    return (await client.files.create(file=("in.jsonl", content), purpose=purpose)).id  # type: ignore[arg-type]


async def settled(client: openai.AsyncOpenAI, batch_id: str, timeout_s: float = 20) -> Batch:
    """The batch once it has left `validating`."""

    async def left_validating() -> Batch | None:
        batch = await client.batches.retrieve(batch_id)
        return batch if batch.status != "validating" else None

    what = f"batch {batch_id} to leave validating"
    return await wait_until(left_validating, what, timeout_s=timeout_s)


async def published_at(database_url: str, batch_id: str, timeout_s: float = 20) -> int:
    conn = await asyncpg.connect(database_url)
    try:

        async def published() -> int | None:
            sql = "SELECT published_at FROM batches WHERE id = $1"
            return await conn.fetchval(sql, batch_id)

        what = f"batch {batch_id} to be published"
        return int(await wait_until(published, what, timeout_s=timeout_s))
    finally:
        await conn.close()


async def request_count(js: nats.js.JetStreamContext) -> int:
    return (await js.stream_info(bus.REQUESTS.name)).state.messages


async def test_a_valid_batch_publishes_one_request_per_line(
    client: openai.AsyncOpenAI, js: nats.js.JetStreamContext, database_url: str
) -> None:
    lines = [chat_line(f"req-{i}") for i in range(25)]
    file_id = await upload(client, b"\n".join(lines))  # blank lines in between are ignored
    created = await client.batches.create(
        input_file_id=file_id,
        endpoint=CHAT,
        completion_window="24h",
        metadata={"project": "tests"},
    )
    assert created.id.startswith("batch_")
    assert created.status == "validating"
    assert created.expires_at == created.created_at + 86_400
    assert created.metadata == {"project": "tests"}
    assert created.errors is None

    batch = await settled(client, created.id)
    assert batch.status == "in_progress", batch.errors
    assert batch.model == CHAT_MODEL
    assert batch.in_progress_at is not None
    assert batch.request_counts is not None and batch.request_counts.total == 25
    await published_at(database_url, created.id)
    assert await request_count(js) == 25

    subject = RequestMessage.subject_for(CHAT_MODEL, DISPATCHED)
    for seq in (1, 25):
        raw = await js.get_msg(bus.REQUESTS.name, seq)
        assert raw.subject == subject
        message = msgspec.json.decode(raw.data or b"", type=RequestMessage)
        assert message.batch_id == created.id
        assert (message.endpoint, message.model) == (CHAT, CHAT_MODEL)
        assert message.custom_id == f"req-{message.line}"
        assert raw.headers is not None and raw.headers[bus.MSG_ID] == message.msg_id
        sent = json.loads(lines[message.line])["body"]
        assert json.loads(bytes(message.body)) == sent


@pytest.fixture
async def deps(api_env: dict[str, str], database_url: str, nats_url: str) -> AsyncIterator[Deps]:
    """Connections of the test's own, to run ingest.process_batch as a re-drive would."""
    settings = config.load(api_env)
    pool = await connect_pool(database_url)
    nc = await bus.connect(nats_url, "test")
    js = nc.jetstream()
    yield Deps(
        settings=settings,
        pool=pool,
        nc=nc,
        js=js,
        workers=await bus.workers_kv(js),
        storage=await bus.files_bucket(js),
        started_at=0,
    )
    await pool.close()
    await nc.close()


async def test_process_batch_can_be_rerun_without_duplicates(
    client: openai.AsyncOpenAI, js: nats.js.JetStreamContext, deps: Deps, database_url: str
) -> None:
    file_id = await upload(client, b"".join(chat_line(f"r{i}") for i in range(10)))
    created = await client.batches.create(
        input_file_id=file_id, endpoint=CHAT, completion_window="24h"
    )
    await published_at(database_url, created.id)
    assert await request_count(js) == 10

    # As after a crash mid-way: back to `validating`, nothing recorded as published.
    await deps.pool.execute(
        "UPDATE batches SET status = 'validating', published_at = NULL, in_progress_at = NULL,"
        " total = 0 WHERE id = $1",
        created.id,
    )
    await ingest.process_batch(deps, created.id)
    await ingest.process_batch(deps, created.id)  # and once more: nothing left to do
    batch = await client.batches.retrieve(created.id)
    assert batch.status == "in_progress"
    assert batch.request_counts is not None and batch.request_counts.total == 10
    await published_at(database_url, created.id)
    assert await request_count(js) == 10  # the stream dropped the re-published duplicates

    # In progress but never published (a crash between the two passes): only publishing is left.
    await deps.pool.execute("UPDATE batches SET published_at = NULL WHERE id = $1", created.id)
    await ingest.process_batch(deps, created.id)
    await published_at(database_url, created.id)
    assert await request_count(js) == 10


async def test_a_batch_whose_file_was_deleted_fails(
    client: openai.AsyncOpenAI, deps: Deps, js: nats.js.JetStreamContext
) -> None:
    file_id = await upload(client, chat_line("a"))
    await client.files.delete(file_id)
    # A batch created before the delete, left in `validating` (the api refuses a deleted file).
    await deps.pool.execute(
        "INSERT INTO batches (id, endpoint, input_file_id, completion_window, status, created_at)"
        " VALUES ('batch_orphan', $1, $2, '24h', 'validating', 1)",
        CHAT,
        file_id,
    )
    await ingest.process_batch(deps, "batch_orphan")
    batch = await client.batches.retrieve("batch_orphan")
    assert batch.status == "failed"
    assert batch.errors is not None
    assert [(e.code, e.param) for e in batch.errors.data or []] == [
        ("file_not_found", "input_file_id")
    ]
    assert await request_count(js) == 0


BAD_FILES: dict[str, tuple[bytes, str, int | None]] = {
    "not json": (chat_line("a") + b"{oops\n", "invalid_json_line", 2),
    "not utf-8": (chat_line("a") + b'{"custom_id": "\xff"}\n', "invalid_utf8", 2),
    "not an object": (b"[1]\n", "invalid_json_line", 1),
    "no custom_id": (chat_line("a") + chat_line(""), "missing_custom_id", 2),
    "duplicate custom_id": (
        chat_line("a") + chat_line("b") + chat_line("a"),
        "duplicate_custom_id",
        3,
    ),
    "wrong method": (chat_line("a") + chat_line("b", method="GET"), "invalid_method", 2),
    "wrong url": (chat_line("a") + chat_line("b", url="/v1/completions"), "mismatched_url", 2),
    "mixed models": (
        chat_line("a") + b"\n" + chat_line("b", model=OTHER_CHAT_MODEL),
        "mixed_models",
        3,
    ),
    "body not an object": (
        chat_line("a")
        + b'{"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": 1}\n',
        "invalid_body",
        2,
    ),
    "empty": (b"\n\n", "empty_file", None),
}


async def test_a_bad_input_file_fails_the_batch_naming_the_line(
    client: openai.AsyncOpenAI, js: nats.js.JetStreamContext
) -> None:
    created: dict[str, str] = {}
    for name, (content, _, _) in BAD_FILES.items():
        file_id = await upload(client, content)
        batch = await client.batches.create(
            input_file_id=file_id, endpoint=CHAT, completion_window="24h"
        )
        created[name] = batch.id
    for name, (_, code, line_number) in BAD_FILES.items():
        batch = await settled(client, created[name])
        assert batch.status == "failed", name
        assert batch.failed_at is not None
        assert batch.errors is not None and batch.errors.data, name
        first = batch.errors.data[0]
        assert (first.code, first.line) == (code, line_number), (name, first)
        assert first.message
    assert await request_count(js) == 0  # nothing of a failed batch is published

    # Each failure is announced on EVENTS for the webhook notifier.
    info = await js.stream_info(bus.EVENTS.name)
    assert info.state.messages == len(BAD_FILES)
    event = msgspec.json.decode((await js.get_msg(bus.EVENTS.name, 1)).data or b"", type=BatchEvent)
    assert event.type == "batch.failed"
    assert event.batch_id in created.values()


async def create_raw(api: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(headers={"authorization": f"Bearer {API_KEY}"}) as http:
        return await http.post(f"{api}/batches", json=body)


async def test_bad_create_requests_are_refused_with_the_field_named(
    client: openai.AsyncOpenAI, api: str
) -> None:
    good = await upload(client, chat_line("a"))
    embeddings = await upload(client, chat_line("a", model=EMBED_MODEL, url="/v1/embeddings"))
    unserved = await upload(client, chat_line("a", model="gpt-9"))
    not_batch = await upload(client, b"hello", purpose="user_data")
    too_long = await upload(client, b"".join(chat_line(f"r{i}") for i in range(51)))

    async def refused(
        expected: type[openai.APIStatusError], **fields: Any
    ) -> openai.APIStatusError:
        body = {"input_file_id": good, "endpoint": CHAT, "completion_window": "24h", **fields}
        with pytest.raises(expected) as refusal:
            await client.batches.create(**body)
        error = refusal.value
        assert error.body is not None and error.body["message"]  # type: ignore[index]
        return error

    e = await refused(openai.BadRequestError, endpoint="/v1/responses")
    assert "not supported by this deployment" in e.message and e.param == "endpoint"  # type: ignore[attr-defined]
    e = await refused(openai.BadRequestError, endpoint="/v1/nothing")
    assert e.param == "endpoint"  # type: ignore[attr-defined]
    e = await refused(openai.BadRequestError, completion_window="8d")  # 1h..7d
    assert e.param == "completion_window"  # type: ignore[attr-defined]
    for metadata in (
        {f"k{i}": "v" for i in range(17)},
        {"k" * 65: "v"},
        {"k": "v" * 513},
        {"k": 5},
    ):
        e = await refused(openai.BadRequestError, metadata=metadata)
        assert e.param == "metadata"  # type: ignore[attr-defined]
    e = await refused(openai.NotFoundError, input_file_id="file-nope")
    assert "No such File object: file-nope" in e.message
    assert e.param == "input_file_id"  # type: ignore[attr-defined]
    e = await refused(openai.BadRequestError, input_file_id=not_batch)
    assert e.param == "input_file_id"  # type: ignore[attr-defined]
    e = await refused(openai.BadRequestError, input_file_id=unserved)
    assert e.code == "model_not_found"
    assert CHAT_MODEL in e.message and EMBED_MODEL in e.message  # names the served models
    e = await refused(
        openai.BadRequestError, input_file_id=embeddings
    )  # embed model, chat endpoint
    assert EMBED_MODEL in e.message
    e = await refused(openai.BadRequestError, input_file_id=too_long)
    assert "50" in e.message

    missing = await create_raw(api, {"endpoint": CHAT, "completion_window": "24h"})
    assert missing.status_code == 400
    assert missing.json()["error"]["param"] == "input_file_id"
    ok = await client.batches.create(
        input_file_id=embeddings, endpoint="/v1/embeddings", completion_window="24h"
    )
    assert ok.status == "validating"
    assert [b.id for b in (await client.batches.list()).data] == [ok.id]  # nothing refused stored


async def test_cancelling_moves_an_open_batch_to_cancelling_and_refuses_a_finished_one(
    client: openai.AsyncOpenAI,
) -> None:
    open_file = await upload(client, b"".join(chat_line(f"r{i}") for i in range(5)))
    batch = await client.batches.create(
        input_file_id=open_file, endpoint=CHAT, completion_window="24h"
    )
    cancelled = await client.batches.cancel(batch.id)
    assert cancelled.status == "cancelling"
    assert cancelled.cancelling_at is not None
    again = await client.batches.cancel(batch.id)  # a retried cancel is harmless
    assert again.status == "cancelling" and again.cancelling_at == cancelled.cancelling_at
    await asyncio.sleep(0.3)  # whatever the validation did meanwhile, it did not undo the cancel
    assert (await client.batches.retrieve(batch.id)).status == "cancelling"

    bad_file = await upload(client, b"{oops\n")
    failed = await settled(
        client,
        (
            await client.batches.create(
                input_file_id=bad_file, endpoint=CHAT, completion_window="24h"
            )
        ).id,
    )
    assert failed.status == "failed"
    with pytest.raises(openai.ConflictError) as conflict:
        await client.batches.cancel(failed.id)
    assert "failed" in conflict.value.message
    assert conflict.value.response.headers["x-should-retry"] == "false"
    with pytest.raises(openai.NotFoundError):
        await client.batches.cancel("batch_nope")


async def test_listing_batches_paginates_newest_first(client: openai.AsyncOpenAI) -> None:
    file_id = await upload(client, chat_line("a"))
    ids = []
    for _ in range(5):
        batch = await client.batches.create(
            input_file_id=file_id, endpoint=CHAT, completion_window="24h"
        )
        ids.append(batch.id)
    first = await client.batches.list(limit=2)
    assert len(first.data) == 2 and first.has_more
    everything = [b.id async for b in client.batches.list(limit=2)]
    assert sorted(everything) == sorted(ids) and len(everything) == 5
    listed = (await client.batches.list()).data
    assert [b.created_at for b in listed] == sorted((b.created_at for b in listed), reverse=True)
    with pytest.raises(openai.NotFoundError):
        await client.batches.retrieve("batch_nope")
    with pytest.raises(openai.BadRequestError):
        await client.batches.list(limit=101)


async def test_responses_match_openais_json_schemas(api: str) -> None:
    headers = {"authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=api, headers=headers) as http:
        good = (
            await http.post(
                "/files", files={"file": ("in.jsonl", chat_line("a"))}, data={"purpose": "batch"}
            )
        ).json()
        bad = (
            await http.post("/files", files={"file": ("x.jsonl", b"{")}, data={"purpose": "batch"})
        ).json()
        validate("OpenAIFile", good)
        validate("OpenAIFile", (await http.get(f"/files/{good['id']}")).json())
        validate("ListFilesResponse", (await http.get("/files")).json())

        body = {"endpoint": CHAT, "completion_window": "24h", "metadata": {"k": "v"}}
        created = (await http.post("/batches", json={**body, "input_file_id": good["id"]})).json()
        failing = (await http.post("/batches", json={**body, "input_file_id": bad["id"]})).json()
        validate("Batch", created)

        async def failed_batch() -> Any:
            batch = (await http.get(f"/batches/{failing['id']}")).json()
            return batch if batch["status"] == "failed" else None

        failed = await wait_until(failed_batch, "the bad file's batch to fail", timeout_s=20)
        assert failed["errors"]["data"][0]["line"] == 1
        validate("Batch", failed)
        validate("Batch", (await http.post(f"/batches/{created['id']}/cancel")).json())
        validate("ListBatchesResponse", (await http.get("/batches")).json())
        validate("DeleteFileResponse", (await http.delete(f"/files/{bad['id']}")).json())
        for response in (
            await http.get("/files/file-nope"),
            await http.post("/batches", json={**body, "input_file_id": "file-nope"}),
            await http.post(f"/batches/{failing['id']}/cancel"),
            await http.get("/batches?limit=0"),
        ):
            assert response.status_code >= 400
            validate("ErrorResponse", response.json())
