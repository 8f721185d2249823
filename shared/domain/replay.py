"""Replaying a dead letter (README: Dead letters): its message published again, as it was, to its
subject, and the dead letter marked replayed, in one transaction. Each role may publish only its
own subjects (shared/nats_auth.py), so a replay is done by the role that may publish there: the
api replays requests itself; results and control messages, which only the watchdog may publish,
the api asks the watchdog to replay (core NATS request/reply on REPLAY_SUBJECT, queue group
`watchdog`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import asyncpg
import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shared import bus
from shared.nats_auth import WATCHDOG_REPLAY

log = logging.getLogger(__name__)

REPLAY_SUBJECT = WATCHDOG_REPLAY
REPLAY_TIMEOUT_S = 10.0
# Where the watchdog replays (the api may not publish there).
BY_WATCHDOG = frozenset({bus.RESULTS.name, bus.CONTROL.name})


class ReplayRequest(msgspec.Struct, frozen=True):
    dead_letter_id: int


class ReplayReply(msgspec.Struct, frozen=True, omit_defaults=True):
    error: str | None = None  # None: replayed


async def replay(conn: asyncpg.Connection, js: JetStreamContext, row: Any) -> asyncpg.Record:
    """Publish the dead letter's message again and mark it replayed, in one transaction. A
    request whose batch is still in progress gets its dead-lettered error line withdrawn first,
    so the replayed request's result takes its place."""
    headers = {
        k: v
        for k, v in (msgspec.json.decode(row["headers"]) if row["headers"] else {}).items()
        if k.lower() != bus.MSG_ID.lower()
    }
    async with conn.transaction():
        reopened = False
        if row["batch_id"] and row["custom_id"] and row["source"] == bus.REQUESTS.name:
            reopened = await reopen_dead_lettered_line(conn, row["batch_id"], row["custom_id"])
        # Published before the commit: if the publish fails nothing changed; if the commit
        # fails, the message is handled and its replay is not recorded.
        publisher = bus.Publisher(js)
        await publisher.publish(
            row["subject"],
            bytes(row["payload"]),
            f"replay:{row['id']}:{row['replay_count'] + 1}",
            headers or None,
        )
        await publisher.flush()
        updated = await conn.fetchrow(
            "UPDATE dead_letters SET replayed_at = $2, replay_count = replay_count + 1"
            " WHERE id = $1 RETURNING *, length(payload) AS payload_bytes",
            row["id"], int(time.time()),
        )  # fmt: skip
    log.info(
        "dead letter %d replayed to %s (batch_id=%s custom_id=%s, error line withdrawn: %s)",
        row["id"], row["subject"], row["batch_id"], row["custom_id"], reopened,
    )  # fmt: skip
    assert updated is not None
    return updated


async def reopen_dead_lettered_line(
    conn: asyncpg.Connection, batch_id: str, custom_id: str
) -> bool:
    """If the line's batch is still in progress and the line is the error line its dead letter
    made, remove that line (and its count). Must run in the replay's transaction."""
    row = await conn.fetchrow(
        """
        WITH b AS MATERIALIZED (
            SELECT id FROM batches
            WHERE id = $1 AND status = 'in_progress' AND ending IS NULL
            FOR UPDATE
        ), gone AS (
            DELETE FROM request_results r USING b
            WHERE r.batch_id = b.id AND r.custom_id = $2 AND r.error_code = 'dead_lettered'
            RETURNING 1
        )
        UPDATE batches SET failed = failed - 1, updated_at = $3
        FROM b WHERE batches.id = b.id AND EXISTS (SELECT 1 FROM gone)
        RETURNING batches.id
        """,
        batch_id, custom_id, int(time.time()),
    )  # fmt: skip
    return row is not None


async def serve(nc: Any, pool: asyncpg.Pool, js: JetStreamContext) -> None:
    """The watchdog's side: replay what the api asks for, and answer when it is done."""

    async def on_request(msg: Msg) -> None:
        try:
            wanted = msgspec.json.decode(msg.data, type=ReplayRequest)
            async with pool.acquire() as conn:
                row = await conn.fetchrow(
                    "SELECT * FROM dead_letters WHERE id = $1", wanted.dead_letter_id
                )
                if row is None:
                    reply = ReplayReply(error=f"no dead letter {wanted.dead_letter_id}")
                else:
                    await replay(conn, js, row)
                    reply = ReplayReply()
        except Exception as e:
            log.exception("replay asked by the api failed")
            reply = ReplayReply(error=f"{type(e).__name__}: {e}")
        await msg.respond(msgspec.json.encode(reply))

    await nc.subscribe(REPLAY_SUBJECT, queue="watchdog", cb=on_request)
