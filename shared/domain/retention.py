"""Retention (README: Retention): what jetbatch deletes, and what it keeps of it. Shared by the
api (`DELETE /v1/files/{id}`), the watchdog (expired files; pruning it catches up on) and the
results writer (pruning the batch it has just finished).

Deleting a file deletes every copy jetbatch made of its content: the object in the files
bucket; for a batch's output or error file, that batch's results on RESULTS; for a batch's input
file, its requests still waiting in REQUESTS; and, either way, the batch's dead letters (their
payloads are prompts and answers). Copies go only for batches that have ended: a file that an
open batch still needs (its input) cannot be deleted until that batch ends.

A finished batch's request_results rows are folded into usage_minutes (per model and minute) and
deleted in one statement: from then on its output and error files hold its lines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import asyncpg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from schemas.messages import RequestMessage, ResultMessage
from shared.bus import MSG_ID, REQUESTS, RESULTS, FileObjects

log = logging.getLogger(__name__)

# A batch in one of these still needs its input file; any other status is final.
OPEN_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")
# Final statuses that can leave requests in REQUESTS: the batch stopped before they ran (workers
# skip them, but only once they pull them). A completed batch had each request answered.
STOPPED_STATUSES = ("cancelled", "expired")
# REQUESTS holds every model's queue in one stream and its subjects do not name the batch, so a
# batch's leftover requests are found by reading its model's queue: at most this many messages
# per deletion (the queue is normally empty or short once a batch has ended).
REQUESTS_SCAN_MAX = 20_000


class FileInUse(Exception):
    """The file is the input of a batch that has not ended."""

    def __init__(self, file_id: str, batch_id: str, status: str) -> None:
        super().__init__(
            f"File {file_id} is the input file of batch {batch_id}, which is {status}; it can "
            "be deleted once the batch has ended (cancel the batch to end it sooner)"
        )
        self.file_id = file_id
        self.batch_id = batch_id
        self.status = status


@dataclass(frozen=True, slots=True)
class EndedBatch:
    """A finished batch whose copies go with a deleted file."""

    batch_id: str
    status: str
    model: str | None
    is_input: bool  # the file is its input file (else its output or error file)


@dataclass(frozen=True, slots=True)
class DeletedFile:
    file_id: str
    storage_key: str
    batches: tuple[EndedBatch, ...]


# Files ---------------------------------------------------------------------------------------

_LOCK_FILE = "SELECT storage_key FROM files WHERE id = $1 AND deleted_at IS NULL FOR UPDATE"
# Run after the file's row is locked, so (READ COMMITTED) it sees every batch committed before:
# a batch being created locks the row FOR SHARE as it inserts (services/api/store.py).
_OPEN_BATCH = """
SELECT id, status FROM batches
WHERE input_file_id = $1 AND status = ANY($2::text[])
ORDER BY created_at LIMIT 1
"""
_ENDED_BATCHES = """
SELECT id, status, model, input_file_id = $1 AS is_input FROM batches
WHERE (input_file_id = $1 OR output_file_id = $1 OR error_file_id = $1)
  AND status <> ALL($2::text[])
ORDER BY id
"""


async def delete_file(
    pool: asyncpg.Pool, js: JetStreamContext, files: FileObjects, file_id: str
) -> DeletedFile | None:
    """Delete file `file_id` (the row is kept with `deleted_at`, as a batch may name it) and
    every copy of its content. None when there is no such file, or it is deleted already.
    Raises FileInUse while an open batch needs it.

    One transaction, which locks the file's row first: a batch created at the same moment either
    committed before (and is seen) or finds the file gone. The copies and the bytes go before
    the row's change commits: a failure on the way rolls back the row and the whole delete is
    asked again (by the client; for an expired file, by the watchdog's next round)."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(_LOCK_FILE, file_id)
        if row is None:
            return None
        busy = await conn.fetchrow(_OPEN_BATCH, file_id, OPEN_STATUSES)
        if busy is not None:
            raise FileInUse(file_id, busy["id"], busy["status"])
        ended = tuple(
            EndedBatch(r["id"], r["status"], r["model"], r["is_input"])
            for r in await conn.fetch(_ENDED_BATCHES, file_id, OPEN_STATUSES)
        )
        await conn.execute(
            "UPDATE files SET deleted_at = $2 WHERE id = $1", file_id, int(time.time())
        )
        if ended:
            await conn.execute(
                "DELETE FROM dead_letters WHERE batch_id = ANY($1::text[])",
                [b.batch_id for b in ended],
            )
        await purge_copies(js, ended)
        await files.delete(row["storage_key"])
    return DeletedFile(file_id, row["storage_key"], ended)


async def purge_copies(js: JetStreamContext, batches: Iterable[EndedBatch]) -> None:
    """The bus's copies of ended batches' content: results (for an output or error file) and
    requests left in REQUESTS (for an input file)."""
    leftover: dict[str, set[str]] = {}  # model -> batch ids
    for batch in batches:
        if not batch.is_input:
            for subject in ResultMessage.batch_subjects(batch.batch_id):
                await js.purge_stream(RESULTS.name, subject=subject)
        elif batch.status in STOPPED_STATUSES and batch.model:
            leftover.setdefault(batch.model, set()).add(batch.batch_id)
    for model, batch_ids in leftover.items():
        await purge_requests(js, model, batch_ids)


async def purge_requests(
    js: JetStreamContext, model: str, batch_ids: set[str], scan_max: int = REQUESTS_SCAN_MAX
) -> int:
    """Delete the requests of `batch_ids` still in REQUESTS (model `model`'s queue), found by
    their `Nats-Msg-Id` (`<batch_id>:<line>`). Returns how many were deleted."""
    subject = RequestMessage.filter_subject(model=model)
    info = await js.stream_info(REQUESTS.name, subjects_filter=subject)
    if not info.state.subjects:
        return 0  # the model's queue is empty
    seq, scanned, deleted = info.state.first_seq, 0, 0
    while scanned < scan_max:
        try:
            msg = await js.get_msg(REQUESTS.name, seq=seq, subject=subject, next=True)
        except NotFoundError:
            return deleted  # read to the end
        assert msg.seq is not None
        scanned += 1
        seq = msg.seq + 1
        msg_id = (msg.headers or {}).get(MSG_ID, "")
        if msg_id.rpartition(":")[0] in batch_ids:
            try:
                await js.delete_msg(REQUESTS.name, msg.seq)
                deleted += 1
            except NotFoundError:
                pass  # taken by a worker meanwhile
    log.warning(
        "REQUESTS: read %d messages of model %s without reaching the end; requests of %s may "
        "be left (workers skip them: their batches have ended)",
        scanned, model, ", ".join(sorted(batch_ids)),
    )  # fmt: skip
    return deleted


# Pruning a finished batch's lines ------------------------------------------------------------

# One statement: lock the (finished, not yet pruned) batches, delete their rows, add what the
# rows counted to usage_minutes, mark the batches pruned. Run again, it finds nothing to do. A
# row written before finished_at existed counts in the minute its batch ended.
_PRUNE = """
WITH b AS MATERIALIZED (
    SELECT id, project_id, coalesce(model, '') AS model,
           coalesce(completed_at, cancelled_at, expired_at, failed_at, updated_at) AS ended_at
    FROM batches
    WHERE id = ANY($1::text[]) AND status <> ALL($2::text[]) AND results_pruned_at IS NULL
    ORDER BY id
    FOR UPDATE
), gone AS (
    DELETE FROM request_results r USING b
    WHERE r.batch_id = b.id
    RETURNING r.batch_id, r.ok, r.input_tokens, r.cached_tokens, r.output_tokens, r.finished_at,
              r.gpu_ms
), folded AS (
    INSERT INTO usage_minutes AS u (batch_id, model, minute, requests, failed, input_tokens,
                                    cached_tokens, output_tokens, project_id, gpu_ms)
    SELECT g.batch_id, b.model, coalesce(g.finished_at, b.ended_at) / 60 * 60,
           count(*), count(*) FILTER (WHERE NOT g.ok),
           sum(g.input_tokens), sum(g.cached_tokens), sum(g.output_tokens), b.project_id,
           sum(g.gpu_ms)
    FROM gone g JOIN b ON b.id = g.batch_id
    GROUP BY 1, 2, 3, b.project_id
    ON CONFLICT (batch_id, model, minute) DO UPDATE SET
        requests = u.requests + EXCLUDED.requests,
        failed = u.failed + EXCLUDED.failed,
        input_tokens = u.input_tokens + EXCLUDED.input_tokens,
        cached_tokens = u.cached_tokens + EXCLUDED.cached_tokens,
        output_tokens = u.output_tokens + EXCLUDED.output_tokens,
        gpu_ms = u.gpu_ms + EXCLUDED.gpu_ms
)
UPDATE batches SET results_pruned_at = $3
FROM b WHERE batches.id = b.id
RETURNING batches.id
"""


async def prune_results(
    conn: asyncpg.Connection, batch_ids: Sequence[str], now: int | None = None
) -> list[str]:
    """Fold the request_results rows of those `batch_ids` that have ended into usage_minutes and
    delete them. Returns the batches pruned now (not those still open or pruned already)."""
    rows = await conn.fetch(
        _PRUNE, list(batch_ids), OPEN_STATUSES, int(time.time()) if now is None else now
    )
    return [r["id"] for r in rows]
