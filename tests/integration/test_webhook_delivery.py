"""The webhook notifier against a real nats-server, a real PostgreSQL and a real HTTP receiver on
loopback: events published on EVENTS come out as Standard-Webhooks-signed POSTs that the official
openai SDK verifies; failures are retried, recorded, dead-lettered and re-sent; unsafe
destinations are refused; a slow receiver stalls no one else."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import msgspec
import nats
import openai
import pytest
from aiohttp import web

from schemas.messages import BatchEvent
from shared import bus
from shared.domain.webhooks import new_secret
from tests.helpers import wait_until
from tests.webhook_helpers import (
    SECRET,
    Notifier,
    Received,
    Receiver,
    attempts,
    batch_object,
    deliveries,
    insert_batch,
    notifier_env,
    publish,
    register,
    settled,
)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


@pytest.fixture
def env(database_url: str, nats_url: str, scratch_dir: Path) -> dict[str, str]:
    return notifier_env(database_url, nats_url, scratch_dir)


@pytest.fixture
async def notifier(env: dict[str, str]) -> AsyncIterator[Notifier]:
    n = Notifier(env)
    yield n
    await n.stop()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    yield p
    await p.close()


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[nats.js.JetStreamContext]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await bus.ensure_streams(js)
    yield js
    await nc.close()


# Signing and shape ---------------------------------------------------------------------------


async def test_batch_webhook_url_gets_an_event_the_openai_sdk_verifies(
    notifier: Notifier, receiver: Receiver, pool: asyncpg.Pool, js: nats.js.JetStreamContext
) -> None:
    metadata = {"webhook_url": receiver.url(), "customer": "acme"}
    batch_id = await insert_batch(pool, metadata)
    await notifier.start()
    event = await publish(js, batch_id, metadata=metadata)

    await receiver.wait_for(lambda got: len(got) >= 1, 60)
    got = receiver.received[0]
    unwrapped = got.unwrap(SECRET)
    assert type(unwrapped).__name__ == "BatchCompletedWebhookEvent"
    assert (unwrapped.id, unwrapped.type, unwrapped.data.id) == (
        event.id,
        "batch.completed",
        batch_id,
    )
    assert json.loads(got.body) == {
        "id": event.id,
        "object": "event",
        "type": "batch.completed",
        "created_at": 1700000100,
        "data": {"id": batch_id, "metadata": metadata},
    }
    assert got.webhook_id == event.id
    assert got.headers["content-type"] == "application/json"
    with pytest.raises(openai.InvalidWebhookSignatureError):
        got.unwrap(new_secret())  # another secret does not verify

    [row] = await settled(pool, batch_id)
    assert (row["status"], row["attempts"], row["last_status_code"]) == ("delivered", 1, 200)
    [attempt] = await attempts(pool, row["id"])
    assert attempt["status_code"] == 200 and attempt["error"] is None
    assert attempt["latency_ms"] is not None and attempt["finished_at"] is not None
    batch = await batch_object(pool, batch_id)
    assert (batch.webhook_status, batch.webhook_attempts, batch.webhook_error) == (
        "delivered", 1, None,
    )  # fmt: skip
    assert len(receiver.received) == 1


async def test_an_event_on_the_subject_of_a_version_before_projects_is_still_delivered(
    notifier: Notifier, receiver: Receiver, pool: asyncpg.Pool, js: nats.js.JetStreamContext
) -> None:
    metadata = {"webhook_url": receiver.url()}
    batch_id = await insert_batch(pool, metadata)
    await notifier.start()
    event = await publish(js, batch_id, metadata=metadata, legacy=True)
    await receiver.wait_for(lambda got: len(got) >= 1, 60)
    assert receiver.received[0].unwrap(SECRET).id == event.id


async def test_registered_endpoints_get_the_event_types_they_asked_for_with_their_own_secret(
    notifier: Notifier, receiver: Receiver, pool: asyncpg.Pool, js: nats.js.JetStreamContext
) -> None:
    all_secret, failed_secret = new_secret(), new_secret()
    await register(pool, receiver.url("/all"), ["batch.completed", "batch.failed"], all_secret)
    await register(pool, receiver.url("/failed-only"), ["batch.failed"], failed_secret)
    batch_id = await insert_batch(pool, {"team": "search"})  # no webhook_url of its own
    await notifier.start()
    # Published without metadata (as another publisher might): it is read from the batch row.
    event = await publish(js, batch_id, "batch.completed")

    await settled(pool, batch_id, count=1)
    [got] = receiver.received
    assert got.path == "/all"
    parsed = got.unwrap(all_secret)
    assert parsed.id == event.id
    assert json.loads(got.body)["data"] == {"id": batch_id, "metadata": {"team": "search"}}

    failed = await publish(js, batch_id, "batch.failed")
    await settled(pool, batch_id, count=3)
    by_path = {r.path: r for r in receiver.received if r.webhook_id == failed.id}
    assert set(by_path) == {"/all", "/failed-only"}
    by_path["/failed-only"].unwrap(failed_secret)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        by_path["/failed-only"].unwrap(all_secret)


async def test_a_redelivered_event_is_scheduled_once(
    notifier: Notifier, receiver: Receiver, pool: asyncpg.Pool, js: nats.js.JetStreamContext
) -> None:
    batch_id = await insert_batch(pool)
    metadata = {"webhook_url": receiver.url()}
    event = await publish(js, batch_id, metadata=metadata)
    # The same event again, past the stream's duplicate window (another id on the bus, same
    # event id inside): the (event_id, destination) key keeps it to one delivery.
    await js.publish(
        BatchEvent.subject_for(event.type), msgspec.json.encode(event), headers={"Nats-Msg-Id": "x"}
    )
    await notifier.start()
    await settled(pool, batch_id)
    await asyncio.sleep(0.5)
    assert [r.webhook_id for r in receiver.received] == [event.id]
    assert len(await deliveries(pool, batch_id)) == 1


# Retries, dead letters, re-sends --------------------------------------------------------------


async def test_failures_are_retried_with_the_same_webhook_id_and_every_attempt_recorded(
    notifier: Notifier, receiver: Receiver, pool: asyncpg.Pool, js: nats.js.JetStreamContext
) -> None:
    answers = iter([500, 503, 200])

    async def flaky(_: Received, __: web.Request) -> web.StreamResponse:
        return web.Response(status=next(answers), text="try later")

    receiver.respond = flaky
    metadata = {"webhook_url": receiver.url()}
    batch_id = await insert_batch(pool, metadata)
    await notifier.start()
    event = await publish(js, batch_id, metadata=metadata)

    [row] = await settled(pool, batch_id)
    assert row["status"] == "delivered"
    assert [r.webhook_id for r in receiver.received] == [event.id] * 3
    for got in receiver.received:
        got.unwrap(SECRET)  # each attempt is signed afresh
    log = await attempts(pool, row["id"])
    assert [(a["attempt"], a["status_code"]) for a in log] == [(1, 500), (2, 503), (3, 200)]
    assert log[0]["error"] == "HTTP 500: try later"
    assert all(a["latency_ms"] is not None for a in log)
    batch = await batch_object(pool, batch_id)
    assert (batch.webhook_status, batch.webhook_attempts) == ("delivered", 3)


async def test_exhausted_deliveries_become_dead_letters_that_can_be_resent(
    notifier: Notifier, receiver: Receiver, pool: asyncpg.Pool, js: nats.js.JetStreamContext
) -> None:
    healthy = False

    async def down(_: Received, __: web.Request) -> web.StreamResponse:
        return web.Response(status=200 if healthy else 502, text="bad gateway")

    receiver.respond = down
    metadata = {"webhook_url": receiver.url()}
    batch_id = await insert_batch(pool, metadata)
    await notifier.start()
    await publish(js, batch_id, metadata=metadata)

    [row] = await settled(pool, batch_id)
    assert row["status"] == "dead" and row["attempts"] == 4  # JETBATCH_WEBHOOK_MAX_ATTEMPTS
    assert row["last_error"].startswith("gave up after 4 attempts; last: HTTP 502")
    batch = await batch_object(pool, batch_id)
    assert batch.webhook_status == "failed" and batch.webhook_attempts == 4
    assert "HTTP 502" in batch.webhook_error

    healthy = True
    await pool.execute(
        "UPDATE webhook_deliveries SET status = 'pending', cycle_attempts = 0,"
        " cycle_started_at = clock_timestamp(), next_attempt_at = clock_timestamp(),"
        " dead_at = NULL WHERE id = $1",
        row["id"],
    )  # what POST /v1/webhook_deliveries/{id}/resend does (tested through the api elsewhere)
    await wait_until(lambda: _status(pool, row["id"], "delivered"))
    assert [a["status_code"] for a in await attempts(pool, row["id"])] == [502] * 4 + [200]


async def _status(pool: asyncpg.Pool, delivery_id: str, status: str) -> bool:
    return await pool.fetchval(
        "SELECT status = $2 FROM webhook_deliveries WHERE id = $1", delivery_id, status
    )


async def test_max_age_ends_the_retries(
    notifier: Notifier, receiver: Receiver, pool: asyncpg.Pool, js: nats.js.JetStreamContext
) -> None:
    async def broken(_: Received, __: web.Request) -> web.StreamResponse:
        return web.Response(status=500)

    receiver.respond = broken
    metadata = {"webhook_url": receiver.url()}
    batch_id = await insert_batch(pool, metadata)
    await notifier.start(
        JETBATCH_WEBHOOK_MAX_ATTEMPTS="1000",
        JETBATCH_WEBHOOK_MAX_AGE_S="1",
        JETBATCH_WEBHOOK_BACKOFF_BASE_S="0.3",
    )
    await publish(js, batch_id, metadata=metadata)
    [row] = await settled(pool, batch_id)
    assert row["status"] == "dead"
    assert row["last_error"].startswith("gave up after 1s; last: HTTP 500")
    assert 1 < row["attempts"] < 1000


# Safety --------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_non_public_destinations_are_refused_unless_allowed(
    host: str,
    env: dict[str, str],
    receiver: Receiver,
    pool: asyncpg.Pool,
    js: nats.js.JetStreamContext,
) -> None:
    notifier = await Notifier(env).start(JETBATCH_WEBHOOK_ALLOWED_NETWORKS="")
    try:
        url = f"http://{host}:{receiver.port}/hook"
        batch_id = await insert_batch(pool, {"webhook_url": url})
        await publish(js, batch_id, metadata={"webhook_url": url})
        [row] = await settled(pool, batch_id)
    finally:
        await notifier.stop()
    assert row["status"] == "dead" and row["attempts"] == 1  # refused: no retries
    assert row["last_error"].startswith(f"refused: {host} resolves to 127.0.0.1")
    assert receiver.received == []


async def test_redirects_are_not_followed(
    notifier: Notifier, receiver: Receiver, pool: asyncpg.Pool, js: nats.js.JetStreamContext
) -> None:
    async def redirect(got: Received, __: web.Request) -> web.StreamResponse:
        if got.path == "/hook":
            raise web.HTTPFound(receiver.url("/elsewhere"))
        return web.Response(status=200)

    receiver.respond = redirect
    metadata = {"webhook_url": receiver.url()}
    batch_id = await insert_batch(pool, metadata)
    await notifier.start(JETBATCH_WEBHOOK_MAX_ATTEMPTS="2")
    await publish(js, batch_id, metadata=metadata)
    [row] = await settled(pool, batch_id)
    assert row["status"] == "dead" and row["last_status_code"] == 302
    assert (
        "redirect to 'http://127.0.0.1:" in row["last_error"]
        and "not followed" in row["last_error"]
    )
    assert receiver.on("/elsewhere") == []


async def test_an_endless_answer_is_not_read_to_the_end(
    notifier: Notifier, receiver: Receiver, pool: asyncpg.Pool, js: nats.js.JetStreamContext
) -> None:
    async def endless(_: Received, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        await response.prepare(request)
        chunk = b"x" * 65536
        for _ in range(100_000):  # 6.5 GB, far past the attempt's timeout at loopback speed
            await response.write(chunk)
        return response

    receiver.respond = endless
    metadata = {"webhook_url": receiver.url()}
    batch_id = await insert_batch(pool, metadata)
    await notifier.start(JETBATCH_WEBHOOK_TIMEOUT_S="10", JETBATCH_WEBHOOK_MAX_ATTEMPTS="1")
    await publish(js, batch_id, metadata=metadata)
    [row] = await settled(pool, batch_id)
    assert (row["status"], row["last_status_code"], row["last_error"]) == ("delivered", 200, None)


async def test_a_slow_receiver_does_not_stall_deliveries_to_others(
    env: dict[str, str], pool: asyncpg.Pool, js: nats.js.JetStreamContext
) -> None:
    slow, fast = await Receiver().start(), await Receiver().start()
    release = asyncio.Event()

    async def stuck(_: Received, __: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(status=200)

    slow.respond = stuck
    notifier = await Notifier(env).start(
        JETBATCH_WEBHOOK_CONCURRENCY="4",
        JETBATCH_WEBHOOK_CONCURRENCY_PER_HOST="2",
        JETBATCH_WEBHOOK_TIMEOUT_S="120",
    )
    try:
        slow_batches = [await insert_batch(pool, {"webhook_url": slow.url()}) for _ in range(6)]
        for batch_id in slow_batches:
            await publish(js, batch_id, metadata={"webhook_url": slow.url()})
        await slow.wait_for(lambda got: len(got) >= 2, 60)
        fast_batches = [await insert_batch(pool, {"webhook_url": fast.url()}) for _ in range(5)]
        for batch_id in fast_batches:
            await publish(js, batch_id, metadata={"webhook_url": fast.url()})
        # Every fast delivery arrives while the slow receiver still holds its requests.
        await fast.wait_for(lambda got: len(got) == 5, 60)
        assert not release.is_set()
        assert slow.max_in_flight == 2  # JETBATCH_WEBHOOK_CONCURRENCY_PER_HOST
        assert len(slow.received) == 2
        release.set()
        for batch_id in slow_batches:
            [row] = await settled(pool, batch_id)
            assert row["status"] == "delivered"
        assert slow.max_in_flight == 2
    finally:
        release.set()
        await notifier.stop()
        await slow.stop()
        await fast.stop()


async def test_without_a_deployment_secret_batch_urls_are_dead_lettered_not_dropped(
    env: dict[str, str], receiver: Receiver, pool: asyncpg.Pool, js: nats.js.JetStreamContext
) -> None:
    notifier = await Notifier({**env, "JETBATCH_WEBHOOK_SECRET": ""}).start()
    try:
        metadata = {"webhook_url": receiver.url()}
        batch_id = await insert_batch(pool, metadata)
        await publish(js, batch_id, metadata=metadata)
        [row] = await settled(pool, batch_id)
    finally:
        await notifier.stop()
    assert row["status"] == "dead"
    assert "JETBATCH_WEBHOOK_SECRET is not set" in row["last_error"]
    assert receiver.received == []
    batch = await batch_object(pool, batch_id)
    assert batch.webhook_status == "failed"


async def test_an_undecodable_event_is_rejected_and_the_next_one_delivered(
    notifier: Notifier, receiver: Receiver, pool: asyncpg.Pool, js: nats.js.JetStreamContext
) -> None:
    await js.publish(
        "jetbatch.events.batch.completed", b"{not json", headers={"Nats-Msg-Id": "bad"}
    )
    metadata = {"webhook_url": receiver.url()}
    batch_id = await insert_batch(pool, metadata)
    await publish(js, batch_id, metadata=metadata)
    await notifier.start()
    [row] = await settled(pool, batch_id)
    assert row["status"] == "delivered"


async def test_an_event_postgresql_cannot_store_is_rejected_and_the_rest_of_its_fetch_delivered(
    notifier: Notifier, receiver: Receiver, pool: asyncpg.Pool, js: nats.js.JetStreamContext
) -> None:
    poisoned = await insert_batch(pool)
    await publish(js, poisoned, metadata={"webhook_url": receiver.url("/a\x00b")})
    metadata = {"webhook_url": receiver.url()}
    batch_id = await insert_batch(pool, metadata)
    await publish(js, batch_id, metadata=metadata)
    await notifier.start()  # both arrive in one fetch
    [row] = await settled(pool, batch_id)
    assert row["status"] == "delivered"
    assert await deliveries(pool, poisoned) == []
    info = await js.consumer_info("EVENTS", "webhook_notifier")
    assert info.num_ack_pending == 0 and info.num_pending == 0
