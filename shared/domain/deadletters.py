"""Dead letters: messages set aside because they could not be processed, kept in table
`dead_letters` (infra/migrations/002_dead_letters.sql) with their payload, error and delivery
count, for an operator to list and replay (README: Dead letters).

Recording is idempotent per stored message (source stream + sequence), so a rejection retried
after a crash records one dead letter. A consumer runner (shared.consumer) records what its
handlers reject through one of the two sinks at the end: `InDatabase` for services with a
database, `OnBus` (DEADLETTERS, recorded by the watchdog) for those without."""

from __future__ import annotations

import logging
import time

import asyncpg
import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from schemas.messages import DeadLetterMessage, LineKey
from shared import bus

log = logging.getLogger(__name__)

_line_key = msgspec.json.Decoder(LineKey)


def line_key(payload: bytes) -> LineKey:
    """The batch line a payload names, as far as it can be read."""
    try:
        return _line_key.decode(payload)
    except msgspec.DecodeError:
        return LineKey()


def _text(value: str | None) -> str | None:
    # PostgreSQL text and jsonb cannot hold NUL, and a rejected message may be rejected for
    # exactly that: keep it readable rather than lose the dead letter.
    return value.replace("\x00", "\ufffd") if value is not None else None


async def record(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    source: str,
    subject: str,
    payload: bytes,
    error: str,
    deliveries: int = 1,
    stream_seq: int | None = None,
    consumer: str | None = None,
    headers: dict[str, str] | None = None,
) -> int:
    """Insert a dead letter; returns its id (the earlier one's if this message was recorded
    before)."""
    key = line_key(payload)
    row = await conn.fetchrow(
        """
        INSERT INTO dead_letters (created_at, source, stream_seq, consumer, subject, headers,
                                  payload, error, deliveries, batch_id, custom_id, line,
                                  project_id)
        VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10, $11, $12,
                coalesce((SELECT project_id FROM batches WHERE id = $10), 'proj_default'))
        ON CONFLICT (source, stream_seq) WHERE stream_seq IS NOT NULL
        DO UPDATE SET deliveries = greatest(dead_letters.deliveries, EXCLUDED.deliveries)
        RETURNING id, (xmax = 0) AS inserted
        """,
        int(time.time()),
        source,
        stream_seq,
        consumer,
        _text(subject),
        (
            msgspec.json.encode({_text(k): _text(v) for k, v in headers.items()}).decode()
            if headers
            else None
        ),
        payload,
        _text(error[:4000]),
        deliveries,
        _text(key.batch_id),
        _text(key.custom_id),
        key.line,
    )
    assert row is not None
    dead_letter_id: int = row["id"]
    if row["inserted"]:
        log.error(
            "dead letter %d: %s seq %s (%s) batch_id=%s custom_id=%s after %d deliveries: %s",
            dead_letter_id, source, stream_seq, subject, key.batch_id, key.custom_id,
            deliveries, error,
        )  # fmt: skip
    return dead_letter_id


async def record_msg(conn: asyncpg.Connection | asyncpg.Pool, msg: Msg, error: str) -> int:
    """Record a JetStream message this process received and rejects."""
    try:
        meta = msg.metadata
        stream, seq, consumer = meta.stream, meta.sequence.stream, meta.consumer
        deliveries = int(meta.num_delivered)
    except Exception:  # not a JetStream message
        stream, seq, consumer, deliveries = "", None, None, 1
    return await record(
        conn,
        source=stream,
        subject=msg.subject,
        payload=msg.data,
        error=error,
        deliveries=deliveries,
        stream_seq=seq,
        consumer=consumer,
        headers=dict(msg.headers) if msg.headers else None,
    )


class InDatabase:
    """Rejected messages recorded straight into table `dead_letters`."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def __call__(self, msg: Msg, reason: str) -> None:
        await record_msg(self._pool, msg, reason)


class OnBus:
    """Rejected messages handed to the watchdog on DEADLETTERS, which records them: for
    services without a database (an inference worker)."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def __call__(self, msg: Msg, reason: str) -> None:
        meta = msg.metadata
        letter = DeadLetterMessage(
            stream=meta.stream,
            stream_seq=meta.sequence.stream,
            consumer=meta.consumer,
            original_subject=msg.subject,
            payload=msg.data,
            error=reason,
            deliveries=int(meta.num_delivered),
            headers=dict(msg.headers) if msg.headers else None,
        )
        publisher = bus.Publisher(self._js)
        await publisher.publish(
            DeadLetterMessage.subject_for(letter.stream),
            msgspec.json.encode(letter),
            letter.msg_id,
        )
        await publisher.flush()
