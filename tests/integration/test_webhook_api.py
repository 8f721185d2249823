"""Webhook administration as an operator does it: endpoints through the official openai SDK
(`client.webhooks.*`, OpenAI's own webhook-endpoint API), the delivery log and dead letters through
`/v1/webhook_deliveries`, and the `jetbatch webhooks` CLI, against the api served by uvicorn, the
notifier, a real PostgreSQL, nats-server and an HTTP receiver on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats
import openai
import pytest
from aiohttp import web

from shared import bus
from tests.helpers import API_KEY, wait_until
from tests.webhook_helpers import (
    Notifier,
    Received,
    Receiver,
    insert_batch,
    notifier_env,
    publish,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def api_env(base_api_env: dict[str, str]) -> dict[str, str]:
    return {
        **base_api_env,
        "JETBATCH_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
    }


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


@pytest.fixture
async def notifier(database_url: str, nats_url: str, scratch_dir: Path) -> AsyncIterator[Notifier]:
    n = Notifier(notifier_env(database_url, nats_url, scratch_dir))
    yield n
    await n.stop()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    yield p
    await p.close()


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[nats.js.JetStreamContext]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await bus.ensure_streams(js)
    yield js
    await nc.close()


async def test_endpoints_are_managed_with_the_official_sdk(
    client: openai.AsyncOpenAI, receiver: Receiver
) -> None:
    created = await client.webhooks.create(
        url=receiver.url(), event_types=["batch.completed", "batch.failed"], name="ops"
    )
    assert created.id.startswith("we_") and created.object == "webhook_endpoint"
    assert created.signing_secret.startswith("whsec_")
    assert created.signing_secret_hint == f"whsec_...{created.signing_secret[-4:]}"
    assert (created.url, created.event_types, created.name) == (
        receiver.url(), ["batch.completed", "batch.failed"], "ops",
    )  # fmt: skip

    fetched = await client.webhooks.retrieve(created.id)
    assert fetched.id == created.id and not hasattr(fetched, "signing_secret")
    second = await client.webhooks.create(
        url=receiver.url("/2"), event_types=["batch.expired"], name="b"
    )
    page = await client.webhooks.list(limit=1)
    assert [e.id for e in page.data] == [second.id] and page.has_more
    assert [e.id async for e in client.webhooks.list()] == [second.id, created.id]

    updated = await client.webhooks.update(created.id, event_types=["batch.cancelled"], name="ops2")
    assert (updated.event_types, updated.name, updated.url) == (
        ["batch.cancelled"],
        "ops2",
        receiver.url(),
    )

    rotated = await client.webhooks.rotate_secret(created.id)
    assert rotated.signing_secret.startswith("whsec_")
    assert rotated.signing_secret != created.signing_secret

    deleted = await client.webhooks.delete(created.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (
        created.id,
        True,
        "webhook_endpoint.deleted",
    )
    with pytest.raises(openai.NotFoundError):
        await client.webhooks.retrieve(created.id)
    assert [e.id async for e in client.webhooks.list()] == [second.id]


@pytest.mark.parametrize(
    "url, needle",
    [
        ("http://169.254.169.254/latest/meta-data/", "refused: 169.254.169.254"),  # cloud metadata
        ("http://10.1.2.3/hook", "refused: 10.1.2.3"),
        ("http://192.168.0.10:8080/hook", "refused: 192.168.0.10"),
        ("http://[::1]:9000/hook", "refused: ::1"),  # only 127.0.0.0/8 is allowed here
        ("http://[::ffff:10.0.0.1]/hook", "refused: ::ffff:10.0.0.1"),
        ("http://0.0.0.0:80/hook", "refused: 0.0.0.0"),
        ("ftp://example.com/hook", "scheme must be http or https"),
        ("http://user:pw@127.0.0.1/hook", "credentials"),
        ("not a url", "scheme must be http or https"),
    ],
)
async def test_unsafe_endpoint_urls_are_refused(
    client: openai.AsyncOpenAI, url: str, needle: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await client.webhooks.create(url=url, event_types=["batch.completed"], name="x")
    assert needle in refused.value.message
    assert refused.value.body["param"] == "url"  # type: ignore[index]


async def test_bad_event_types_and_secrets_are_refused(
    client: openai.AsyncOpenAI, receiver: Receiver
) -> None:
    with pytest.raises(openai.BadRequestError, match="unsupported event type"):
        await client.webhooks.create(
            url=receiver.url(), event_types=["response.completed"], name="x"
        )
    with pytest.raises(openai.BadRequestError, match="at least one"):
        await client.webhooks.create(url=receiver.url(), event_types=[], name="x")
    with pytest.raises(openai.BadRequestError, match="whsec_"):
        await client.webhooks.create(
            url=receiver.url(), event_types=["batch.completed"], name="x",
            extra_body={"secret": "not-a-secret"},
        )  # fmt: skip


async def test_webhook_routes_need_the_api_key(api: str) -> None:
    async with httpx.AsyncClient(base_url=api) as anonymous:
        for method, path in (("GET", "/webhook_endpoints"), ("GET", "/webhook_deliveries")):
            response = await anonymous.request(method, path)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"


async def test_a_registered_endpoint_gets_batch_events_signed_with_its_secret(
    client: openai.AsyncOpenAI,
    notifier: Notifier,
    receiver: Receiver,
    pool: asyncpg.Pool,
    js: nats.js.JetStreamContext,
) -> None:
    endpoint = await client.webhooks.create(
        url=receiver.url(), event_types=["batch.completed"], name="x"
    )
    batch_id = await insert_batch(pool, {"k": "v"})
    await notifier.start()
    event = await publish(js, batch_id, metadata={"k": "v"})
    await receiver.wait_for(lambda got: len(got) == 1, 60)
    parsed = client.webhooks.unwrap(
        receiver.received[0].body, receiver.received[0].headers, secret=endpoint.signing_secret
    )
    assert (parsed.id, parsed.type, parsed.data.id) == (event.id, "batch.completed", batch_id)

    async def delivered() -> Any:
        batch = await client.batches.retrieve(batch_id)
        return batch if getattr(batch, "webhook_status", None) == "delivered" else None

    batch = await wait_until(delivered)
    assert (batch.webhook_attempts, batch.webhook_error) == (1, None)  # type: ignore[attr-defined]


async def test_after_a_rotation_that_keeps_the_old_secret_both_secrets_verify(
    client: openai.AsyncOpenAI,
    notifier: Notifier,
    receiver: Receiver,
    pool: asyncpg.Pool,
    js: nats.js.JetStreamContext,
) -> None:
    endpoint = await client.webhooks.create(
        url=receiver.url(), event_types=["batch.completed"], name="x"
    )
    rotated = await client.webhooks.rotate_secret(
        endpoint.id, keep_old_secret_active_for_24_hours=True
    )
    await notifier.start()
    await publish(js, await insert_batch(pool))
    await receiver.wait_for(lambda got: len(got) == 1, 60)
    got = receiver.received[0]
    assert len(got.headers["webhook-signature"].split()) == 2
    got.unwrap(endpoint.signing_secret)
    got.unwrap(rotated.signing_secret)


async def test_dead_letters_are_listed_inspected_and_resent(
    client: openai.AsyncOpenAI,
    http: httpx.AsyncClient,
    notifier: Notifier,
    receiver: Receiver,
    pool: asyncpg.Pool,
    js: nats.js.JetStreamContext,
) -> None:
    healthy = False

    async def maybe(_: Received, __: web.Request) -> web.StreamResponse:
        return web.Response(status=200 if healthy else 500, text="down for maintenance")

    receiver.respond = maybe
    metadata = {"webhook_url": receiver.url()}
    batch_id = await insert_batch(pool, metadata)
    await notifier.start()
    event = await publish(js, batch_id, metadata=metadata)

    async def dead() -> list[dict[str, Any]]:
        response = await http.get("/webhook_deliveries", params={"status": "dead"})
        assert response.status_code == 200
        return response.json()["data"]

    [letter] = await wait_until(dead)
    assert (letter["object"], letter["event_id"], letter["batch_id"]) == (
        "webhook_delivery",
        event.id,
        batch_id,
    )
    assert (letter["status"], letter["attempts"], letter["endpoint_id"]) == ("dead", 4, None)
    assert letter["last_error"].startswith("gave up after 4 attempts; last: HTTP 500: down for")
    batch = await client.batches.retrieve(batch_id)
    assert (batch.webhook_status, batch.webhook_attempts) == ("failed", 4)  # type: ignore[attr-defined]
    assert "HTTP 500" in batch.webhook_error  # type: ignore[attr-defined]

    detail = (await http.get(f"/webhook_deliveries/{letter['id']}")).json()
    assert [(a["attempt"], a["status_code"]) for a in detail["attempt_log"]] == [
        (1, 500), (2, 500), (3, 500), (4, 500),
    ]  # fmt: skip
    assert all(a["latency_ms"] is not None for a in detail["attempt_log"])

    healthy = True
    resent = await http.post(f"/webhook_deliveries/{letter['id']}/resend")
    assert resent.status_code == 200 and resent.json()["status"] == "pending"
    again = await http.post(f"/webhook_deliveries/{letter['id']}/resend")
    assert again.status_code in (200, 409)  # 409 while still pending

    async def delivered() -> bool:
        response = await http.get(f"/webhook_deliveries/{letter['id']}")
        return response.json()["status"] == "delivered"

    await wait_until(delivered)
    assert [r.webhook_id for r in receiver.received] == [event.id] * 5
    batch = await client.batches.retrieve(batch_id)
    assert (batch.webhook_status, batch.webhook_attempts) == ("delivered", 5)  # type: ignore[attr-defined]
    assert (await http.get("/webhook_deliveries", params={"status": "dead"})).json()["data"] == []
    listed = (await http.get("/webhook_deliveries", params={"batch_id": batch_id})).json()["data"]
    assert [d["id"] for d in listed] == [letter["id"]]
    missing = await http.post("/webhook_deliveries/whd_nope/resend")
    assert missing.status_code == 404


async def test_removing_an_endpoint_cancels_its_pending_deliveries(
    client: openai.AsyncOpenAI,
    http: httpx.AsyncClient,
    notifier: Notifier,
    receiver: Receiver,
    pool: asyncpg.Pool,
    js: nats.js.JetStreamContext,
) -> None:
    async def down(_: Received, __: web.Request) -> web.StreamResponse:
        return web.Response(status=503)

    receiver.respond = down
    endpoint = await client.webhooks.create(
        url=receiver.url(), event_types=["batch.completed"], name="x"
    )
    batch_id = await insert_batch(pool)
    await notifier.start(JETBATCH_WEBHOOK_MAX_ATTEMPTS="1000", JETBATCH_WEBHOOK_BACKOFF_MAX_S="0.5")
    await publish(js, batch_id)
    await receiver.wait_for(lambda got: len(got) >= 2, 60)
    await client.webhooks.delete(endpoint.id)
    [cancelled] = (await http.get("/webhook_deliveries", params={"batch_id": batch_id})).json()[
        "data"
    ]
    assert (cancelled["status"], cancelled["last_error"]) == ("cancelled", "endpoint removed")
    seen = len(receiver.received)
    await asyncio.sleep(1.5)
    assert len(receiver.received) <= seen + 1  # at most the attempt that was in flight
    batch = await client.batches.retrieve(batch_id)
    assert batch.webhook_status is None  # type: ignore[attr-defined]


async def cli(api: str, *args: str) -> tuple[int, str]:
    env = {**os.environ, "JETBATCH_API_URL": api, "JETBATCH_API_KEY": API_KEY}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "webhooks", *args,
        cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def test_the_cli_adds_lists_removes_endpoints_and_resends_dead_letters(
    api: str,
    client: openai.AsyncOpenAI,
    notifier: Notifier,
    receiver: Receiver,
    pool: asyncpg.Pool,
    js: nats.js.JetStreamContext,
) -> None:
    code, out = await cli(api, "add", receiver.url(), "--event", "batch.failed", "--name", "cli")
    assert code == 0, out
    endpoint_id, url, events = out.splitlines()[0].split()
    assert (url, events) == (receiver.url(), "batch.failed")
    secret = out.splitlines()[1].rsplit(" ", 1)[1]
    assert secret.startswith("whsec_")

    code, out = await cli(api, "list")
    assert code == 0 and endpoint_id in out and "batch.failed" in out
    code, out = await cli(api, "--json", "list")
    assert [e["id"] for e in json.loads(out)] == [endpoint_id]

    code, out = await cli(api, "add", "http://10.0.0.1/x")
    assert code == 1 and "refused: 10.0.0.1" in out

    healthy = False

    async def maybe(_: Received, __: web.Request) -> web.StreamResponse:
        return web.Response(status=200 if healthy else 500)

    receiver.respond = maybe
    batch_id = await insert_batch(pool)
    await notifier.start()
    event = await publish(js, batch_id, "batch.failed")

    async def listed_dead() -> str | None:
        code, out = await cli(api, "dead")
        return out if code == 0 and batch_id in out else None

    out = await wait_until(listed_dead, timeout_s=90)
    assert "gave up after 4 attempts" in out
    healthy = True
    code, out = await cli(api, "resend", "--all-dead")
    assert code == 0 and out.startswith("re-sending whd_"), out
    await receiver.wait_for(lambda got: len(got) == 5, 60)  # 4 failed attempts, then the re-send
    assert receiver.received[-1].unwrap(secret).id == event.id

    code, out = await cli(api, "remove", endpoint_id)
    assert code == 0 and out.strip() == f"removed {endpoint_id}"
    code, out = await cli(api, "list")
    assert endpoint_id not in out
