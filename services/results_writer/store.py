"""SQL of the results writer: bulk result writes, batch counters, and finalization."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from schemas.projects import DEFAULT_PROJECT_ID

# Results are written only while a batch can still change. `validating` is included because the
# api publishes requests while it is still reading the file, so results may beat the status
# change. A batch in `finalizing` or a terminal status has every line accounted for (or none
# wanted): a late result for it must not change counts that files and events already reflect,
# nor come back as a row once a finished batch's rows have been pruned (shared/domain/retention).
WRITABLE_STATUSES = ("validating", "in_progress", "cancelling")
# A fully accounted batch in one of these is finalized by the results writer.
FINALIZABLE_STATUSES = ("in_progress", "cancelling")

RESULT_COLUMNS = (
    "batch_id",
    "custom_id",
    "line",
    "ok",
    "status_code",
    "request_id",
    "response_body",
    "error_code",
    "error_message",
    "input_tokens",
    "cached_tokens",
    "output_tokens",
    "finished_at",
    "gpu_ms",
)
# One request_results row, in RESULT_COLUMNS order, then the project the result claims (checked
# against its batch's, not stored). finished_at (unix seconds) None: the write's.
ResultRecord = tuple[
    str,
    str,
    int,
    bool,
    int,
    str,
    str | None,
    str | None,
    str | None,
    int,
    int,
    int,
    int | None,
    int,
    str,
]

# Two-key advisory locks: this namespace + hashtext(batch_id). A hash collision only makes a
# finalizer skip a batch until the next sweep.
_FINALIZE_LOCK_NS = 0x72777269  # "rwri"

# The fetch's rows arrive as one array per column (RESULT_COLUMNS order) and are unnested in the
# statement itself. Measured against COPY into a temporary table created and dropped per
# transaction: PostgreSQL's CPU for a 50,000-line batch 2.2-2.6 s -> 1.2-1.5 s (bench
# orchestration, alternating runs).
_INCOMING = """
incoming_results AS MATERIALIZED (
    SELECT * FROM unnest(
        $3::text[], $4::text[], $5::int[], $6::bool[], $7::int[], $8::text[], $9::text[],
        $10::text[], $11::text[], $12::int[], $13::int[], $14::int[], $15::bigint[],
        $16::bigint[], $17::text[]
    ) AS i(batch_id, custom_id, line, ok, status_code, request_id, response_body, error_code,
           error_message, input_tokens, cached_tokens, output_tokens, finished_at, gpu_ms,
           project)
)
"""

# One statement per fetch:
# - lock the touched batches in id order, so concurrent writers sharing batches queue up
#   instead of deadlocking, and so counters and status are read at their latest version;
# - insert only rows whose batch exists and is writable, in key order (same reason);
# - add to each batch exactly what was inserted: a redelivered result conflicts, is not
#   returned, and so is not counted twice;
# - report every touched batch, so the caller can finalize those now fully accounted.
_APPLY_RESULTS = (
    "WITH"
    + _INCOMING
    + """, touched AS MATERIALIZED (
    SELECT id, status, total, completed, failed, project_id
    FROM batches
    WHERE id IN (SELECT DISTINCT batch_id FROM incoming_results)
      AND status = ANY($1::text[])
    ORDER BY id
    FOR UPDATE
), inserted AS (
    INSERT INTO request_results (batch_id, custom_id, line, ok, status_code, request_id,
                                 response_body, error_code, error_message, input_tokens,
                                 cached_tokens, output_tokens, finished_at, gpu_ms)
    SELECT i.batch_id, i.custom_id, i.line, i.ok, i.status_code, i.request_id, i.response_body,
           i.error_code, i.error_message, i.input_tokens, i.cached_tokens, i.output_tokens,
           coalesce(i.finished_at, $2), i.gpu_ms
    -- A result claiming another project than its batch's is not that batch's: skipped.
    FROM incoming_results i JOIN touched t ON t.id = i.batch_id AND t.project_id = i.project
    ORDER BY i.batch_id, i.custom_id
    ON CONFLICT (batch_id, custom_id) DO NOTHING
    RETURNING batch_id, ok, input_tokens, cached_tokens, output_tokens, gpu_ms
), counts AS (
    SELECT batch_id,
           count(*) FILTER (WHERE ok) AS completed,
           count(*) FILTER (WHERE NOT ok) AS failed,
           sum(input_tokens) AS input_tokens,
           sum(cached_tokens) AS cached_tokens,
           sum(output_tokens) AS output_tokens,
           sum(gpu_ms) AS gpu_ms
    FROM inserted
    GROUP BY batch_id
), updated AS (
    UPDATE batches b
    SET completed = b.completed + c.completed,
        failed = b.failed + c.failed,
        input_tokens = b.input_tokens + c.input_tokens,
        cached_tokens = b.cached_tokens + c.cached_tokens,
        output_tokens = b.output_tokens + c.output_tokens,
        gpu_ms = b.gpu_ms + c.gpu_ms,
        updated_at = $2
    FROM counts c
    WHERE b.id = c.batch_id
    RETURNING b.id, b.completed, b.failed, c.completed + c.failed AS inserted
)
SELECT t.id, t.status, t.total,
       coalesce(u.completed, t.completed) + coalesce(u.failed, t.failed) AS done,
       coalesce(u.inserted, 0)::int AS inserted
FROM touched t LEFT JOIN updated u ON u.id = t.id
"""
)


@dataclass(frozen=True, slots=True)
class Touched:
    """A batch that received results in one write, as it stands after the write."""

    batch_id: str
    status: str
    total: int
    done: int  # completed + failed
    inserted: int  # rows this write added (0: every result for it was a duplicate)

    @property
    def fully_accounted(self) -> bool:
        return self.total > 0 and self.done >= self.total and self.status in FINALIZABLE_STATUSES


async def write_results(
    conn: asyncpg.Connection, records: Sequence[ResultRecord], now: int
) -> list[Touched]:
    """Write results in one transaction; returns the writable batches they belong to."""
    columns = list(zip(*records, strict=True)) if records else [()] * (len(RESULT_COLUMNS) + 1)
    async with conn.transaction():
        rows = await conn.fetch(_APPLY_RESULTS, WRITABLE_STATUSES, now, *columns)
    return [Touched(r["id"], r["status"], r["total"], r["done"], r["inserted"]) for r in rows]


async def finalizable_batch_ids(conn: asyncpg.Connection) -> list[str]:
    """Batches to finalize: fully accounted and open, or left in `finalizing` by a crash (or
    being finalized right now by another writer: the advisory lock sorts that out)."""
    rows = await conn.fetch(
        """
        SELECT id FROM batches
        WHERE status = 'finalizing'
           OR (status = ANY($1::text[]) AND total > 0 AND completed + failed >= total)
           OR (status = 'cancelling' AND closed_out_at IS NOT NULL)
        ORDER BY id
        """,
        FINALIZABLE_STATUSES,
    )
    return [r["id"] for r in rows]


async def start_finalizing(conn: asyncpg.Connection, batch_id: str, now: int) -> bool:
    """in_progress -> finalizing, if fully accounted. Conditional, so of several writers racing
    for the same batch exactly one moves it."""
    row = await conn.fetchrow(
        """
        UPDATE batches
        SET status = 'finalizing', finalizing_at = $2, updated_at = $2
        WHERE id = $1 AND status = 'in_progress' AND ending IS NULL
          AND total > 0 AND completed + failed >= total
        RETURNING id
        """,
        batch_id,
        now,
    )
    return row is not None


async def try_finalize_lock(conn: asyncpg.Connection, batch_id: str) -> bool:
    """Held until the end of the current transaction; released by PostgreSQL if we die, so a
    crashed finalizer never blocks the next one. Only one process writes a batch's files."""
    locked: bool = await conn.fetchval(
        "SELECT pg_try_advisory_xact_lock($1, hashtext($2))", _FINALIZE_LOCK_NS, batch_id
    )
    return locked


@dataclass(frozen=True, slots=True)
class BatchToFinalize:
    id: str
    status: str
    total: int
    completed: int
    failed: int
    metadata_json: str | None
    output_expires_after: int | None
    # 'expired': the watchdog found it past expires_at; it closes as `expired`, not `completed`
    ending: str | None = None
    closed_out_at: int | None = None  # every line has a row (cancelled/expired batches)
    project_id: str = DEFAULT_PROJECT_ID


async def load_batch(conn: asyncpg.Connection, batch_id: str) -> BatchToFinalize | None:
    row = await conn.fetchrow(
        """
        SELECT id, status, total, completed, failed, metadata::text AS metadata_json,
               output_expires_after, ending, closed_out_at, project_id
        FROM batches WHERE id = $1
        """,
        batch_id,
    )
    return None if row is None else BatchToFinalize(**dict(row))


async def iter_results(
    conn: asyncpg.Connection, batch_id: str, chunk: int
) -> AsyncIterator[list[asyncpg.Record]]:
    """A batch's results in line order, `chunk` rows at a time, through a server-side cursor:
    memory stays bounded whatever the batch size. Must run inside a transaction."""
    cursor = await conn.cursor(
        """
        SELECT custom_id, ok, status_code, request_id, response_body, error_code, error_message
        FROM request_results WHERE batch_id = $1
        ORDER BY line
        """,
        batch_id,
    )
    while rows := await cursor.fetch(chunk):
        yield rows


async def upsert_output_file(
    conn: asyncpg.Connection,
    file_id: str,
    filename: str,
    size: int,
    now: int,
    expires_at: int | None,
    batch_id: str,
) -> None:
    # A re-finalization after a crash rewrites the same bytes under the same id: keep the
    # first row's created_at, refresh the size in case the first write never got this far.
    # The file belongs to the batch's project.
    await conn.execute(
        """
        INSERT INTO files (id, bytes, created_at, expires_at, filename, purpose, status,
                           storage_key, project_id)
        SELECT $1, $2, $3, $4, $5, 'batch_output', 'processed', $1, b.project_id
        FROM batches b WHERE b.id = $6
        ON CONFLICT (id) DO UPDATE SET bytes = EXCLUDED.bytes
        """,
        file_id,
        size,
        now,
        expires_at,
        filename,
        batch_id,
    )


async def finish_batch(
    conn: asyncpg.Connection,
    batch_id: str,
    from_status: str,
    now: int,
    output_file_id: str | None,
    error_file_id: str | None,
) -> bool:
    """finalizing -> completed, cancelling -> cancelled, or in_progress (an expiring batch) ->
    expired. False if the status moved on."""
    params: list[Any] = [batch_id, from_status, now, output_file_id, error_file_id]
    if from_status == "in_progress":
        sql = """
            UPDATE batches SET status = 'expired', expired_at = $3, updated_at = $3,
                               output_file_id = $4, error_file_id = $5
            WHERE id = $1 AND status = $2 AND ending = 'expired'
            RETURNING id
        """
    elif from_status == "cancelling":
        sql = """
            UPDATE batches SET status = 'cancelled', cancelled_at = $3, updated_at = $3,
                               output_file_id = $4, error_file_id = $5
            WHERE id = $1 AND status = $2
            RETURNING id
        """
    else:
        sql = """
            UPDATE batches SET status = 'completed', completed_at = $3, updated_at = $3,
                               output_file_id = $4, error_file_id = $5
            WHERE id = $1 AND status = $2
            RETURNING id
        """
    return await conn.fetchrow(sql, *params) is not None
