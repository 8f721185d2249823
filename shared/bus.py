"""NATS JetStream plumbing: connection, the streams (declared once, created idempotently), a
pipelined publisher with deterministic message ids, and batched pull consumption."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, BadRequestError, NotFoundError

log = logging.getLogger(__name__)

MSG_ID = "Nats-Msg-Id"
# Bulk loops (a burst of publishes, a queue of PubAcks) hand the event loop back this often, so
# a latency-sensitive callback in the same process (a synchronous request) waits for one slice
# (well under a millisecond), not for the whole burst. AckAfterPublish.yield_every may lower it
# while such callbacks are frequent.
YIELD_EVERY = 128
DAY_S = 86_400


@dataclass(frozen=True)
class Stream:
    name: str
    subjects: tuple[str, ...]
    retention: RetentionPolicy
    max_age_s: float = 0  # 0 = forever
    duplicate_window_s: float = 120

    def config(self) -> StreamConfig:
        return StreamConfig(
            name=self.name,
            subjects=list(self.subjects),
            retention=self.retention,
            storage=StorageType.FILE,
            max_age=self.max_age_s,
            duplicate_window=self.duplicate_window_s,
        )


# Work queue: a request is removed once an inference worker acks it (after publishing its result).
REQUESTS = Stream("REQUESTS", ("jetbatch.requests.>",), RetentionPolicy.WORK_QUEUE)
# Limits: the results writer reads everything; other services may read their own batch's subject.
RESULTS = Stream("RESULTS", ("jetbatch.results.>",), RetentionPolicy.LIMITS, max_age_s=7 * DAY_S)
EVENTS = Stream("EVENTS", ("jetbatch.events.>",), RetentionPolicy.LIMITS, max_age_s=30 * DAY_S)
# Work queue: the watchdog's orders to the api (re-drive, close out); stale orders are useless.
CONTROL = Stream("CONTROL", ("jetbatch.control.>",), RetentionPolicy.WORK_QUEUE, max_age_s=3_600)
# Work queue read by the watchdog, which records each message in table `dead_letters`: rejected
# messages of services without a database, and JetStream's own advisories of requests that
# reached max deliveries (captured here so none is missed while the watchdog is down).
MAX_DELIVERIES_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"
DEADLETTERS = Stream(
    "DEADLETTERS",
    ("jetbatch.deadletters.>", f"{MAX_DELIVERIES_ADVISORY}.REQUESTS.*"),
    RetentionPolicy.WORK_QUEUE,
    max_age_s=30 * DAY_S,
)
STREAMS = (REQUESTS, RESULTS, EVENTS, CONTROL, DEADLETTERS)

WORKERS_BUCKET = "jetbatch_workers"
WORKERS_TTL_S = 300
# Batches whose remaining requests must not run (cancelled or expired): key = batch id, value =
# schemas.messages.BatchStop. Kept longer than any request of such a batch waits in REQUESTS.
CANCELLED_BUCKET = "jetbatch_cancelled"
CANCELLED_TTL_S = 7 * DAY_S


async def connect(url: str, name: str) -> NATS:
    async def on_error(e: Exception) -> None:
        log.warning("nats: %s", e)

    async def on_disconnect() -> None:
        log.warning("nats: disconnected")

    async def on_reconnect() -> None:
        log.info("nats: reconnected")

    return await nats.connect(
        url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        pending_size=64 * 1024 * 1024,
    )


async def ensure_streams(js: JetStreamContext, streams: Iterable[Stream] = STREAMS) -> None:
    for stream in streams:
        try:
            await js.add_stream(stream.config())
        except BadRequestError:
            # Exists with another config: bring it to ours.
            await js.update_stream(stream.config())


async def workers_kv(js: JetStreamContext):  # type: ignore[no-untyped-def]
    try:
        return await js.key_value(WORKERS_BUCKET)
    except (NotFoundError, Exception):  # BucketNotFoundError subclasses NotFoundError
        return await js.create_key_value(
            KeyValueConfig(bucket=WORKERS_BUCKET, history=1, ttl=WORKERS_TTL_S)
        )


async def cancelled_kv(js: JetStreamContext):  # type: ignore[no-untyped-def]
    try:
        return await js.key_value(CANCELLED_BUCKET)
    except (NotFoundError, Exception):
        return await js.create_key_value(
            KeyValueConfig(bucket=CANCELLED_BUCKET, history=1, ttl=CANCELLED_TTL_S)
        )


async def durable_pull(
    js: JetStreamContext,
    stream: Stream,
    durable: str,
    filter_subject: str,
    *,
    ack_wait_s: float,
    max_deliver: int,
    max_ack_pending: int,
) -> JetStreamContext.PullSubscription:
    """A durable pull consumer, created or updated to this config, and a subscription to it."""
    config = ConsumerConfig(
        durable_name=durable,
        filter_subject=filter_subject,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait_s,
        max_deliver=max_deliver,
        max_ack_pending=max_ack_pending,
        max_waiting=512,
    )
    try:
        await js.add_consumer(stream.name, config)
    except BadRequestError:
        await js.add_consumer(stream.name, config)  # update of an existing durable
    return await js.pull_subscribe_bind(durable, stream=stream.name)


async def durable_fast_pull(
    js: JetStreamContext,
    stream: Stream,
    durable: str,
    filter_subject: str,
    *,
    ack_wait_s: float,
    max_deliver: int,
    max_ack_pending: int,
) -> FastPull:
    """durable_pull's consumer (same config), read through a FastPull."""
    sub = await durable_pull(
        js,
        stream,
        durable,
        filter_subject,
        ack_wait_s=ack_wait_s,
        max_deliver=max_deliver,
        max_ack_pending=max_ack_pending,
    )
    # Only the consumer was wanted; the pull subscription's inbox is not used.
    await sub.unsubscribe()
    return await FastPull.bind(js._nc, stream.name, durable, api_prefix=js._prefix)


async def fetch(sub: JetStreamContext.PullSubscription, batch: int, timeout_s: float) -> list[Msg]:
    """Up to `batch` messages; [] when none arrived within the timeout."""
    try:
        return await sub.fetch(batch, timeout=timeout_s)
    except (TimeoutError, nats.errors.TimeoutError):
        return []


class FastPull:
    """Batched pulls from a durable consumer, several times faster than nats-py's `fetch()`.

    One raw `$JS.API.CONSUMER.MSG.NEXT` request per batch with `no_wait` and `expires`, which the
    server reads as: wait up to `expires` for the first message, then deliver what is there (up
    to `batch`) and end with a 404. Replies land in one plain inbox subscription whose queue is
    drained in bulk, with no timer per message (nats-py's fetch() arms one per message, which
    makes it client-CPU-bound at ~10-15k msg/s). Each request gets its own reply subject, so the
    status that ends a request (404 no messages, 408 expired, 409 e.g. max waiting) is never
    mistaken for the end of another; JetStream messages keep their stream subject.

    Messages that arrive after a fetch returned (a request ended by a client-side timeout, a
    reconnect) are handed out by the next fetch. Not for concurrent fetches from several tasks
    on one instance (they are serialized)."""

    # Statuses that end a pull request without an error.
    _END = frozenset(("404", "408", "409"))
    # Client-side wait beyond the server's `expires`, for the 408 to arrive.
    _GRACE_S = 0.25

    def __init__(self, nc: NATS, stream: str, durable: str, *, api_prefix: str = "$JS.API") -> None:
        self._nc = nc
        self._next_subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = nc.new_inbox()
        self._requests = itertools.count()
        self._sub: Subscription | None = None
        self._lock = asyncio.Lock()
        self.stream = stream
        self.durable = durable

    @classmethod
    async def bind(
        cls, nc: NATS, stream: str, durable: str, *, api_prefix: str = "$JS.API"
    ) -> FastPull:
        pull = cls(nc, stream, durable, api_prefix=api_prefix)
        pull._sub = await nc.subscribe(
            f"{pull._inbox}.*",
            pending_msgs_limit=1_000_000,
            pending_bytes_limit=512 * 1024 * 1024,
        )
        return pull

    async def fetch(self, batch: int, timeout_s: float) -> list[Msg]:
        """Up to `batch` messages: waits up to `timeout_s` for the first one, then returns what
        the consumer had ready. [] when none arrived in time."""
        if batch < 1:
            raise ValueError("batch must be >= 1")
        async with self._lock:
            return await self._fetch(batch, timeout_s)

    async def _fetch(self, batch: int, timeout_s: float) -> list[Msg]:
        sub = self._sub
        if sub is None:
            raise RuntimeError("FastPull is not bound (use FastPull.bind)")
        queue = sub._pending_queue
        msgs: list[Msg] = []
        # Leftovers of earlier requests first; their statuses are stale, drop them.
        while len(msgs) < batch and not queue.empty():
            msg = queue.get_nowait()
            sub._pending_size -= len(msg.data)
            if not _status(msg):
                msgs.append(msg)
        if msgs:
            return msgs
        reply = f"{self._inbox}.{next(self._requests)}"
        request = {"batch": batch, "no_wait": True}
        if timeout_s > 0:
            request["expires"] = int(timeout_s * 1e9)
        await self._nc.publish(self._next_subject, json.dumps(request).encode(), reply=reply)
        deadline = time.monotonic() + timeout_s + self._GRACE_S
        while len(msgs) < batch:
            if queue.empty():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    msg = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                msg = queue.get_nowait()
            sub._pending_size -= len(msg.data)
            status = _status(msg)
            if not status:
                msgs.append(msg)
                continue
            if msg.subject != reply or status == "100":
                continue  # a late status of an earlier request, or a heartbeat
            if status in self._END:
                if status == "409":
                    log.debug("pull on %s ended: 409 %s", self.durable, _description(msg))
                break
            raise APIError.from_msg(msg)
        return msgs

    async def unsubscribe(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.unsubscribe()


def _status(msg: Msg) -> str | None:
    headers = msg.headers
    return headers.get("Status") if headers else None


def _description(msg: Msg) -> str:
    return (msg.headers or {}).get("Description", "")


async def ack_all(msgs: Sequence[Msg]) -> None:
    """Ack every message: plain publishes that nats-py's flusher sends together."""
    for msg in msgs:
        await msg.ack()


def delivery_count(msg: Msg) -> int:
    # Read straight from the ack subject: `$JS.ACK.<stream>.<consumer>.<delivered>...` (9
    # tokens) or, with a domain and account hash, `$JS.ACK.<domain>.<hash>.<stream>.<consumer>.
    # <delivered>...` (12 or more). msg.metadata builds a dataclass and a datetime per message.
    tokens = (msg.reply or "").split(".")
    try:
        if len(tokens) == 9:
            return int(tokens[4])
        if len(tokens) >= 11:
            return int(tokens[6])
        return int(msg.metadata.num_delivered)
    except Exception:
        return 1


class Publisher:
    """Pipelined JetStream publishes: many in flight, each with a deterministic Nats-Msg-Id, so a
    re-publish after a crash is dropped by the stream's duplicate window. `flush()` waits for every
    PubAck and raises if any publish failed, so callers commit only what the stream holds.

    Plain core publishes, each with its own reply subject under an inbox this publisher
    subscribes to while it has publishes in flight; the PubAcks are counted off that
    subscription's queue in bulk. nats-py's publish_async keeps a future, a random token and a
    callback per message (measured: ~18k msg/s against ~23k/s this way on the 2-core dev box,
    bench/raw.py)."""

    # PubAcks are drained (without waiting) once this many are outstanding, and publishing waits
    # for some when twice as many are: the server's replies must not pile up unread.
    _DRAIN_AT = 4_096

    def __init__(self, js: JetStreamContext, *, ack_timeout_s: float = 30) -> None:
        self._js = js
        self._nc: NATS = js._nc
        self._ack_timeout_s = ack_timeout_s
        self._sub: Subscription | None = None
        self._inbox = ""
        self._tokens = itertools.count()
        self._outstanding: set[str] = set()
        self._acked = 0
        self._errors: list[BaseException] = []
        self._lock = asyncio.Lock()

    async def publish(
        self, subject: str, payload: bytes, msg_id: str, headers: dict[str, str] | None = None
    ) -> None:
        hdrs = {MSG_ID: msg_id}
        if headers:
            hdrs.update(headers)
        if self._sub is None:
            self._inbox = self._nc.new_inbox()
            self._sub = await self._nc.subscribe(f"{self._inbox}.*", pending_msgs_limit=1_000_000)
        token = str(next(self._tokens))
        await self._nc.publish(subject, payload, reply=f"{self._inbox}.{token}", headers=hdrs)
        self._outstanding.add(token)
        if len(self._outstanding) >= self._DRAIN_AT:
            self._take_acks()
            if len(self._outstanding) >= 2 * self._DRAIN_AT:
                async with self._lock:
                    await self._wait_acks(len(self._outstanding) - self._DRAIN_AT)

    async def flush(self) -> int:
        """Wait for every PubAck; returns how many publishes the stream took since the last
        flush. Raises the first failure (PublishError; TimeoutError when PubAcks are missing)."""
        async with self._lock:
            try:
                await self._wait_acks(0)
            finally:
                sub, self._sub = self._sub, None
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                self._outstanding.clear()
            acked, self._acked = self._acked, 0
            errors, self._errors = self._errors, []
            if errors:
                raise errors[0]
            return acked

    def _take_acks(self) -> None:
        sub = self._sub
        if sub is None:
            return
        queue = sub._pending_queue
        while not queue.empty():
            self._count(queue.get_nowait())

    def _count(self, reply: Msg) -> None:
        assert self._sub is not None
        self._sub._pending_size -= len(reply.data)
        token = reply.subject.rpartition(".")[2]
        if token not in self._outstanding:
            return
        self._outstanding.discard(token)
        error = _puback_error(reply)
        if error is None:
            self._acked += 1
        else:
            self._errors.append(PublishError(error))

    async def _wait_acks(self, until: int) -> None:
        """Until at most `until` publishes await their PubAck."""
        sub = self._sub
        if sub is None:
            return
        queue = sub._pending_queue
        deadline = time.monotonic() + self._ack_timeout_s
        while len(self._outstanding) > until:
            if queue.empty():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(self._outstanding)} PubAcks missing")
                try:
                    reply = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    raise TimeoutError(f"{len(self._outstanding)} PubAcks missing") from None
            else:
                reply = queue.get_nowait()
            self._count(reply)


class PublishError(Exception):
    """The stream did not take a message (its PubAck was an error, or never came)."""


class _Waiter:
    """What callers await: one future for a group of publishes, settled when each has been acked
    at its source or has failed."""

    __slots__ = ("future", "left", "errors")

    def __init__(self, n: int) -> None:
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.left = n
        self.errors: dict[int, BaseException] = {}

    def settle(self, index: int, error: BaseException | None = None) -> None:
        if error is not None:
            self.errors[index] = error
        self.left -= 1
        if self.left == 0 and not self.future.done():  # a cancelled caller's future is done
            self.future.set_result(None)


class _Entry:
    __slots__ = ("subject", "payload", "headers", "source", "waiter", "index", "settled")

    def __init__(
        self,
        subject: str,
        payload: bytes,
        headers: dict[str, str],
        source: Msg,
        waiter: _Waiter,
        index: int,
    ) -> None:
        self.subject = subject
        self.payload = payload
        self.headers = headers
        self.source = source
        self.waiter = waiter
        self.index = index
        self.settled = False

    def settle(self, error: BaseException | None = None) -> None:
        if not self.settled:
            self.settled = True
            self.waiter.settle(self.index, error)


class AckAfterPublish:
    """Group commit of "publish a message, then ack the message it came from" (a result for its
    request): callers hand in pairs and await; one flusher publishes everything handed in
    meanwhile in one pipelined burst, and acks each source as soon as its PubAck says the stream
    holds the new message. Under load many messages share one round trip (and the burst grows
    while the previous one is out: self-clocking); alone, one costs what a publish-await-ack
    costs. `publish_many_then_ack` hands in a whole group for one await.

    Publishes are plain core publishes with a reply subject per message under one inbox whose
    queue the flusher drains itself: no future, timer or callback per message (nats-py's
    publish_async has all three). A publish that failed (refused, or no PubAck in time) leaves
    its source unacked, for the caller to nak."""

    def __init__(
        self, nc: NATS | JetStreamContext, *, ack_timeout_s: float = 30, max_burst: int = 4_000
    ) -> None:
        self._nc: NATS = nc._nc if isinstance(nc, JetStreamContext) else nc
        self._ack_timeout_s = ack_timeout_s
        self._max_burst = max_burst
        self._inbox = self._nc.new_inbox()
        self._tokens = itertools.count()
        self._sub: Subscription | None = None
        self._queue: list[_Entry] = []
        self._flusher: asyncio.Task[None] | None = None
        self.yield_every = YIELD_EVERY

    async def publish_then_ack(
        self,
        subject: str,
        payload: bytes,
        msg_id: str,
        source: Msg,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Returns once the message is in its stream and `source` is acked; raises if not."""
        hdrs = {MSG_ID: msg_id}
        if headers:
            hdrs.update(headers)
        waiter = _Waiter(1)
        self._queue.append(_Entry(subject, payload, hdrs, source, waiter, 0))
        await self._wait(waiter)
        if waiter.errors:
            raise waiter.errors[0]

    async def publish_many_then_ack(
        self, items: Sequence[tuple[str, bytes, str, Msg]]
    ) -> dict[int, BaseException]:
        """(subject, payload, msg_id, source) each; returns once every one is settled, with the
        failures by index (their sources are left unacked)."""
        if not items:
            return {}
        waiter = _Waiter(len(items))
        self._queue.extend(
            _Entry(subject, payload, {MSG_ID: msg_id}, source, waiter, i)
            for i, (subject, payload, msg_id, source) in enumerate(items)
        )
        await self._wait(waiter)
        return waiter.errors

    async def _wait(self, waiter: _Waiter) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_all())
        await waiter.future

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _flush_all(self) -> None:
        if self._sub is None:
            try:
                self._sub = await self._nc.subscribe(
                    f"{self._inbox}.*", pending_msgs_limit=1_000_000
                )
            except Exception as e:  # closed or draining: nobody waits forever
                burst, self._queue = self._queue, []
                for entry in burst:
                    entry.settle(e)
                return
        while self._queue:
            burst = self._queue[: self._max_burst]
            del self._queue[: self._max_burst]
            try:
                await self._flush(burst)
            except BaseException as e:
                for entry in burst:
                    entry.settle(e if isinstance(e, Exception) else PublishError(repr(e)))
                if not isinstance(e, Exception):
                    raise

    async def _flush(self, burst: list[_Entry]) -> None:
        sub = self._sub
        assert sub is not None
        waiting: dict[str, _Entry] = {}
        for n, entry in enumerate(burst, 1):
            if n % self.yield_every == 0:
                await asyncio.sleep(0)
            token = str(next(self._tokens))
            try:
                await self._nc.publish(
                    entry.subject,
                    entry.payload,
                    reply=f"{self._inbox}.{token}",
                    headers=entry.headers,
                )
            except Exception as e:
                entry.settle(e)
                continue
            waiting[token] = entry
        queue = sub._pending_queue
        deadline = time.monotonic() + self._ack_timeout_s
        taken = 0
        while waiting:
            if queue.empty():
                remaining = deadline - time.monotonic()
                try:
                    if remaining <= 0:
                        raise TimeoutError
                    reply = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    for entry in waiting.values():
                        entry.settle(PublishError("no PubAck in time"))
                    return
            else:
                reply = queue.get_nowait()
                taken += 1
                if taken % self.yield_every == 0:
                    await asyncio.sleep(0)
            sub._pending_size -= len(reply.data)
            token = reply.subject.rpartition(".")[2]
            if token not in waiting:
                continue  # the PubAck of a burst that gave up waiting
            entry = waiting.pop(token)
            error = _puback_error(reply)
            if error is not None:
                entry.settle(PublishError(error))
                continue
            try:
                # Acked even if the caller gave up waiting: the new message is in the stream.
                await entry.source.ack()
            except Exception as e:
                entry.settle(e)
                continue
            entry.settle()


def _puback_error(reply: Msg) -> str | None:
    status = _status(reply)
    if status:  # 503: no stream listens on the subject
        return f"{status} {_description(reply)}".strip()
    if b'"error"' in reply.data:
        with contextlib.suppress(ValueError):
            return str(json.loads(reply.data).get("error"))
        return reply.data.decode(errors="replace")
    return None
