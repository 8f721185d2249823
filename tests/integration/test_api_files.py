"""The api's Files routes, auth and error shapes, driven through the official openai SDK against
the api served by uvicorn on a free port, with a real PostgreSQL and nats-server."""

from __future__ import annotations

import dataclasses
import json

import asyncpg
import httpx
import openai
import pytest

from services.api.service import running
from shared import bus, config
from tests.helpers import API_KEY, CHAT_MODEL, chat_line, stored_keys, stored_messages


async def objects(api_env: dict[str, str]) -> set[str]:
    """The files bucket's objects."""
    return await stored_keys(api_env["JETBATCH_NATS_URL"])


async def test_a_batch_file_round_trips_through_the_sdk(
    client: openai.AsyncOpenAI, api_env: dict[str, str], database_url: str
) -> None:
    content = b"".join(chat_line(f"r{i}") for i in range(3)) + b"\n"
    uploaded = await client.files.create(file=("input.jsonl", content), purpose="batch")
    assert uploaded.id.startswith("file-")
    assert (uploaded.bytes, uploaded.filename, uploaded.purpose) == (
        len(content),
        "input.jsonl",
        "batch",
    )
    assert uploaded.status == "processed"
    assert uploaded.expires_at == uploaded.created_at + 30 * 86_400  # OpenAI's batch default

    retrieved = await client.files.retrieve(uploaded.id)
    assert retrieved == uploaded
    downloaded = await client.files.content(uploaded.id)
    assert downloaded.read() == content
    assert downloaded.response.headers["content-type"].startswith("application/jsonl")

    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow("SELECT line_count, models FROM files WHERE id = $1", uploaded.id)
    finally:
        await conn.close()
    assert row is not None
    assert (row["line_count"], row["models"]) == (3, [CHAT_MODEL])

    deleted = await client.files.delete(uploaded.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (uploaded.id, True, "file")
    assert uploaded.id not in await objects(api_env)
    with pytest.raises(openai.NotFoundError) as missing:
        await client.files.retrieve(uploaded.id)
    assert f"No such File object: {uploaded.id}" in missing.value.message
    with pytest.raises(openai.NotFoundError):
        await client.files.content(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        await client.files.delete(uploaded.id)


async def test_a_non_batch_file_is_stored_without_expiry_or_scan(
    client: openai.AsyncOpenAI, database_url: str
) -> None:
    uploaded = await client.files.create(file=("notes.bin", b"\x00\x01binary"), purpose="user_data")
    assert uploaded.expires_at is None
    downloaded = await client.files.content(uploaded.id)
    assert downloaded.read() == b"\x00\x01binary"
    assert downloaded.response.headers["content-type"] == "application/octet-stream"
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow("SELECT line_count, models FROM files WHERE id = $1", uploaded.id)
    finally:
        await conn.close()
    assert row is not None and row["line_count"] is None and row["models"] is None


async def test_expires_after_sets_expires_at(client: openai.AsyncOpenAI) -> None:
    uploaded = await client.files.create(
        file=("in.jsonl", chat_line("a")),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 7200},
    )
    assert uploaded.expires_at == uploaded.created_at + 7200
    with pytest.raises(openai.BadRequestError) as bad:
        await client.files.create(
            file=("in.jsonl", chat_line("a")),
            purpose="batch",
            expires_after={"anchor": "created_at", "seconds": 60},
        )
    assert bad.value.param == "expires_after.seconds"  # type: ignore[attr-defined]


async def test_listing_files_paginates_newest_first(client: openai.AsyncOpenAI) -> None:
    ids = [
        (await client.files.create(file=(f"f{i}.jsonl", chat_line(f"r{i}")), purpose="batch")).id
        for i in range(5)
    ]
    other = await client.files.create(file=("x.txt", b"x"), purpose="user_data")

    page = await client.files.list(limit=2, purpose="batch")
    assert len(page.data) == 2 and page.has_more
    seen = [f.id async for f in client.files.list(limit=2, purpose="batch")]  # follows `after`
    assert sorted(seen) == sorted(ids)
    assert len(seen) == len(set(seen)) == 5

    everything = await client.files.list()
    assert len(everything.data) == 6 and not everything.has_more
    assert {f.id for f in everything.data} == {*ids, other.id}
    created = [f.created_at for f in everything.data]
    assert created == sorted(created, reverse=True)
    ascending = await client.files.list(order="asc")
    assert [f.id for f in ascending.data] == [f.id for f in reversed(everything.data)]

    raw = await client.files.with_raw_response.list(limit=2, purpose="batch")
    body = json.loads(raw.content)
    assert body["object"] == "list"
    assert body["first_id"] == body["data"][0]["id"] and body["last_id"] == body["data"][1]["id"]
    assert body["has_more"] is True

    with pytest.raises(openai.BadRequestError) as bad:
        await client.files.list(limit=0)
    assert bad.value.param == "limit"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("purpose", "needle"), [("batch_output", "reserved"), ("bogus", "one of")])
async def test_a_bad_purpose_is_refused(
    client: openai.AsyncOpenAI, api_env: dict[str, str], purpose: str, needle: str
) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        await client.files.create(file=("in.jsonl", chat_line("a")), purpose=purpose)  # type: ignore[arg-type]
    assert needle in bad.value.message
    assert bad.value.param == "purpose"  # type: ignore[attr-defined]
    # Nothing stored, not even a chunk of the refused file.
    assert await stored_messages(api_env["JETBATCH_NATS_URL"]) == 0


async def test_a_form_without_a_file_or_purpose_is_refused(api: str) -> None:
    headers = {"authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=api, headers=headers) as http:
        no_file = await http.post("/files", data={"purpose": "batch"}, files={"other": b"x"})
        no_purpose = await http.post("/files", files={"file": ("a.jsonl", b"{}")})
        not_multipart = await http.post("/files", json={"purpose": "batch"})
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    assert no_purpose.status_code == 400 and no_purpose.json()["error"]["param"] == "purpose"
    assert not_multipart.status_code == 400
    assert set(not_multipart.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "size", [1_500, 3 * 1024 * 1024], ids=["counted-while-streaming", "announced"]
)
async def test_an_oversize_upload_is_413_and_leaves_nothing_behind(
    api_env: dict[str, str], database_url: str, size: int
) -> None:
    env = {**api_env, "JETBATCH_MAX_FILE_BYTES": "1000"}
    async with running(config.load(env)) as base_url:
        client = openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0)
        with pytest.raises(openai.APIStatusError) as too_big:
            await client.files.create(file=("big.jsonl", b"x" * size), purpose="batch")
        assert too_big.value.status_code == 413
        assert too_big.value.body["type"] == "invalid_request_error"  # type: ignore[index]
        ok = await client.files.create(file=("small.jsonl", b"x" * 1000), purpose="batch")
    assert ok.bytes == 1000
    assert await objects(env) == {ok.id}
    assert await stored_messages(env["JETBATCH_NATS_URL"]) == 2  # its one chunk and its meta
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM files") == 1
    finally:
        await conn.close()


async def test_every_v1_route_needs_the_api_key(api: str) -> None:
    client = openai.AsyncOpenAI(base_url=api, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        await client.files.list()
    assert denied.value.code == "invalid_api_key"
    assert denied.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        await client.batches.retrieve("batch_x")
    async with httpx.AsyncClient() as http:
        bare = await http.get(f"{api}/models")
        health = await http.get(api.removesuffix("/v1") + "/healthz")
    assert bare.status_code == 401
    assert bare.json()["error"]["type"] == "invalid_request_error"
    assert bare.json()["error"]["code"] == "invalid_api_key"
    assert (health.status_code, health.json()) == (200, {"status": "ok"})


async def test_unknown_routes_and_methods_answer_in_openai_error_shape(api: str) -> None:
    headers = {"authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=api, headers=headers) as http:
        unknown = await http.get("/nope")
        wrong_method = await http.put("/files")
        bad_json = await http.post(
            "/batches", content=b"{nope", headers={"content-type": "application/json"}
        )
    assert unknown.status_code == 404
    assert wrong_method.status_code == 405
    assert bad_json.status_code == 400
    for response in (unknown, wrong_method, bad_json):
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"


async def test_an_unexpected_failure_is_a_500_in_openai_shape(api: str, database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("ALTER TABLE files RENAME TO files_gone")
    finally:
        await conn.close()
    async with httpx.AsyncClient(headers={"authorization": f"Bearer {API_KEY}"}) as http:
        response = await http.get(f"{api}/files")
    assert response.status_code == 500
    assert response.json() == {
        "error": {
            "message": "internal error",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }


async def test_a_full_store_answers_503_with_a_stable_code_and_keeps_nothing(
    client: openai.AsyncOpenAI, api_env: dict[str, str]
) -> None:
    nc = await bus.connect(api_env["JETBATCH_NATS_URL"], "test")
    try:
        js = nc.jetstream()
        files = await bus.files_bucket(js)
        config_ = (await js.stream_info(files.stream)).config
        await js.update_stream(dataclasses.replace(config_, max_bytes=300_000))  # an operator's cap
        with pytest.raises(openai.InternalServerError) as full:
            await client.files.create(file=("big.jsonl", b"x" * 600_000), purpose="batch")
        assert full.value.status_code == 503
        assert full.value.response.headers["retry-after"] == "5"
        assert full.value.body["code"] == "jetstream_storage_full"  # type: ignore[index]
        assert await stored_messages(api_env["JETBATCH_NATS_URL"]) == 0
        await js.update_stream(dataclasses.replace(config_, max_bytes=-1))
        ok = await client.files.create(file=("big.jsonl", b"x" * 600_000), purpose="batch")
        assert (await client.files.content(ok.id)).read() == b"x" * 600_000
    finally:
        await nc.close()
