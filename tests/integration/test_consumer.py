"""The one consumer runner (shared/consumer.py) against a real nats-server: acks after the
handler, Retry naks with the backoff, Reject and undecodable messages are dead-lettered and
termed, a batch handler may reject single messages, and stop drains what is in hand."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import ClassVar

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy

from schemas.messages import BusMessage
from shared import bus
from shared.backoff import BACKOFF, Backoff
from shared.consumer import Batch, Consumer, Delivery, Reject, Retry, Runner
from tests.helpers import wait_until


class Job(BusMessage, kw_only=True, frozen=True):
    subject: ClassVar[str] = "test.jobs.{kind}.{n}"

    n: int


STREAM = bus.Stream("TESTJOBS", ("test.jobs.>",), RetentionPolicy.WORK_QUEUE)
ONE = Consumer(stream=STREAM, durable="one", message=Job, ack_wait_s=5, max_deliver=5, fetch=10)


class DeadLetters:
    def __init__(self) -> None:
        self.letters: list[tuple[str, str]] = []

    async def __call__(self, msg: Msg, reason: str) -> None:
        self.letters.append((msg.subject, reason))


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc: NATS = await nats.connect(nats_url)
    ctx = nc.jetstream()
    await bus.ensure_streams(ctx, (STREAM,))
    yield ctx
    await nc.close()


async def publish(js: JetStreamContext, *jobs: int, kind: str = "a") -> None:
    for n in jobs:
        await js.publish(Job.subject_with(kind=kind, n=str(n)), msgspec.json.encode(Job(n=n)))


async def run_until(runner: Runner, handler, done, timeout_s: float = 10) -> None:  # type: ignore[no-untyped-def]
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(handler, stop))
    try:
        await wait_until(done, "the runner to get there", timeout_s=timeout_s)
    finally:
        stop.set()
        await task


async def queued(js: JetStreamContext) -> int:
    return (await js.stream_info(STREAM.name)).state.messages


async def work_queue_emptied(js: JetStreamContext) -> None:
    """Acks are processed by the server after they are sent: wait for them to land."""

    async def empty() -> bool:
        return await queued(js) == 0

    await wait_until(empty, "every ack to reach the work queue", timeout_s=10)


def test_the_filter_subject_is_derived_from_the_message_type() -> None:
    assert ONE.filter_subject == "test.jobs.>"
    bound = Consumer(stream=STREAM, durable="b", message=Job, ack_wait_s=5, bound={"kind": "x.y"})
    assert bound.filter_subject == "test.jobs.x_y.>"


def test_one_backoff_doubles_up_to_its_ceiling_and_jitter_stays_under_it() -> None:
    assert [BACKOFF.delay_s(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    jittered = Backoff(base_s=10, max_s=100, jitter=True)
    rng = random.Random(7)
    assert all(0 <= jittered.delay_s(n, rng) <= min(100, 10 * 2 ** (n - 1)) for n in range(1, 9))


async def test_handled_messages_are_acked_and_leave_the_work_queue(js: JetStreamContext) -> None:
    await publish(js, 1, 2, 3)
    seen: list[int] = []

    async def handle(job: Job, delivery: Delivery[Job]) -> None:
        assert delivery.number == 1
        seen.append(job.n)

    runner = Runner(js, ONE, DeadLetters())
    await run_until(runner, handle, lambda: runner.counts.acked == 3)
    assert sorted(seen) == [1, 2, 3]
    await work_queue_emptied(js)


async def test_retry_redelivers_after_its_delay_and_reject_dead_letters_and_terms(
    js: JetStreamContext,
) -> None:
    await publish(js, 1, 2)
    deliveries: dict[int, int] = {}

    async def handle(job: Job, delivery: Delivery[Job]) -> None:
        deliveries[job.n] = delivery.number
        if job.n == 1 and delivery.number == 1:
            raise Retry("not yet", delay_s=0.1)
        if job.n == 2:
            raise Reject("never")

    dead = DeadLetters()
    runner = Runner(js, ONE, dead)
    await run_until(runner, handle, lambda: runner.counts.acked == 1 and dead.letters)
    assert deliveries == {1: 2, 2: 1}
    assert dead.letters == [("test.jobs.a.2", "never")]
    assert runner.counts.retried == 1 and runner.counts.rejected == 1
    await asyncio.sleep(0.3)
    assert deliveries[2] == 1  # termed: never delivered again
    await work_queue_emptied(js)


async def test_an_undecodable_message_is_rejected_without_reaching_the_handler(
    js: JetStreamContext,
) -> None:
    await js.publish("test.jobs.a.9", b'{"n": "nine"}')
    called: list[Job] = []

    async def handle(job: Job, delivery: Delivery[Job]) -> None:
        called.append(job)

    dead = DeadLetters()
    runner = Runner(js, ONE, dead)
    await run_until(runner, handle, lambda: bool(dead.letters))
    assert not called
    assert dead.letters[0][0] == "test.jobs.a.9" and "undecodable" in dead.letters[0][1]


async def test_an_unexpected_error_is_retried_with_the_backoff(js: JetStreamContext) -> None:
    await publish(js, 1)
    numbers: list[int] = []

    async def handle(job: Job, delivery: Delivery[Job]) -> None:
        numbers.append(delivery.number)
        if delivery.number == 1:
            raise RuntimeError("database down")

    runner = Runner(js, ONE, DeadLetters())
    await run_until(runner, handle, lambda: runner.counts.acked == 1)
    assert numbers == [1, 2]  # the second came after BACKOFF.delay_s(1) = 1 s


async def test_a_batch_handler_rejects_one_message_and_the_rest_is_acked(
    js: JetStreamContext,
) -> None:
    await publish(js, *range(6))
    batched = Consumer(
        stream=STREAM, durable="batched", message=Job, ack_wait_s=5, batch=True, fetch=10
    )
    sizes: list[int] = []

    async def handle(batch: Batch[Job]) -> None:
        sizes.append(len(batch))
        for i, job in enumerate(batch.values):
            if job.n == 3:
                batch.reject(i, "three is bad")

    dead = DeadLetters()
    runner = Runner(js, batched, dead)
    await run_until(runner, handle, lambda: runner.counts.acked + runner.counts.rejected == 6)
    assert dead.letters == [("test.jobs.a.3", "three is bad")]
    assert runner.counts.acked == 5 and sum(sizes) == 6
    await work_queue_emptied(js)


async def test_a_failed_batch_is_redelivered_whole(js: JetStreamContext) -> None:
    await publish(js, 1, 2)
    batched = Consumer(
        stream=STREAM, durable="batched", message=Job, ack_wait_s=5, batch=True, fetch=10
    )
    rounds: list[list[int]] = []

    async def handle(batch: Batch[Job]) -> None:
        rounds.append(sorted(d.number for d in batch.deliveries))
        if len(rounds) == 1:
            raise Retry("database down", delay_s=0.1)

    runner = Runner(js, batched, DeadLetters())
    await run_until(runner, handle, lambda: runner.counts.acked == 2)
    assert rounds[0] == [1, 1] and rounds[-1] == [2, 2]


async def test_stop_lets_a_running_handler_finish_and_ack(js: JetStreamContext) -> None:
    await publish(js, 1)
    started, finished = asyncio.Event(), asyncio.Event()

    async def handle(job: Job, delivery: Delivery[Job]) -> None:
        started.set()
        await asyncio.sleep(0.3)
        finished.set()

    runner = Runner(js, ONE, DeadLetters())
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(handle, stop))
    await asyncio.wait_for(started.wait(), 10)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert finished.is_set() and runner.counts.acked == 1
    await work_queue_emptied(js)


async def test_a_consumer_of_several_types_decodes_each_by_its_subject(
    js: JetStreamContext,
) -> None:
    class Other(BusMessage, kw_only=True, frozen=True):
        subject: ClassVar[str] = "test.jobs.other.{n}"

        text: str

    both = Consumer(stream=STREAM, durable="both", message=(Other, Job), ack_wait_s=5)
    await js.publish("test.jobs.other.1", msgspec.json.encode(Other(text="hi")))
    await publish(js, 2)
    got: list[object] = []

    async def handle(value: object, delivery: Delivery) -> None:  # type: ignore[type-arg]
        got.append(value)

    runner = Runner(js, both, DeadLetters())
    await run_until(runner, handle, lambda: len(got) == 2)
    assert {type(v).__name__ for v in got} == {"Other", "Job"}
