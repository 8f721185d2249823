"""The streams (declared once, created idempotently), the KV buckets, the connection and durable
consumers. Subjects come from the message types in schemas.messages."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import nats
from nats.aio.client import Client as NATS
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

from schemas.messages import (
    DeadLetterMessage,
    MaxDeliveriesAdvisory,
    RequestMessage,
    ResultMessage,
)

log = logging.getLogger(__name__)

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
REQUESTS = Stream("REQUESTS", (RequestMessage.filter_subject(),), RetentionPolicy.WORK_QUEUE)
# Limits: the results writer reads everything; other services may read their own batch's subject.
RESULTS = Stream(
    "RESULTS", (ResultMessage.filter_subject(),), RetentionPolicy.LIMITS, max_age_s=7 * DAY_S
)
# Families: every event type's and every command's subject is under them.
EVENTS = Stream("EVENTS", ("jetbatch.events.>",), RetentionPolicy.LIMITS, max_age_s=30 * DAY_S)
# Work queue: the watchdog's orders to the api (re-drive, close out); stale orders are useless.
CONTROL = Stream("CONTROL", ("jetbatch.control.>",), RetentionPolicy.WORK_QUEUE, max_age_s=3_600)
# Work queue read by the watchdog, which records each message in table `dead_letters`: rejected
# messages of services without a database, and JetStream's own advisories of requests that
# reached max deliveries (captured here so none is missed while the watchdog is down).
DEADLETTERS = Stream(
    "DEADLETTERS",
    (
        DeadLetterMessage.filter_subject(),
        MaxDeliveriesAdvisory.filter_subject(stream="REQUESTS"),
    ),
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


async def durable_consumer(
    js: JetStreamContext,
    stream: Stream,
    durable: str,
    filter_subject: str | None,
    *,
    ack_wait_s: float,
    max_deliver: int,
    max_ack_pending: int,
) -> None:
    """A durable pull consumer, created or updated to this config (None: the whole stream)."""
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
