"""The api's `/v1/models` (live workers from heartbeats in KV) and synchronous inference over NATS
request/reply, with fake workers answering on the interactive subject; and the api process's
start-up and clean exit on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import openai
import pytest
from nats.aio.msg import Msg

from schemas.messages import InteractiveRequest, ResultMessage, WorkerHeartbeat
from services.api.service import running
from shared import bus, config
from tests.helpers import API_KEY, CHAT_MODEL, EMBED_MODEL, wait_until

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def api_env(base_api_env: dict[str, str]) -> dict[str, str]:
    return {
        **base_api_env,
        "JETBATCH_HEARTBEAT_INTERVAL_S": "5",
    }


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[nats.NATS]:
    conn = await nats.connect(nats_url)
    yield conn
    await conn.close()


def heartbeat(worker_id: str, model: str, seen_at: float) -> bytes:
    return msgspec.json.encode(
        WorkerHeartbeat(
            worker_id=worker_id,
            host="test",
            pid=1,
            model=model,
            endpoints=["/v1/chat/completions"],
            engine="instant",
            started_at=0,
            seen_at=int(seen_at),
        )
    )


def live_workers(models: Any) -> dict[str, int]:
    return {m.id: (m.model_extra or {})["live_workers"] for m in models}


async def test_models_count_the_workers_with_a_recent_heartbeat(
    client: openai.AsyncOpenAI, nc: nats.NATS
) -> None:
    listed = await client.models.list()
    assert live_workers(listed.data) == {CHAT_MODEL: 0, EMBED_MODEL: 0}  # empty bucket
    first = listed.data[0]
    assert (first.object, first.owned_by) == ("model", "jetbatch")
    assert (first.model_extra or {})["endpoints"] == ["/v1/chat/completions", "/v1/completions"]

    kv = await bus.workers_kv(nc.jetstream())
    now = time.time()
    await kv.put("w1", heartbeat("w1", CHAT_MODEL, now))
    await kv.put("w2", heartbeat("w2", CHAT_MODEL, now - 2))
    await kv.put("w3", heartbeat("w3", CHAT_MODEL, now - 60))  # stale: 3 intervals are 15 s
    await kv.put("w4", heartbeat("w4", EMBED_MODEL, now))
    await kv.put("w5", b"not a heartbeat")
    await kv.put("w6", heartbeat("w6", CHAT_MODEL, now))
    await kv.delete("w6")  # a worker that left

    assert live_workers((await client.models.list()).data) == {CHAT_MODEL: 2, EMBED_MODEL: 1}
    one = await client.models.retrieve(EMBED_MODEL)
    assert one.id == EMBED_MODEL and (one.model_extra or {})["live_workers"] == 1
    with pytest.raises(openai.NotFoundError) as missing:
        await client.models.retrieve("gpt-9")
    assert missing.value.code == "model_not_found"


Handler = Callable[[InteractiveRequest], Awaitable[ResultMessage | None]]


async def fake_worker(nc: nats.NATS, model: str, handle: Handler) -> Any:
    """A worker in the model's queue group that answers with what `handle` returns."""

    async def on_request(msg: Msg) -> None:
        request = msgspec.json.decode(msg.data, type=InteractiveRequest)
        result = await handle(request)
        if result is not None:
            await msg.respond(msgspec.json.encode(result))

    sub = await nc.subscribe(InteractiveRequest.subject_for(model), queue="workers", cb=on_request)
    await nc.flush()
    return sub


def completion(request: InteractiveRequest, text: str) -> bytes:
    return json.dumps(
        {
            "id": f"chatcmpl-{request.request_id}",
            "object": "chat.completion",
            "created": 1,
            "model": request.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }
    ).encode()


async def test_a_sync_chat_completion_is_answered_by_a_worker(
    client: openai.AsyncOpenAI, nc: nats.NATS
) -> None:
    seen: list[InteractiveRequest] = []

    async def answer(request: InteractiveRequest) -> ResultMessage:
        seen.append(request)
        body = json.loads(bytes(request.body))
        text = f"echo: {body['messages'][0]['content']} t={body['temperature']}"
        return ResultMessage(
            batch_id="",
            line=0,
            custom_id="",
            request_id=request.request_id,
            status_code=200,
            response_body=msgspec.Raw(completion(request, text)),
        )

    await fake_worker(nc, CHAT_MODEL, answer)
    reply = await client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "ping"}], temperature=0.25
    )
    assert reply.choices[0].message.content == "echo: ping t=0.25"
    assert reply.usage is not None and reply.usage.total_tokens == 5
    [request] = seen
    assert request.request_id.startswith("req_")
    assert (request.endpoint, request.model) == ("/v1/chat/completions", CHAT_MODEL)


async def test_a_worker_error_reaches_the_client_as_its_openai_error(
    client: openai.AsyncOpenAI, nc: nats.NATS
) -> None:
    async def refuse(request: InteractiveRequest) -> ResultMessage:
        body = json.loads(bytes(request.body))
        if body.get("max_tokens") == 1:  # an engine error object, passed through as is
            error = {
                "error": {
                    "message": "too long",
                    "type": "BadRequestError",
                    "param": None,
                    "code": 400,
                }
            }
            return ResultMessage(
                batch_id="",
                line=0,
                custom_id="",
                request_id=request.request_id,
                status_code=400,
                response_body=msgspec.Raw(json.dumps(error).encode()),
            )
        return ResultMessage(  # no body: the api builds the error object
            batch_id="",
            line=0,
            custom_id="",
            request_id=request.request_id,
            status_code=500,
            error_code="engine_error",
            error_message="the engine died",
        )

    await fake_worker(nc, CHAT_MODEL, refuse)
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1
        )
    assert "too long" in bad.value.message
    with pytest.raises(openai.InternalServerError) as broken:
        await client.completions.create(model=CHAT_MODEL, prompt="x")
    assert broken.value.status_code == 500
    assert broken.value.code == "engine_error"
    assert "the engine died" in broken.value.message


async def test_embeddings_go_to_the_embedding_model(
    client: openai.AsyncOpenAI, nc: nats.NATS
) -> None:
    async def embed(request: InteractiveRequest) -> ResultMessage:
        assert request.endpoint == "/v1/embeddings"
        body = {
            "object": "list",
            "model": request.model,
            "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.5]}],
            "usage": {"prompt_tokens": 1, "total_tokens": 1},
        }
        return ResultMessage(
            batch_id="",
            line=0,
            custom_id="",
            request_id=request.request_id,
            status_code=200,
            response_body=msgspec.Raw(json.dumps(body).encode()),
        )

    await fake_worker(nc, EMBED_MODEL, embed)
    reply = await client.embeddings.create(model=EMBED_MODEL, input="hi", encoding_format="float")
    assert reply.data[0].embedding == [0.5, -0.5]


async def test_sync_requests_without_a_worker_or_with_bad_bodies_are_refused(
    client: openai.AsyncOpenAI, api: str
) -> None:
    messages: Any = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.InternalServerError) as unavailable:
        await client.chat.completions.create(model=CHAT_MODEL, messages=messages)
    assert unavailable.value.status_code == 503
    assert unavailable.value.type == "service_unavailable"  # type: ignore[attr-defined]
    assert f"no live worker for model {CHAT_MODEL}" in unavailable.value.message

    with pytest.raises(openai.NotFoundError) as unknown:
        await client.chat.completions.create(model="gpt-9", messages=messages)
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as wrong_endpoint:
        await client.embeddings.create(model=CHAT_MODEL, input="x")
    assert "does not serve /v1/embeddings" in wrong_endpoint.value.message
    with pytest.raises(openai.BadRequestError) as streaming:
        await client.chat.completions.create(model=CHAT_MODEL, messages=messages, stream=True)
    assert "streaming is not supported" in streaming.value.message

    headers = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    async with httpx.AsyncClient(base_url=api, headers=headers) as http:
        for body in (b"{nope", b"[1]", b'{"messages": []}', b'{"model": 3}'):
            refused = await http.post("/chat/completions", content=body)
            assert refused.status_code == 400, body
            assert refused.json()["error"]["param"] == "model"


async def test_a_worker_that_never_answers_is_a_504(api_env: dict[str, str], nc: nats.NATS) -> None:
    async def ignore(_: InteractiveRequest) -> None:
        return None

    await fake_worker(nc, CHAT_MODEL, ignore)
    async with running(config.load({**api_env, "JETBATCH_SYNC_TIMEOUT_S": "0.3"})) as base_url:
        client = openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0)
        with pytest.raises(openai.APIStatusError) as timeout:
            await client.chat.completions.create(
                model=CHAT_MODEL, messages=[{"role": "user", "content": "x"}]
            )
    assert timeout.value.status_code == 504


async def test_without_an_api_key_no_auth_is_asked(api_env: dict[str, str]) -> None:
    env = {k: v for k, v in api_env.items() if k != "JETBATCH_API_KEY"}
    async with running(config.load(env)) as base_url, httpx.AsyncClient() as http:
        response = await http.get(f"{base_url}/models")
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == [CHAT_MODEL, EMBED_MODEL]


async def test_the_api_process_serves_and_exits_cleanly_on_sigterm(api_env: dict[str, str]) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.api",
        cwd=REPO,
        env={**os.environ, **api_env, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    health = f"http://127.0.0.1:{api_env['JETBATCH_API_PORT']}/healthz"
    try:
        async with httpx.AsyncClient() as http:

            async def healthy() -> bool:
                assert proc.returncode is None, "the api exited during start-up"
                try:
                    return (await http.get(health)).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(healthy, "the api to be healthy", timeout_s=30, interval_s=0.1)
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, output.decode()
    assert b"SIGTERM: shutting down" in output


async def test_the_api_refuses_to_start_without_its_database(api_env: dict[str, str]) -> None:
    env = {k: v for k, v in {**os.environ, **api_env}.items() if k != "JETBATCH_DATABASE_URL"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.api",
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert b"JETBATCH_DATABASE_URL is not set" in output
