"""The watchdog's SQL: what it finds in `batches` (and expired `files`) every round, and the marks
it leaves there.

Every change is one conditional UPDATE, so a watchdog racing the results writer or a second
watchdog can never move a batch backwards."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from shared.db import BATCH_CLAIM_NS

OPEN_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")


async def expire_due(conn: asyncpg.Connection, now: int) -> list[str]:
    """in_progress batches past expires_at and not fully accounted: mark them expiring (their
    unfinished lines will become batch_expired lines, then they finalize to `expired`)."""
    rows = await conn.fetch(
        """
        UPDATE batches SET ending = 'expired', ending_at = $1, updated_at = $1
        WHERE status = 'in_progress' AND ending IS NULL AND expires_at <= $1
          AND (total = 0 OR completed + failed < total)
        RETURNING id
        """,
        now,
    )
    return [r["id"] for r in rows]


@dataclass(frozen=True, slots=True)
class Stopping:
    """A batch whose remaining requests must not run."""

    batch_id: str
    reason: str  # cancelled | expired
    since: int
    closed_out: bool


async def stopping(conn: asyncpg.Connection) -> list[Stopping]:
    rows = await conn.fetch(
        """
        SELECT id, status, cancelling_at, ending_at, closed_out_at FROM batches
        WHERE status = 'cancelling' OR (status = 'in_progress' AND ending = 'expired')
        ORDER BY id
        """
    )
    return [
        Stopping(
            batch_id=r["id"],
            reason="cancelled" if r["status"] == "cancelling" else "expired",
            since=(r["cancelling_at"] if r["status"] == "cancelling" else r["ending_at"]) or 0,
            closed_out=r["closed_out_at"] is not None,
        )
        for r in rows
    ]


async def redrive_due(conn: asyncpg.Connection, before: int) -> list[str]:
    """Batches an api should have validated and published by now: still `validating` since
    before `before`, or in progress without `published_at` since then and claimed by no api (a
    batch waits for dispatch as long as its place in the queue says, in the claim of the api
    dispatching it; one whose api died has no claim: PostgreSQL dropped it with the session)."""
    rows = await conn.fetch(
        """
        SELECT id FROM batches b
        WHERE (status = 'validating' AND created_at <= $1)
           OR (status = 'in_progress' AND ending IS NULL AND published_at IS NULL
               AND in_progress_at <= $1
               AND NOT EXISTS (
                   SELECT 1 FROM pg_locks l
                   WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                     AND l.classid = $2::bigint::oid AND l.objid = hashtext(b.id)::oid))
        ORDER BY id
        """,
        before,
        BATCH_CLAIM_NS,
    )
    return [r["id"] for r in rows]


async def flag_stalled(conn: asyncpg.Connection, now: int, stall_s: float) -> list[str]:
    """Open batches without progress (updated_at) for stall_s: set stalled_at. Returns them."""
    rows = await conn.fetch(
        """
        UPDATE batches SET stalled_at = $1
        WHERE status = ANY($2::text[]) AND stalled_at IS NULL AND updated_at <= $1 - $3::bigint
        RETURNING id
        """,
        now,
        OPEN_STATUSES,
        int(stall_s),
    )
    return [r["id"] for r in rows]


async def clear_stalled(conn: asyncpg.Connection) -> list[str]:
    """Flagged batches that moved on (progress since the flag, or closed): clear the flag."""
    rows = await conn.fetch(
        """
        UPDATE batches SET stalled_at = NULL
        WHERE stalled_at IS NOT NULL
          AND (status <> ALL($1::text[]) OR updated_at > stalled_at)
        RETURNING id
        """,
        OPEN_STATUSES,
    )
    return [r["id"] for r in rows]


# Retention (README: Retention) ----------------------------------------------------------------


async def expired_files(conn: asyncpg.Connection, now: int, limit: int) -> list[str]:
    """Files past expires_at, oldest first, but not the input file of a batch that has not
    ended: it is kept until the batch ends (the delete checks again, under the file's lock)."""
    rows = await conn.fetch(
        """
        SELECT f.id FROM files f
        WHERE f.deleted_at IS NULL AND f.expires_at <= $1
          AND NOT EXISTS (SELECT 1 FROM batches b
                          WHERE b.input_file_id = f.id AND b.status = ANY($2::text[]))
        ORDER BY f.expires_at, f.id
        LIMIT $3
        """,
        now,
        OPEN_STATUSES,
        limit,
    )
    return [r["id"] for r in rows]


async def unpruned_batches(conn: asyncpg.Connection, limit: int) -> list[str]:
    """Ended batches whose request_results rows have not been pruned: those that ended before
    pruning existed (an upgraded deployment) and any the results writer did not finalize
    (failed in validation)."""
    rows = await conn.fetch(
        """
        SELECT id FROM batches
        WHERE results_pruned_at IS NULL AND status <> ALL($1::text[])
        ORDER BY id
        LIMIT $2
        """,
        OPEN_STATUSES,
        limit,
    )
    return [r["id"] for r in rows]


async def forget_old_rate_windows(conn: asyncpg.Connection, now: float) -> int:
    """Delete the rate-limit windows (`rate_usage`, services/api/rate_limits.py) that ended more
    than a day ago."""
    deleted: str = await conn.execute(
        "DELETE FROM rate_usage WHERE window_start < $1", int(now) - 2 * 86_400
    )
    return int(deleted.split()[-1])


# Idempotency keys (README: Idempotency) answer repeats for 24 h, then go.
IDEMPOTENCY_KEEP_S = 86_400


async def forget_old_idempotency_keys(conn: asyncpg.Connection, now: float) -> int:
    status = await conn.execute(
        "DELETE FROM idempotency_keys WHERE created_at < $1", int(now - IDEMPOTENCY_KEEP_S)
    )
    return int(status.split()[-1])
