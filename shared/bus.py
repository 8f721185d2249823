"""NATS JetStream plumbing: connection, the streams (declared once, created idempotently), a
pipelined publisher with deterministic message ids, and batched pull consumption."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
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
from nats.js.errors import BadRequestError, NotFoundError

log = logging.getLogger(__name__)

MSG_ID = "Nats-Msg-Id"
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
STREAMS = (REQUESTS, RESULTS, EVENTS)

WORKERS_BUCKET = "jetbatch_workers"
WORKERS_TTL_S = 300


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


async def fetch(
    sub: JetStreamContext.PullSubscription, batch: int, timeout_s: float
) -> list[Msg]:
    """Up to `batch` messages; [] when none arrived within the timeout."""
    try:
        return await sub.fetch(batch, timeout=timeout_s)
    except (nats.errors.TimeoutError, asyncio.TimeoutError):
        return []


def delivery_count(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered)
    except Exception:
        return 1


class Publisher:
    """Pipelined JetStream publishes: many in flight, each with a deterministic Nats-Msg-Id, so a
    re-publish after a crash is dropped by the stream's duplicate window. `flush()` waits for every
    PubAck and raises if any publish failed, so callers commit only what the stream holds."""

    def __init__(self, js: JetStreamContext, *, ack_timeout_s: float = 30) -> None:
        self._js = js
        self._ack_timeout_s = ack_timeout_s
        self._pending: list[asyncio.Future] = []

    async def publish(
        self, subject: str, payload: bytes, msg_id: str, headers: dict[str, str] | None = None
    ) -> None:
        hdrs = {MSG_ID: msg_id}
        if headers:
            hdrs.update(headers)
        # wait_stall=None unless nats-py's pending-ack window (4,000) is nearly full: with a
        # timeout, asyncio wraps the wait in a task that yields on every publish, so each message
        # goes out in its own socket write (measured 3.8k/s against 27.9k/s without).
        stall = None if self._js.publish_async_pending() < 3_900 else 60
        future = await self._js.publish_async(subject, payload, headers=hdrs, wait_stall=stall)
        self._pending.append(future)

    async def flush(self) -> int:
        pending, self._pending = self._pending, []
        if not pending:
            return 0
        results = await asyncio.wait_for(
            asyncio.gather(*pending, return_exceptions=True), self._ack_timeout_s
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        return len(results)
