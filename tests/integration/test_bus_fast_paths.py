"""shared.bus's fast paths (FastPull, AckAfterPublish) against a real nats-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy

from shared import bus
from tests.helpers import wait_until

WORK = bus.Stream("WORK", ("work.>",), RetentionPolicy.WORK_QUEUE)
DONE = bus.Stream("DONE", ("done.>",), RetentionPolicy.LIMITS)


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_url)
    yield conn
    await conn.close()


@pytest.fixture
async def js(nc: NATS) -> JetStreamContext:
    ctx = nc.jetstream()
    await bus.ensure_streams(ctx, (WORK, DONE))
    return ctx


async def fast_pull(js: JetStreamContext, ack_wait_s: float = 30) -> bus.FastPull:
    return await bus.durable_fast_pull(
        js, WORK, "workers", "work.>", ack_wait_s=ack_wait_s, max_deliver=5, max_ack_pending=10_000
    )


async def publish(js: JetStreamContext, n: int, start: int = 0) -> None:
    publisher = bus.Publisher(js)
    for i in range(start, start + n):
        await publisher.publish("work.item", str(i).encode(), f"item-{i}")
    await publisher.flush()


async def work_queue_empties(js: JetStreamContext) -> None:
    async def remaining() -> bool:
        return (await js.stream_info(WORK.name)).state.messages == 0

    await wait_until(remaining, "the work queue to empty", timeout_s=10)


async def test_fast_pull_hands_out_every_message_once_across_batches(js: JetStreamContext) -> None:
    await publish(js, 2_500)
    pull = await fast_pull(js)
    seen: list[bytes] = []
    while True:
        msgs = await pull.fetch(1_000, 0.5)
        if not msgs:
            break
        assert len(msgs) <= 1_000
        seen.extend(m.data for m in msgs)
        await bus.ack_all(msgs)
    assert sorted(seen, key=int) == [str(i).encode() for i in range(2_500)]
    # Every ack reached the server: the work queue empties (the server removes acked messages
    # from a work-queue stream on its own time, a little after the flush).
    await work_queue_empties(js)


async def test_fast_pull_returns_what_is_ready_without_filling_the_batch(
    js: JetStreamContext,
) -> None:
    await publish(js, 3)
    pull = await fast_pull(js)
    # Bounded below the fetch's own 10 s: a fetch that waits to fill the batch fails the test.
    msgs = await asyncio.wait_for(pull.fetch(100, 10), 5)
    assert [m.data for m in msgs] == [b"0", b"1", b"2"]


async def test_fast_pull_waits_for_the_first_message(js: JetStreamContext) -> None:
    pull = await fast_pull(js)

    async def later() -> None:
        await asyncio.sleep(0.3)
        await publish(js, 1, start=7)

    task = asyncio.create_task(later())
    msgs = await pull.fetch(10, 10)
    await task
    assert [m.data for m in msgs] == [b"7"]


async def test_fast_pull_returns_nothing_when_the_stream_stays_empty(js: JetStreamContext) -> None:
    pull = await fast_pull(js)
    assert await pull.fetch(10, 0.2) == []
    # The next request is not confused by the first one's end.
    await publish(js, 1)
    assert [m.data for m in await pull.fetch(10, 5)] == [b"0"]


async def test_unacked_message_is_redelivered_with_its_delivery_count(
    js: JetStreamContext,
) -> None:
    await publish(js, 1)
    pull = await fast_pull(js, ack_wait_s=1)
    first = await pull.fetch(1, 5)
    assert bus.delivery_count(first[0]) == 1
    again = await pull.fetch(1, 5)  # after ack_wait
    assert [m.data for m in again] == [b"0"]
    assert bus.delivery_count(again[0]) == 2


async def test_durable_fast_pull_configures_the_consumer(js: JetStreamContext) -> None:
    await fast_pull(js, ack_wait_s=12)
    info = await js.consumer_info(WORK.name, "workers")
    assert info.config.ack_wait == 12
    assert info.config.max_deliver == 5
    assert info.config.filter_subject == "work.>"


async def test_ack_after_publish_acks_each_source_once_its_result_is_stored(
    nc: NATS, js: JetStreamContext
) -> None:
    await publish(js, 300)
    pull = await fast_pull(js)
    results = bus.AckAfterPublish(nc)
    msgs: list = []
    while len(msgs) < 300:
        msgs += await pull.fetch(300, 5)
    await asyncio.gather(
        *(
            results.publish_then_ack(f"done.{m.data.decode()}", m.data, f"r-{m.data.decode()}", m)
            for m in msgs
        )
    )
    await nc.flush()
    await results.close()
    assert (await js.stream_info(DONE.name)).state.messages == 300
    await work_queue_empties(js)
    assert all(m.is_acked for m in msgs)


async def test_ack_after_publish_acks_a_duplicate_result(nc: NATS, js: JetStreamContext) -> None:
    # A redelivered request whose result is already stored: the stream drops the copy and
    # answers with a duplicate PubAck, which is a success.
    await publish(js, 1)
    pull = await fast_pull(js, ack_wait_s=1)
    results = bus.AckAfterPublish(nc)
    [first] = await pull.fetch(1, 5)
    publisher = bus.Publisher(js)
    await publisher.publish("done.0", b"0", "r-0")
    await publisher.flush()
    await results.publish_then_ack("done.0", b"0", "r-0", first)
    assert first.is_acked
    assert (await js.stream_info(DONE.name)).state.messages == 1
    await results.close()


async def test_ack_after_publish_leaves_the_source_unacked_when_no_stream_takes_it(
    nc: NATS, js: JetStreamContext
) -> None:
    await publish(js, 1)
    pull = await fast_pull(js)
    results = bus.AckAfterPublish(nc, ack_timeout_s=5)
    [msg] = await pull.fetch(1, 5)
    with pytest.raises(bus.PublishError):
        await results.publish_then_ack("nowhere.0", b"0", "r-0", msg)
    assert not msg.is_acked
    await results.close()


async def test_ack_after_publish_takes_a_group_and_reports_only_its_failures(
    nc: NATS, js: JetStreamContext
) -> None:
    await publish(js, 50)
    pull = await fast_pull(js)
    results = bus.AckAfterPublish(nc, ack_timeout_s=5)
    msgs: list = []
    while len(msgs) < 50:
        msgs += await pull.fetch(50, 5)
    # Every tenth result goes to a subject no stream listens on.
    items = [
        (f"{'nowhere' if i % 10 == 0 else 'done'}.{i}", m.data, f"g-{i}", m)
        for i, m in enumerate(msgs)
    ]
    failed = await results.publish_many_then_ack(items)
    await nc.flush()
    await results.close()
    assert sorted(failed) == list(range(0, 50, 10))
    assert all(isinstance(e, bus.PublishError) for e in failed.values())
    assert [i for i, m in enumerate(msgs) if not m.is_acked] == sorted(failed)
    assert (await js.stream_info(DONE.name)).state.messages == 45


async def test_publisher_flush_counts_every_message_the_stream_took(js: JetStreamContext) -> None:
    publisher = bus.Publisher(js)
    for i in range(10_000):  # past the point where it drains PubAcks while publishing
        await publisher.publish("work.item", b"x", f"many-{i}")
    assert await publisher.flush() == 10_000
    # A re-publish of the same ids is dropped by the duplicate window and still succeeds.
    for i in range(10):
        await publisher.publish("work.item", b"x", f"many-{i}")
    assert await publisher.flush() == 10
    assert (await js.stream_info(WORK.name)).state.messages == 10_000


async def test_publisher_flush_raises_when_no_stream_takes_a_message(js: JetStreamContext) -> None:
    publisher = bus.Publisher(js)
    await publisher.publish("work.item", b"x", "ok-1")
    await publisher.publish("nowhere.item", b"x", "lost-1")
    with pytest.raises(bus.PublishError):
        await publisher.flush()
    assert await publisher.flush() == 0  # the failure was reported once
