"""The api's SQL: rows of `files` and `batches`, and the OpenAI objects built from them.

Batch state changes are single conditional UPDATEs (`WHERE status = ...`), so a concurrent
cancel, a re-run of `process_batch` or another api replica can never move a batch backwards.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeAlias

import asyncpg
import msgspec

from schemas.openai import (
    Batch,
    BatchError,
    BatchErrors,
    BatchUsage,
    InputTokensDetails,
    OpenAIFile,
    RequestCounts,
)
from shared.db import BATCH_CLAIM_NS
from shared.errors import NotFound

Order = Literal["asc", "desc"]
Row: TypeAlias = asyncpg.Record
Db: TypeAlias = asyncpg.Pool | asyncpg.Connection  # a pool, or a connection in a transaction

_errors_decoder = msgspec.json.Decoder(BatchErrors | list[BatchError])
_metadata_decoder = msgspec.json.Decoder(dict[str, str])


def now_s() -> int:
    return int(time.time())


# Files ---------------------------------------------------------------------------------------


def file_from_row(row: Row) -> OpenAIFile:
    return OpenAIFile(
        id=row["id"],
        bytes=row["bytes"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        filename=row["filename"],
        purpose=row["purpose"],
        status=row["status"],
        status_details=row["status_details"],
    )


async def insert_file(
    pool: asyncpg.Pool,
    *,
    file_id: str,
    size: int,
    created_at: int,
    expires_at: int | None,
    filename: str,
    purpose: str,
    storage_key: str,
    line_count: int | None,
    models: list[str] | None,
    project_id: str,
) -> Row:
    row = await pool.fetchrow(
        "INSERT INTO files (id, bytes, created_at, expires_at, filename, purpose, status,"
        " storage_key, line_count, models, project_id)"
        " VALUES ($1, $2, $3, $4, $5, $6, 'processed', $7, $8, $9, $10) RETURNING *",
        file_id, size, created_at, expires_at, filename, purpose, storage_key, line_count, models,
        project_id,
    )  # fmt: skip
    assert row is not None
    return row


# `project`: the caller's scope (services/api/auth.py Caller.scope); None = every project.
# Another project's row is not found, exactly as an unknown id is not.
_IN_PROJECT = "($2::text IS NULL OR project_id = $2)"


async def get_file(pool: asyncpg.Pool, file_id: str, project: str | None = None) -> Row | None:
    return await pool.fetchrow(
        f"SELECT * FROM files WHERE id = $1 AND deleted_at IS NULL AND {_IN_PROJECT}",
        file_id, project,
    )  # fmt: skip


async def file_cursor(pool: asyncpg.Pool, file_id: str, project: str | None) -> int | None:
    """created_at of a pagination cursor; a deleted file still works as one."""
    value: int | None = await pool.fetchval(
        f"SELECT created_at FROM files WHERE id = $1 AND {_IN_PROJECT}", file_id, project
    )
    return value


async def list_files(
    pool: asyncpg.Pool,
    *,
    purpose: str | None,
    limit: int,
    order: Order,
    after: tuple[int, str] | None,
    project: str | None,
) -> tuple[list[Row], bool]:
    """One page, keyset-paginated on (created_at, id). Returns (rows, has_more)."""
    cmp, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
    after_at, after_id = after if after is not None else (None, None)
    rows = await pool.fetch(
        "SELECT * FROM files WHERE deleted_at IS NULL"
        " AND ($1::text IS NULL OR purpose = $1)"
        f" AND ($2::bigint IS NULL OR (created_at, id) {cmp} ($2::bigint, $3::text))"
        " AND ($5::text IS NULL OR project_id = $5)"
        f" ORDER BY created_at {direction}, id {direction} LIMIT $4",
        purpose, after_at, after_id, limit + 1, project,
    )  # fmt: skip
    return rows[:limit], len(rows) > limit


# Deleting a file (and its copies) is shared with the watchdog's expiry:
# shared/domain/retention.py delete_file.


# Batches -------------------------------------------------------------------------------------


def _decode_errors(value: Any) -> BatchErrors | None:
    if value is None:
        return None
    decoded = _errors_decoder.decode(value)
    errors = decoded if isinstance(decoded, BatchErrors) else BatchErrors(data=decoded)
    return errors if errors.data else None


def batch_from_row(row: Row) -> Batch:
    metadata = row["metadata"]
    waiting = row["status"] == "in_progress" and row.get("ending") is None
    return Batch(
        id=row["id"],
        endpoint=row["endpoint"],
        model=row["model"],
        errors=_decode_errors(row["errors"]),
        input_file_id=row["input_file_id"],
        completion_window=row["completion_window"],
        status=row["status"],
        output_file_id=row["output_file_id"],
        error_file_id=row["error_file_id"],
        created_at=row["created_at"],
        in_progress_at=row["in_progress_at"],
        expires_at=row["expires_at"],
        finalizing_at=row["finalizing_at"],
        completed_at=row["completed_at"],
        failed_at=row["failed_at"],
        expired_at=row["expired_at"],
        cancelling_at=row["cancelling_at"],
        cancelled_at=row["cancelled_at"],
        request_counts=RequestCounts(
            total=row["total"], completed=row["completed"], failed=row["failed"]
        ),
        usage=BatchUsage(
            input_tokens=row["input_tokens"],
            output_tokens=row["output_tokens"],
            total_tokens=row["input_tokens"] + row["output_tokens"],
            input_tokens_details=InputTokensDetails(cached_tokens=row["cached_tokens"]),
        ),
        metadata=_metadata_decoder.decode(metadata) if metadata is not None else None,
        # Kept current by the webhook notifier (infra/migrations/003_webhooks.sql).
        webhook_status=row.get("webhook_status"),
        webhook_attempts=row.get("webhook_attempts") or 0,
        webhook_error=row.get("webhook_error"),
        stalled_at=row.get("stalled_at"),
        gpu_seconds=(row.get("gpu_ms") or 0) / 1000,
        priority=row.get("priority") or 0,
        # Only while it waits for dispatch (a batch cancelled meanwhile keeps the columns).
        queue_position=row.get("queue_position") if waiting else None,
        estimated_start_at=row.get("estimated_start_at") if waiting else None,
    )


async def insert_batch(
    pool: asyncpg.Pool | asyncpg.Connection,
    *,
    batch_id: str,
    endpoint: str,
    input_file_id: str,
    completion_window: str,
    created_at: int,
    expires_at: int,
    metadata: dict[str, str] | None,
    output_expires_after: int | None,
    project_id: str,
    api_key_id: str | None = None,
    priority: int = 0,
) -> Row:
    # Only while the input file exists, whose row is locked (FOR SHARE) until the caller commits:
    # a concurrent delete of the file waits, then sees this batch and refuses
    # (shared/domain/retention.py); one that won the race leaves no row to insert from.
    row = await pool.fetchrow(
        "INSERT INTO batches (id, endpoint, input_file_id, completion_window, status, created_at,"
        " expires_at, metadata, output_expires_after, updated_at, project_id, api_key_id, priority)"
        " SELECT $1, $2, $3, $4, 'validating', $5::bigint, $6::bigint, $7::jsonb, $8::integer,"
        " $5::bigint, $9, $10, $11 FROM files WHERE id = $3 AND deleted_at IS NULL AND project_id = $9"
        " FOR SHARE RETURNING *",
        batch_id, endpoint, input_file_id, completion_window, created_at, expires_at,
        msgspec.json.encode(metadata).decode() if metadata is not None else None,
        output_expires_after, project_id, api_key_id, priority,
    )  # fmt: skip
    if row is None:
        raise NotFound(f"No such File object: {input_file_id}", param="input_file_id")
    return row


async def get_batch(pool: asyncpg.Pool, batch_id: str, project: str | None = None) -> Row | None:
    return await pool.fetchrow(
        f"SELECT * FROM batches WHERE id = $1 AND {_IN_PROJECT}", batch_id, project
    )


async def batch_cursor(pool: asyncpg.Pool, batch_id: str, project: str | None) -> int | None:
    value: int | None = await pool.fetchval(
        f"SELECT created_at FROM batches WHERE id = $1 AND {_IN_PROJECT}", batch_id, project
    )
    return value


async def list_batches(
    pool: asyncpg.Pool, *, limit: int, after: tuple[int, str] | None, project: str | None
) -> tuple[list[Row], bool]:
    """Newest first, keyset-paginated on (created_at, id). Returns (rows, has_more)."""
    after_at, after_id = after if after is not None else (None, None)
    rows = await pool.fetch(
        "SELECT * FROM batches"
        " WHERE ($1::bigint IS NULL OR (created_at, id) < ($1::bigint, $2::text))"
        " AND ($4::text IS NULL OR project_id = $4)"
        " ORDER BY created_at DESC, id DESC LIMIT $3",
        after_at, after_id, limit + 1, project,
    )  # fmt: skip
    return rows[:limit], len(rows) > limit


async def fail_batch(pool: Db, batch_id: str, errors: list[BatchError]) -> Row | None:
    """validating -> failed with `errors`; None when the batch had left `validating`."""
    now = now_s()
    return await pool.fetchrow(
        "UPDATE batches SET status = 'failed', failed_at = $2, errors = $3::jsonb, updated_at = $2"
        " WHERE id = $1 AND status = 'validating' RETURNING *",
        batch_id, now, msgspec.json.encode(BatchErrors(data=errors)).decode(),
    )  # fmt: skip


async def start_batch(
    pool: Db, batch_id: str, *, model: str, total: int, input_tokens: int = 0
) -> Row | None:
    """validating -> in_progress, in one UPDATE, with its input tokens (the queue limit's:
    services/api/token_limit.py); None when the batch had left `validating`."""
    now = now_s()
    return await pool.fetchrow(
        "UPDATE batches SET status = 'in_progress', in_progress_at = $2, model = $3, total = $4,"
        " input_tokens_estimate = $5, updated_at = $2"
        " WHERE id = $1 AND status = 'validating' RETURNING *",
        batch_id, now, model, total, input_tokens,
    )  # fmt: skip


async def mark_published(pool: asyncpg.Pool, batch_id: str) -> None:
    now = now_s()
    await pool.execute(
        "UPDATE batches SET published_at = $2, updated_at = $2"
        " WHERE id = $1 AND published_at IS NULL",
        batch_id, now,
    )  # fmt: skip


async def cancel_batch(pool: asyncpg.Pool, batch_id: str, project: str | None) -> Row | None:
    """validating|in_progress -> cancelling; None when the batch is in another state (or absent)."""
    now = now_s()
    return await pool.fetchrow(
        "UPDATE batches SET status = 'cancelling', cancelling_at = $3, updated_at = $3"
        f" WHERE id = $1 AND {_IN_PROJECT} AND status IN ('validating', 'in_progress')"
        " RETURNING *",
        batch_id, project, now,
    )  # fmt: skip


# Admission (README: Limits) ------------------------------------------------------------------

# Serialises a project's batch creations across api replicas while its limits are checked, so
# two creates cannot both take the last slot.
_ADMISSION_LOCK = 0x6A626164  # "jbad"
ACTIVE_STATUSES = ("validating", "in_progress")


async def lock_admission(conn: asyncpg.Connection, project_id: str) -> None:
    """Held until the end of the caller's transaction."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))", _ADMISSION_LOCK, project_id
    )


async def max_batch_priority(conn: asyncpg.Connection, project_id: str) -> int:
    """The highest priority the project's batches may ask for (infra/migrations/013)."""
    value = await conn.fetchval("SELECT max_batch_priority FROM projects WHERE id = $1", project_id)
    return int(value or 0)


async def open_load(conn: asyncpg.Connection, project_id: str) -> tuple[int, int]:
    """The project's (batches validating or in progress, their requests without a result yet).
    A batch still validating counts its file's line count (scanned at upload)."""
    row = await conn.fetchrow(
        """
        SELECT count(*) AS active,
               coalesce(sum(CASE WHEN b.total > 0
                                 THEN greatest(b.total - b.completed - b.failed, 0)
                                 ELSE coalesce(f.line_count, 0) END), 0) AS queued
        FROM batches b LEFT JOIN files f ON f.id = b.input_file_id
        WHERE b.status = ANY($1::text[]) AND b.ending IS NULL AND b.project_id = $2
        """,
        ACTIVE_STATUSES,
        project_id,
    )
    assert row is not None
    return int(row["active"]), int(row["queued"])


# Claims: one api process works on a batch at a time ------------------------------------------

CLAIM_NS = BATCH_CLAIM_NS


@asynccontextmanager
async def claim(database_url: str, batch_id: str) -> AsyncIterator[bool]:
    """Yields True while this process holds batch `batch_id`'s claim (validate-and-publish or
    close-out), False if another process holds it. The claim is a session advisory lock on a
    connection of its own: it is released when the block ends, and by PostgreSQL when the
    holder dies, so a crashed api never leaves a batch claimed."""
    conn = await asyncpg.connect(database_url)
    try:
        held = bool(
            await conn.fetchval("SELECT pg_try_advisory_lock($1, hashtext($2))", CLAIM_NS, batch_id)
        )
        yield held
    finally:
        # Closing the session releases the lock, whatever state the block left it in.
        await conn.close(timeout=5)


# Lifecycle ----------------------------------------------------------------------------------


async def batch_state(pool: asyncpg.Pool, batch_id: str) -> tuple[str, str | None] | None:
    """(status, ending) of a batch, or None if there is no such batch."""
    row = await pool.fetchrow("SELECT status, ending FROM batches WHERE id = $1", batch_id)
    return None if row is None else (row["status"], row["ending"])


async def record_validation(
    pool: asyncpg.Pool, batch_id: str, *, model: str, total: int
) -> Row | None:
    """A batch cancelled while it was validating keeps its model and line count (it will never
    run, but its lines become batch_cancelled error lines). None when already known."""
    return await pool.fetchrow(
        "UPDATE batches SET model = $2, total = $3, updated_at = $4"
        " WHERE id = $1 AND status = 'cancelling' AND total = 0 RETURNING *",
        batch_id, model, total, now_s(),
    )  # fmt: skip


async def record_unrunnable(pool: asyncpg.Pool, batch_id: str, errors: list[BatchError]) -> None:
    """A cancelled batch whose file turned out invalid (or gone): no lines to account for."""
    await pool.execute(
        "UPDATE batches SET errors = $2::jsonb, closed_out_at = $3, updated_at = $3"
        " WHERE id = $1 AND status = 'cancelling' AND total = 0 AND closed_out_at IS NULL",
        batch_id, msgspec.json.encode(BatchErrors(data=errors)).decode(), now_s(),
    )  # fmt: skip


# Filling a cancelled/expired batch's missing lines. The batch row is locked first, like the
# results writer does for every write, so counters stay exact when results arrive meanwhile; a
# line that already has a result (or an earlier fill) conflicts and is not counted.
_FILL_MISSING = """
WITH b AS MATERIALIZED (
    SELECT id FROM batches
    WHERE id = $1 AND closed_out_at IS NULL
      AND (status = 'cancelling' OR (status = 'in_progress' AND ending = 'expired'))
    FOR UPDATE
), ins AS (
    INSERT INTO request_results (batch_id, custom_id, line, ok, status_code, request_id,
                                 response_body, error_code, error_message, finished_at)
    SELECT b.id, t.custom_id, t.line, false, 499, t.request_id, NULL, $5, $6, $7::bigint
    FROM b, unnest($2::int[], $3::text[], $4::text[]) AS t(line, custom_id, request_id)
    ORDER BY t.custom_id
    ON CONFLICT (batch_id, custom_id) DO NOTHING
    RETURNING 1
), n AS (
    SELECT count(*)::int AS filled FROM ins
)
UPDATE batches SET failed = failed + n.filled, updated_at = $7
FROM n, b
WHERE batches.id = b.id
RETURNING n.filled
"""


async def fill_missing_lines(
    pool: asyncpg.Pool,
    batch_id: str,
    lines: list[tuple[int, str, str]],
    code: str,
    message: str,
) -> int | None:
    """Error rows for each (line, custom_id, request_id) without a result. Returns how many were
    added, or None when the batch is no longer being closed out."""
    value: int | None = await pool.fetchval(
        _FILL_MISSING,
        batch_id,
        [line for line, _, _ in lines],
        [custom_id for _, custom_id, _ in lines],
        [request_id for _, _, request_id in lines],
        code,
        message,
        now_s(),
    )
    return value


async def shrink_to_results(pool: asyncpg.Pool, batch_id: str) -> None:
    """The last resort when a closing batch's input file is gone: the lines without a result
    cannot be named, so the batch ends with the lines it has."""
    await pool.execute(
        "UPDATE batches SET total = completed + failed, updated_at = $2"
        " WHERE id = $1 AND closed_out_at IS NULL",
        batch_id, now_s(),
    )  # fmt: skip


async def mark_closed_out(pool: asyncpg.Pool, batch_id: str) -> bool:
    """Every line has a result row: the results writer may finalize the batch."""
    row = await pool.fetchrow(
        "UPDATE batches SET closed_out_at = $2, updated_at = $2"
        " WHERE id = $1 AND closed_out_at IS NULL"
        " AND (status = 'cancelling' OR (status = 'in_progress' AND ending = 'expired'))"
        " RETURNING id",
        batch_id, now_s(),
    )  # fmt: skip
    return row is not None


# Dead letters (README: Dead letters) ------------------------------------------------------------


async def list_dead_letters(
    pool: asyncpg.Pool, *, limit: int, after: int | None, batch_id: str | None
) -> tuple[list[Row], bool]:
    """Newest first, keyset-paginated on id. Returns (rows, has_more); rows without payload."""
    rows = await pool.fetch(
        "SELECT id, created_at, source, stream_seq, consumer, subject, error, deliveries,"
        " batch_id, custom_id, line, replayed_at, replay_count, length(payload) AS payload_bytes"
        " FROM dead_letters"
        " WHERE ($1::bigint IS NULL OR id < $1) AND ($2::text IS NULL OR batch_id = $2)"
        " ORDER BY id DESC LIMIT $3",
        after, batch_id, limit + 1,
    )  # fmt: skip
    return rows[:limit], len(rows) > limit


async def get_dead_letter(pool: asyncpg.Pool, dead_letter_id: int) -> Row | None:
    return await pool.fetchrow(
        "SELECT *, length(payload) AS payload_bytes FROM dead_letters WHERE id = $1",
        dead_letter_id,
    )
