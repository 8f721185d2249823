"""The api's SQL: rows of `files` and `batches`, and the OpenAI objects built from them.

Batch state changes are single conditional UPDATEs (`WHERE status = ...`), so a concurrent
cancel, a re-run of `process_batch` or another api replica can never move a batch backwards.
"""

from __future__ import annotations

import time
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

Order = Literal["asc", "desc"]
Row: TypeAlias = asyncpg.Record

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
) -> Row:
    row = await pool.fetchrow(
        "INSERT INTO files (id, bytes, created_at, expires_at, filename, purpose, status,"
        " storage_key, line_count, models)"
        " VALUES ($1, $2, $3, $4, $5, $6, 'processed', $7, $8, $9) RETURNING *",
        file_id, size, created_at, expires_at, filename, purpose, storage_key, line_count, models,
    )  # fmt: skip
    assert row is not None
    return row


async def get_file(pool: asyncpg.Pool, file_id: str) -> Row | None:
    return await pool.fetchrow("SELECT * FROM files WHERE id = $1 AND deleted_at IS NULL", file_id)


async def file_cursor(pool: asyncpg.Pool, file_id: str) -> int | None:
    """created_at of a pagination cursor; a deleted file still works as one."""
    value: int | None = await pool.fetchval("SELECT created_at FROM files WHERE id = $1", file_id)
    return value


async def list_files(
    pool: asyncpg.Pool,
    *,
    purpose: str | None,
    limit: int,
    order: Order,
    after: tuple[int, str] | None,
) -> tuple[list[Row], bool]:
    """One page, keyset-paginated on (created_at, id). Returns (rows, has_more)."""
    cmp, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
    after_at, after_id = after if after is not None else (None, None)
    rows = await pool.fetch(
        "SELECT * FROM files WHERE deleted_at IS NULL"
        " AND ($1::text IS NULL OR purpose = $1)"
        f" AND ($2::bigint IS NULL OR (created_at, id) {cmp} ($2::bigint, $3::text))"
        f" ORDER BY created_at {direction}, id {direction} LIMIT $4",
        purpose, after_at, after_id, limit + 1,
    )  # fmt: skip
    return rows[:limit], len(rows) > limit


async def delete_file(pool: asyncpg.Pool, file_id: str) -> Row | None:
    """Soft-delete: the row stays (a batch may still name it), the bytes go."""
    return await pool.fetchrow(
        "UPDATE files SET deleted_at = $2 WHERE id = $1 AND deleted_at IS NULL"
        " RETURNING id, storage_key",
        file_id, now_s(),
    )  # fmt: skip


# Batches -------------------------------------------------------------------------------------


def _decode_errors(value: Any) -> BatchErrors | None:
    if value is None:
        return None
    decoded = _errors_decoder.decode(value)
    errors = decoded if isinstance(decoded, BatchErrors) else BatchErrors(data=decoded)
    return errors if errors.data else None


def batch_from_row(row: Row) -> Batch:
    metadata = row["metadata"]
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
    )


async def insert_batch(
    pool: asyncpg.Pool,
    *,
    batch_id: str,
    endpoint: str,
    input_file_id: str,
    completion_window: str,
    created_at: int,
    expires_at: int,
    metadata: dict[str, str] | None,
    output_expires_after: int | None,
) -> Row:
    row = await pool.fetchrow(
        "INSERT INTO batches (id, endpoint, input_file_id, completion_window, status, created_at,"
        " expires_at, metadata, output_expires_after, updated_at)"
        " VALUES ($1, $2, $3, $4, 'validating', $5, $6, $7::jsonb, $8, $5) RETURNING *",
        batch_id, endpoint, input_file_id, completion_window, created_at, expires_at,
        msgspec.json.encode(metadata).decode() if metadata is not None else None,
        output_expires_after,
    )  # fmt: skip
    assert row is not None
    return row


async def get_batch(pool: asyncpg.Pool, batch_id: str) -> Row | None:
    return await pool.fetchrow("SELECT * FROM batches WHERE id = $1", batch_id)


async def batch_cursor(pool: asyncpg.Pool, batch_id: str) -> int | None:
    value: int | None = await pool.fetchval(
        "SELECT created_at FROM batches WHERE id = $1", batch_id
    )
    return value


async def list_batches(
    pool: asyncpg.Pool, *, limit: int, after: tuple[int, str] | None
) -> tuple[list[Row], bool]:
    """Newest first, keyset-paginated on (created_at, id). Returns (rows, has_more)."""
    after_at, after_id = after if after is not None else (None, None)
    rows = await pool.fetch(
        "SELECT * FROM batches"
        " WHERE ($1::bigint IS NULL OR (created_at, id) < ($1::bigint, $2::text))"
        " ORDER BY created_at DESC, id DESC LIMIT $3",
        after_at, after_id, limit + 1,
    )  # fmt: skip
    return rows[:limit], len(rows) > limit


async def fail_batch(pool: asyncpg.Pool, batch_id: str, errors: list[BatchError]) -> Row | None:
    """validating -> failed with `errors`; None when the batch had left `validating`."""
    now = now_s()
    return await pool.fetchrow(
        "UPDATE batches SET status = 'failed', failed_at = $2, errors = $3::jsonb, updated_at = $2"
        " WHERE id = $1 AND status = 'validating' RETURNING *",
        batch_id, now, msgspec.json.encode(BatchErrors(data=errors)).decode(),
    )  # fmt: skip


async def start_batch(pool: asyncpg.Pool, batch_id: str, *, model: str, total: int) -> Row | None:
    """validating -> in_progress, in one UPDATE; None when the batch had left `validating`."""
    now = now_s()
    return await pool.fetchrow(
        "UPDATE batches SET status = 'in_progress', in_progress_at = $2, model = $3, total = $4,"
        " updated_at = $2 WHERE id = $1 AND status = 'validating' RETURNING *",
        batch_id, now, model, total,
    )  # fmt: skip


async def mark_published(pool: asyncpg.Pool, batch_id: str) -> None:
    now = now_s()
    await pool.execute(
        "UPDATE batches SET published_at = $2, updated_at = $2"
        " WHERE id = $1 AND published_at IS NULL",
        batch_id, now,
    )  # fmt: skip


async def cancel_batch(pool: asyncpg.Pool, batch_id: str) -> Row | None:
    """validating|in_progress -> cancelling; None when the batch is in another state (or absent)."""
    now = now_s()
    return await pool.fetchrow(
        "UPDATE batches SET status = 'cancelling', cancelling_at = $2, updated_at = $2"
        " WHERE id = $1 AND status IN ('validating', 'in_progress') RETURNING *",
        batch_id, now,
    )  # fmt: skip
