"""Consumers: each declared once, beside its handler, as data (`Consumer`), and all run by one
`Runner`, which decodes, calls the handler, acks after it returns, naks with the one backoff
policy, dead-letters what is rejected or undecodable, opens the trace span, counts outcomes, and
stops and drains on shutdown.

Handlers are domain logic only. They signal with two exceptions: `Retry` ("not now": nak with
the policy's delay, or the one given) and `Reject` ("never": dead letter + term). Any other
exception is logged and retried like `Retry`; a consumer's `max_deliver` bounds that.

Three ways to handle what a pull brings:
- one message at a time (`handle(value, delivery)`, `concurrency` of them at once);
- a fetch at a time (`batch=True`: `handle(batch)`, e.g. one transaction per fetch); the handler
  may reject single messages of the fetch (`batch.reject(i, reason)`) and the rest is acked;
- `Runner.pull`: the handler takes deliveries as they come, in slices, and settles each itself
  (`Runner.ack_later` / `retry` / `reject` / `hand_back`) as its work finishes; an `admit` hook
  says how many it can take now. The inference worker runs this way (engine slots, results
  published and acked in groups).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import msgspec
from nats.aio.msg import Msg
from nats.errors import MsgAlreadyAckdError
from nats.js import JetStreamContext
from opentelemetry import trace

from schemas.messages import BusMessage, subject_matches
from shared import logs, tracing
from shared.backoff import BACKOFF
from shared.bus import FastPull, Stream, delivery_count, durable_fast_pull, through_elections
from shared.metrics import ConsumerCounter

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

M = TypeVar("M", bound=BusMessage)


class Retry(Exception):
    """Not now: the message is redelivered after the backoff's delay (or `delay_s`)."""

    def __init__(self, reason: str = "", *, delay_s: float | None = None) -> None:
        super().__init__(reason)
        self.delay_s = delay_s


class Reject(Exception):
    """Never: the message is recorded as a dead letter (for an operator to see and replay) and
    termed, so it is not redelivered."""


class DeadLetters(Protocol):
    async def __call__(self, msg: Msg, reason: str) -> None: ...


@dataclass(frozen=True)
class Consumer(Generic[M]):
    """A durable pull consumer, declared once as data. Its filter subject is derived from the
    message type's declared subject (`bound` fixes placeholders); several types read the whole
    stream, each message decoded as the type whose subject it matches."""

    stream: Stream
    durable: str
    message: type[M] | tuple[type[BusMessage], ...]
    ack_wait_s: float
    max_deliver: int = -1  # -1 = unlimited
    max_ack_pending: int = 1_000
    fetch: int = 100  # messages per pull at most
    fetch_timeout_s: float = 1.0
    batch: bool = False  # the handler takes a whole fetch
    concurrency: int = 1  # one-at-a-time handlers running at once
    keep_alive: bool = False  # extend the ack wait while a handler runs
    bound: Mapping[str, str] = field(default_factory=dict)
    # Filters that narrow the type's subjects (one class of them); empty: the type's own.
    filters: tuple[str, ...] = ()

    @property
    def types(self) -> tuple[type[BusMessage], ...]:
        return self.message if isinstance(self.message, tuple) else (self.message,)

    @property
    def filter_subject(self) -> str | None:
        if self.filters:
            return ", ".join(self.filters)
        if isinstance(self.message, tuple):
            return None
        return self.message.filter_subject(**self.bound)

    @property
    def server_filter(self) -> str | tuple[str, ...] | None:
        """What the server filters the stream with: one subject, several, or none."""
        if len(self.filters) > 1:
            return self.filters
        return self.filter_subject

    def describe(self) -> str:
        """One line for README's layout section."""
        names = ", ".join(t.__name__ for t in self.types)
        how = (
            f"fetches of up to {self.fetch}"
            if self.batch
            else "one at a time" + (f", {self.concurrency} at once" if self.concurrency > 1 else "")
        )
        deliver = "unlimited" if self.max_deliver < 0 else str(self.max_deliver)
        return (
            f"{self.stream.name} `{self.filter_subject or '(whole stream)'}` as `{self.durable}`:"
            f" {names}, {how}, max_deliver {deliver}, ack_wait {self.ack_wait_s:g} s"
        )


class Delivery(Generic[M]):
    """A decoded message and the JetStream message it came in."""

    __slots__ = ("msg", "value")

    def __init__(self, msg: Msg, value: M) -> None:
        self.msg = msg
        self.value = value

    @property
    def number(self) -> int:
        """Which delivery of the message this is (1 = the first)."""
        return delivery_count(self.msg)

    @property
    def subject(self) -> str:
        return self.msg.subject


class Batch(Generic[M]):
    """A fetch, decoded. The handler may reject some of it; the rest is acked once it returns."""

    def __init__(self, deliveries: list[Delivery[M]]) -> None:
        self.deliveries = deliveries
        self.rejected: dict[int, str] = {}

    @property
    def values(self) -> list[M]:
        return [d.value for d in self.deliveries]

    def reject(self, index: int, reason: str) -> None:
        self.rejected[index] = reason

    def __len__(self) -> int:
        return len(self.deliveries)


@dataclass
class Counts:
    """What the runner did, by outcome; `add` counts it in the process's Prometheus metrics too
    (`jetbatch_consumer_messages_total`, README: Metrics)."""

    acked: int = 0
    retried: int = 0
    rejected: int = 0
    failed_fetches: int = 0
    metrics: ConsumerCounter | None = field(default=None, repr=False, compare=False)

    def add(self, outcome: str, n: int = 1) -> None:
        setattr(self, outcome, getattr(self, outcome) + n)
        if self.metrics is not None:
            self.metrics.count(outcome, n)


OneHandler = Callable[[Any, Delivery[Any]], Awaitable[None]]
BatchHandler = Callable[[Batch[Any]], Awaitable[None]]
Take = Callable[[list[Delivery[Any]]], Awaitable[None]]


class Runner(Generic[M]):
    """Runs one declared consumer on one connection."""

    def __init__(
        self,
        js: JetStreamContext | None,
        consumer: Consumer[M],
        dead_letters: DeadLetters,
        *,
        drain_timeout_s: float = 20.0,
    ) -> None:
        self.js = js
        self.consumer = consumer
        self.counts = Counts(metrics=ConsumerCounter(consumer.durable, consumer.stream.name))
        self._dead_letters = dead_letters
        self._drain_timeout_s = drain_timeout_s
        self._pull: FastPull | None = None
        self._failures = 0
        self._span_name = f"{consumer.filter_subject or consumer.stream.name} process"
        # "result message", "batch event": what the log calls this consumer's messages.
        self._label = " or ".join(_words(t.__name__) for t in consumer.types)
        self._decoders = [
            (t.filter_subject(**consumer.bound), msgspec.json.Decoder(t)) for t in consumer.types
        ]
        self._only = self._decoders[0][1] if len(self._decoders) == 1 else None

    # -- settling one message --------------------------------------------------------------

    def decode(self, msg: Msg) -> M:
        """The message as its declared type; raises Reject if it does not decode."""
        try:
            if self._only is not None:  # one declared type: no subject to look at
                return self._only.decode(msg.data)  # type: ignore[no-any-return,return-value]
            for filter_subject, decoder in self._decoders:
                if subject_matches(filter_subject, msg.subject):
                    return decoder.decode(msg.data)  # type: ignore[return-value]
        except msgspec.DecodeError as e:  # ValidationError included
            raise Reject(f"undecodable {self._label}: {e}") from None
        raise Reject(f"no message type is declared for subject {msg.subject}")

    async def ack(self, delivery: Delivery[M]) -> None:
        await delivery.msg.ack()
        self.counts.add("acked")

    async def retry(self, delivery: Delivery[M] | Msg, delay_s: float | None = None) -> None:
        """Redeliver later: after `delay_s`, or the backoff's delay for its delivery count."""
        msg = delivery.msg if isinstance(delivery, Delivery) else delivery
        if delay_s is None:
            delay_s = BACKOFF.delay_s(delivery_count(msg))
        self.counts.add("retried")
        with contextlib.suppress(MsgAlreadyAckdError):
            await msg.nak(delay=delay_s)

    async def reject(self, delivery: Delivery[M] | Msg, reason: str) -> None:
        """Dead-letter and term. A crash in between redelivers it; the dead letter is recorded
        once (recording is idempotent per stream sequence)."""
        msg = delivery.msg if isinstance(delivery, Delivery) else delivery
        log.error(
            "rejected %s: subject=%s delivery=%d reason=%s",
            self._label, msg.subject, delivery_count(msg), reason,
        )  # fmt: skip
        await self._dead_letters(msg, reason)
        self.counts.add("rejected")
        await msg.term()

    async def hand_back(self, msgs: Sequence[Msg]) -> int:
        """Redeliver at once, to any consumer (a worker shutting down). Returns how many."""
        handed = 0
        for msg in msgs:
            if msg.is_acked:
                continue
            with contextlib.suppress(Exception):
                await msg.nak()
                handed += 1
        return handed

    async def settle_failure(self, delivery: Delivery[M] | Msg, error: BaseException) -> None:
        """The policy for a handler's exception, the same for every consumer."""
        if isinstance(error, Reject):
            await self.reject(delivery, str(error))
        elif isinstance(error, Retry):
            await self.retry(delivery, error.delay_s)
        else:
            msg = delivery.msg if isinstance(delivery, Delivery) else delivery
            log.error(
                "%s: message on %s failed; it will be redelivered",
                self.consumer.durable, msg.subject, exc_info=error,
            )  # fmt: skip
            await self.retry(delivery)

    # -- running ----------------------------------------------------------------------------

    async def bind(self) -> FastPull:
        """Create or update the durable and subscribe to it (before the first fetch)."""
        if self._pull is None:
            assert self.js is not None, "a runner needs a connection to pull"
            c = self.consumer
            self._pull = await through_elections(
                functools.partial(
                    durable_fast_pull, self.js, c.stream, c.durable, c.server_filter,
                    ack_wait_s=c.ack_wait_s, max_deliver=c.max_deliver,
                    max_ack_pending=c.max_ack_pending,
                )
            )  # fmt: skip
        return self._pull

    async def close(self) -> None:
        # Before the connection drains: nobody reads the late status replies of a pull.
        if self._pull is not None:
            pull, self._pull = self._pull, None
            with contextlib.suppress(Exception):
                await pull.unsubscribe()

    async def run(self, handler: OneHandler | BatchHandler, stop: asyncio.Event) -> None:
        """Consume until `stop` is set; then finish what is in hand and unsubscribe."""
        await self.bind()
        try:
            if self.consumer.batch:
                await self._run_batches(handler, stop)  # type: ignore[arg-type]
            else:
                await self._run_each(handler, stop)  # type: ignore[arg-type]
        finally:
            await self.close()

    async def fetch(self, n: int, stop: asyncio.Event) -> list[Msg]:
        pull = await self.bind()
        try:
            return await pull.fetch(n, self.consumer.fetch_timeout_s)
        except Exception as e:  # disconnected: the client reconnects by itself
            self.counts.add("failed_fetches")
            log.warning("%s: fetch failed: %r", self.consumer.durable, e)
            await sleep_unless(stop, BACKOFF.base_s)
            return []

    async def _run_each(self, handler: OneHandler, stop: asyncio.Event) -> None:
        limit = self.consumer.concurrency
        running: set[asyncio.Task[None]] = set()
        try:
            while not stop.is_set():
                if len(running) >= limit:
                    await asyncio.wait(set(running), return_when=asyncio.FIRST_COMPLETED)
                    continue
                n = min(limit - len(running), self.consumer.fetch)
                for msg in await self.fetch(n, stop):
                    task = asyncio.create_task(self._one(handler, msg))
                    running.add(task)
                    task.add_done_callback(running.discard)
        finally:
            # Handlers in hand finish; one cut short by the timeout is simply redelivered.
            if running:
                _, pending = await asyncio.wait(set(running), timeout=self._drain_timeout_s)
                for task in pending:
                    task.cancel()

    async def _one(self, handler: OneHandler, msg: Msg) -> None:
        keep_alive = None
        if self.consumer.keep_alive:
            keep_alive = asyncio.create_task(self._keep_alive(msg))
        try:
            try:
                delivery = Delivery(msg, self.decode(msg))
                logs.bind_message(delivery.value)  # this task's log records name its batch, line
                with tracing.message_span(self._span_name, msg.headers, delivery.value):
                    await handler(delivery.value, delivery)
            except Exception as e:
                await self.settle_failure(msg, e)
                return
            await self.ack(delivery)
        except Exception:
            log.exception("%s: settling a message on %s failed", self.consumer.durable, msg.subject)
        finally:
            if keep_alive is not None:
                keep_alive.cancel()

    async def _keep_alive(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self.consumer.ack_wait_s / 3)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _run_batches(self, handler: BatchHandler, stop: asyncio.Event) -> None:
        # The next fetch runs while this one is handled, so pulling (client CPU) overlaps the
        # handler's work (the database's). A fetch in hand when `stop` comes is still handled:
        # that takes less time than waiting for its redelivery.
        n = self.consumer.fetch
        ahead: asyncio.Task[list[Msg]] | None = asyncio.create_task(self.fetch(n, stop))
        try:
            while ahead is not None:
                msgs = await ahead
                ahead = None if stop.is_set() else asyncio.create_task(self.fetch(n, stop))
                if msgs:
                    await self._handle_batch(handler, msgs, stop)
        finally:
            if ahead is not None:
                ahead.cancel()

    async def _handle_batch(
        self, handler: BatchHandler, msgs: list[Msg], stop: asyncio.Event
    ) -> None:
        deliveries: list[Delivery[M]] = []
        for msg in msgs:
            try:
                deliveries.append(Delivery(msg, self.decode(msg)))
            except Reject as e:
                await self.reject(msg, str(e))
        if not deliveries:
            return
        batch = Batch(deliveries)
        try:
            # A span per sampled line (or batch-level message) of the fetch, none per fetch.
            traced = [(d.msg.headers, d.value) for d in deliveries]
            with tracing.fetch_spans(self._span_name, traced):
                await handler(batch)
        except Exception as e:
            self._failures += 1
            delay = (
                e.delay_s
                if isinstance(e, Retry) and e.delay_s is not None
                else BACKOFF.delay_s(self._failures)
            )
            if not isinstance(e, Retry):
                log.error(
                    "%s: handling %d messages failed; retrying in %.0f s",
                    self.consumer.durable, len(deliveries), delay, exc_info=e,
                )  # fmt: skip
            for d in deliveries:
                await self.retry(d, delay)
            # Stop pulling meanwhile: what failed them all (the database) is most likely down.
            await sleep_unless(stop, delay)
            return
        self._failures = 0
        rejected = batch.rejected
        for i, d in enumerate(deliveries):
            if i in rejected:
                await self.reject(d, rejected[i])
            else:  # after the handler's commit: a crash before this only redelivers
                await d.msg.ack()
        self.counts.add("acked", len(deliveries) - len(rejected))

    async def pull(
        self,
        take: Take,
        stop: asyncio.Event,
        *,
        admit: Callable[[], Awaitable[int]],
        slice_size: Callable[[], int] = lambda: 64,
        fetched: Callable[[list[Msg]], None] | None = None,
    ) -> None:
        """Fetch as much as `admit()` allows (it waits while nothing can be taken) and hand it
        to `take` decoded, a slice at a time: between slices the event loop runs whatever else
        is ready, so a latency-sensitive callback waits for one slice, never a whole fetch.
        Undecodable messages are rejected here; `take` settles the others itself. `fetched`
        sees each fetch's messages before they are handed on (the next `admit()` comes after
        all of them were)."""
        await self.bind()
        try:
            while not stop.is_set():
                free = await admit()
                if free <= 0 or stop.is_set():
                    continue
                msgs = await self.fetch(min(free, self.consumer.fetch), stop)
                if fetched is not None:
                    fetched(msgs)
                await self.take(take, msgs, slice_size())
        finally:
            await self.close()

    async def take(self, take: Take, msgs: list[Msg], size: int) -> None:
        """Hand `msgs` to `take` decoded, `size` at a time, rejecting what does not decode."""
        for start in range(0, len(msgs), size):
            if start:
                await asyncio.sleep(0)
            deliveries: list[Delivery[M]] = []
            for msg in msgs[start : start + size]:
                try:
                    deliveries.append(Delivery(msg, self.decode(msg)))
                except Reject as e:
                    await self.reject(msg, str(e))
            if deliveries:
                # No span per slice: a slice means nothing to a reader of traces, and on the
                # batch path its ~10 us add up. Per-line spans, sampled, are the handler's.
                await take(deliveries)


def _words(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", " ", name).lower()


async def sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    """Sleep, or less if `stop` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
