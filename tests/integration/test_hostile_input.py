"""Hostile input costs nothing (README: Hostile input): each test sends one kind of bad input to
the real api (real PostgreSQL and nats-server) and checks the clear error it gets, in OpenAI's
shape, and that nothing is left stuck or grown."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import msgspec
import nats
import pytest

from schemas.messages import BatchCommand, InteractiveRequest, ResultMessage
from services.api import http_limits, ingest
from tests.helpers import API_KEY, CHAT, CHAT_MODEL, EMBED_MODEL, chat_body, chat_line, wait_until

AUTH = {"authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def api_env(base_api_env: dict[str, str]) -> dict[str, str]:
    return {
        **base_api_env,
        "JETBATCH_MODELS": f"{CHAT_MODEL},{EMBED_MODEL}",
        "JETBATCH_MAX_BATCH_LINES": "200",
        "JETBATCH_MAX_FILE_BYTES": str(4 * 1024 * 1024),
        "JETBATCH_MAX_SYNC_REQUESTS": "2",
        "JETBATCH_MAX_SYNC_REQUESTS_PER_KEY": "1",
        "JETBATCH_VALIDATION_TIMEOUT_S": "30",
    }


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text[:500]
    error: dict[str, Any] = response.json()["error"]
    assert isinstance(error["message"], str) and error["type"]
    return error


async def upload(http: httpx.AsyncClient, content: bytes) -> dict[str, Any]:
    files = {"file": ("in.jsonl", content)}
    response = await http.post("/files", files=files, data={"purpose": "batch"})
    assert response.status_code == 200, response.text[:500]
    return dict(response.json())


async def create_batch(http: httpx.AsyncClient, file_id: str) -> dict[str, Any]:
    body = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}
    response = await http.post("/batches", json=body)
    assert response.status_code == 200, response.text[:500]
    return dict(response.json())


async def settled(http: httpx.AsyncClient, batch_id: str) -> dict[str, Any]:
    async def left_validating() -> dict[str, Any] | None:
        batch = (await http.get(f"/batches/{batch_id}")).json()
        return batch if batch["status"] != "validating" else None

    return await wait_until(left_validating, f"batch {batch_id} to leave validating")


# Input file lines ------------------------------------------------------------------------------


async def test_deep_long_and_strange_lines_fail_the_batch_naming_each_line(
    http: httpx.AsyncClient,
) -> None:
    strange = [
        chat_line("ok-1"),
        b'{"custom_id": "deep", "method": "POST", "url": "/v1/chat/completions", "body": '
        + b"[" * 50_000
        + b"]" * 50_000
        + b"}",
        b"[" * 200_000,
        json.dumps(
            {"custom_id": "url", "method": "POST", "url": "u" * 1_000_000, "body": chat_body("hi")}
        ).encode(),  # fmt: skip
        json.dumps(
            {"custom_id": "method", "method": "G" * 100_000, "url": CHAT, "body": chat_body("hi")}
        ).encode(),  # fmt: skip
        b"\xff\xfe not utf-8",
        json.dumps(
            {"custom_id": "nul\u0000", "method": "POST", "url": CHAT, "body": chat_body("hi")}
        ).encode(),  # fmt: skip
    ]
    file = await upload(http, b"\n".join(line.rstrip(b"\n") for line in strange))
    batch = await settled(http, (await create_batch(http, file["id"]))["id"])
    assert batch["status"] == "failed"
    by_line = {e["line"]: e for e in batch["errors"]["data"]}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7]
    assert by_line[2]["code"] == by_line[3]["code"] == "invalid_json_line"
    assert by_line[4]["code"] == "mismatched_url"
    assert by_line[5]["code"] == "invalid_method"
    assert by_line[6]["code"] == "invalid_utf8"
    assert by_line[7]["code"] == "invalid_custom_id"
    # What the lines echo is cut: the batch object stays small.
    assert len(json.dumps(batch)) < 8 * 1024


async def test_a_model_list_stays_small_whatever_the_file_names(http: httpx.AsyncClient) -> None:
    lines = [
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": CHAT,
                "body": {"model": f"{i}" + "m" * 100_000},
            }
        ).encode()  # fmt: skip
        for i in range(20)
    ]
    file = await upload(http, b"\n".join(lines))
    body = {"input_file_id": file["id"], "endpoint": CHAT, "completion_window": "24h"}
    refused = await http.post("/batches", json=body)
    error = error_of(refused, 400)
    assert error["code"] == "model_not_found"
    assert len(refused.content) < 2048
    listed = await http.get("/files")
    assert len(listed.content) < 4096


async def test_a_batch_whose_validation_never_completes_fails_when_re_driven_past_the_limit(
    http: httpx.AsyncClient, database_url: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def crashes(*_: Any) -> Any:
        raise RuntimeError("validation of the file failed (exit -9)")

    monkeypatch.setattr(ingest, "check_input", crashes)
    file = await upload(http, chat_line("a"))
    batch = await create_batch(http, file["id"])
    await asyncio.sleep(0.5)
    assert (await http.get(f"/batches/{batch['id']}")).json()["status"] == "validating"
    conn = await asyncpg.connect(database_url)
    try:  # as if it had been re-driven in vain for longer than JETBATCH_VALIDATION_TIMEOUT_S
        await conn.execute(
            "UPDATE batches SET created_at = created_at - 60 WHERE id = $1", batch["id"]
        )
    finally:
        await conn.close()
    nc = await nats.connect(nats_url)
    try:
        command = BatchCommand(batch_id=batch["id"], action="redrive", issued_at=int(time.time()))
        await nc.jetstream().publish(
            BatchCommand.subject_for("redrive"), msgspec.json.encode(command)
        )
    finally:
        await nc.close()
    failed = await settled(http, batch["id"])
    assert failed["status"] == "failed"
    assert [e["code"] for e in failed["errors"]["data"]] == ["validation_timeout"]


async def test_cancelling_a_batch_whose_validation_crashes_still_ends_it(
    http: httpx.AsyncClient, database_url: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def crashes(*_: Any) -> Any:
        raise RuntimeError("validation of the file failed (exit -9)")

    monkeypatch.setattr(ingest, "check_input", crashes)
    file = await upload(http, chat_line("a"))
    batch = await create_batch(http, file["id"])
    cancelled = await http.post(f"/batches/{batch['id']}/cancel")
    assert cancelled.json()["status"] == "cancelling"
    nc = await nats.connect(nats_url)
    try:
        command = BatchCommand(batch_id=batch["id"], action="close_out", issued_at=int(time.time()))
        await nc.jetstream().publish(
            BatchCommand.subject_for("close_out"), msgspec.json.encode(command)
        )
    finally:
        await nc.close()
    conn = await asyncpg.connect(database_url)
    try:
        sql = "SELECT closed_out_at FROM batches WHERE id = $1"

        async def closed_out() -> int | None:
            return await conn.fetchval(sql, batch["id"])

        await wait_until(closed_out, "the cancelled batch to be closed out")
    finally:
        await conn.close()
    errors = (await http.get(f"/batches/{batch['id']}")).json()["errors"]["data"]
    assert [e["code"] for e in errors] == ["validation_failed"]


# Synchronous requests --------------------------------------------------------------------------


class HeldWorker:
    """Answers synchronous requests for CHAT_MODEL only once released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.received = 0

    async def handle(self, msg: Any) -> None:
        self.received += 1
        await self.release.wait()
        request = msgspec.json.decode(msg.data, type=InteractiveRequest)
        result = ResultMessage.failure(
            batch_id="", line=0, custom_id="", request_id=request.request_id, status_code=400,
            code="held", message="released", worker_id="test",
        )  # fmt: skip
        await msg.respond(msgspec.json.encode(result))


@pytest.fixture
async def held(nats_url: str) -> AsyncIterator[HeldWorker]:
    worker = HeldWorker()
    nc = await nats.connect(nats_url)
    await nc.subscribe(InteractiveRequest.subject_for(CHAT_MODEL), cb=worker.handle)
    await nc.flush()
    yield worker
    worker.release.set()
    await nc.close()


async def test_synchronous_requests_past_the_per_key_cap_get_429_with_retry_after(
    http: httpx.AsyncClient, held: HeldWorker
) -> None:
    body = chat_body("hi")
    first = asyncio.create_task(http.post("/chat/completions", json=body))
    await wait_until(lambda: held.received == 1 or None, "the first request to reach the worker")
    second = await http.post("/chat/completions", json=body)
    error = error_of(second, 429)
    assert error["code"] == "too_many_concurrent_requests"
    assert second.headers["retry-after"] == "1"
    held.release.set()
    assert error_of(await first, 400)["code"] == "held"
    # The slot is free again.
    assert error_of(await http.post("/chat/completions", json=body), 400)["code"] == "held"


async def test_a_client_that_goes_away_frees_its_slot(
    api: str, http: httpx.AsyncClient, held: HeldWorker
) -> None:
    body = chat_body("hi")
    async with httpx.AsyncClient(base_url=api, headers=AUTH, timeout=0.5) as impatient:
        with pytest.raises(httpx.TimeoutException):
            await impatient.post("/chat/completions", json=body)
    held.release.set()

    async def served() -> bool | None:
        response = await http.post("/chat/completions", json=body)
        return response.status_code == 400 or None

    await wait_until(served, "the slot of the client that left to be free", timeout_s=5)


# Slow and endless requests ---------------------------------------------------------------------


def _raw(port: int, *pieces: bytes, pause_s: float = 0.0) -> bytes:
    """Send `pieces` on a new connection and read the answer (not half-closing: uvicorn takes
    that for a client gone)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for piece in pieces:
            s.sendall(piece)
            time.sleep(pause_s)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def _status_and_error(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


async def test_slow_headers_time_out_with_408(
    api: str, api_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_limits, "HEAD_TIMEOUT_S", 0.5)
    port = int(api_env["JETBATCH_API_PORT"])
    raw = await asyncio.to_thread(_raw, port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
    status, error = _status_and_error(raw)
    assert status == 408 and error["code"] == "request_timeout"


async def test_endless_headers_get_431(api: str, api_env: dict[str, str]) -> None:
    port = int(api_env["JETBATCH_API_PORT"])
    endless = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * 200_000
    raw = await asyncio.to_thread(_raw, port, endless)
    status, error = _status_and_error(raw)
    assert status == 431 and error["code"] == "headers_too_large"


async def test_a_stalled_body_times_out_with_408(
    api: str, api_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_limits, "BODY_IDLE_TIMEOUT_S", 0.5)
    port = int(api_env["JETBATCH_API_PORT"])
    head = (
        b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"input"
    )  # fmt: skip
    raw = await asyncio.to_thread(_raw, port, head)
    status, error = _status_and_error(raw)
    assert status == 408 and error["code"] == "request_timeout"


async def test_an_upload_counts_every_byte_not_only_the_files(
    api: str, api_env: dict[str, str]
) -> None:
    port = int(api_env["JETBATCH_API_PORT"])
    # A small valid form, then an epilogue larger than the file limit plus the form's allowance,
    # outside any part; chunked, so no Content-Length announces it.
    form = (
        b'--b0\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--b0\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
        + chat_line("a") + b"\r\n--b0--\r\n"
    )  # fmt: skip
    body = form + b"x" * (int(api_env["JETBATCH_MAX_FILE_BYTES"]) + 1024 * 1024)
    head = (
        b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode()
        + b"\r\nContent-Type: multipart/form-data; boundary=b0\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )  # fmt: skip
    chunk = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    raw = await asyncio.to_thread(_raw, port, head + chunk)
    status, error = _status_and_error(raw)
    assert status == 413 and error["param"] == "file"


# NUL and invalid text ---------------------------------------------------------------------------


async def test_nul_or_invalid_text_anywhere_is_a_400(http: httpx.AsyncClient) -> None:
    file = await upload(http, chat_line("a"))
    refusals = {
        "metadata": await http.post(
            "/batches",
            json={
                "input_file_id": file["id"],
                "endpoint": CHAT,
                "completion_window": "24h",
                "metadata": {"k": "v\u0000"},
            },
        ),  # fmt: skip
        "batch id": await http.get("/batches/batch_%00"),
        "file id": await http.get("/files/file-%ff%fe"),
        "query": await http.get("/files?after=file-%00"),
        "file name": await http.post(
            "/files",
            content=b'--b\r\nContent-Disposition: form-data; name="file"; filename="in\x00.jsonl"'
            b"\r\n\r\n" + chat_line("a") + b"\r\n--b--\r\n",
            headers={"content-type": "multipart/form-data; boundary=b"},
        ),
        "form field": await http.post(
            "/files",
            content=b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbat\xffch'
            b"\r\n--b--\r\n",
            headers={"content-type": "multipart/form-data; boundary=b"},
        ),
        "input_file_id": await http.post(
            "/batches",
            json={"input_file_id": "file-\u0000", "endpoint": CHAT, "completion_window": "24h"},
        ),  # fmt: skip
    }
    for what, response in refusals.items():
        assert response.status_code == 400, f"{what}: {response.status_code} {response.text[:300]}"
        assert response.json()["error"]["message"], what
