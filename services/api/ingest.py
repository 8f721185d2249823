"""Batch ingestion, run in the background once `POST /v1/batches` has answered.

Pass 1 streams the input file and validates every line (validating -> failed, with `errors`
naming the lines; services/api/validation.py), in a child process of the api started ahead of
need (`Deps.validators`), off the process serving HTTP. Pass 2 hands the valid batch to the
dispatcher (services/api/dispatcher.py), which publishes its lines to REQUESTS a window at a time
in scheduling order, through the api's publishing child, then sets `published_at`.
Emits `jetbatch.events.batch.<project>.failed` (a BatchEvent) for an invalid file, and for one
over its project's batch queue limit for the model (`token_limit_exceeded`,
services/api/token_limit.py: the validation counts the file's input tokens).

`process_batch` is idempotent: run again on a batch a crashed api left in `validating` (or in
`in_progress` without `published_at`), it redoes what is missing, and dispatch resumes at the
batch's cursor (`dispatched`); JetStream's duplicate window drops re-published messages, and the
results writer writes each custom_id once. The watchdog asks for that re-run (a `redrive`
BatchCommand, services/api/lifecycle.py). One api process works on a batch at a time: it holds
the batch's claim (store.claim), which dies with it.

A batch cancelled or expired meanwhile gets no more grants; one cancelled while validating keeps
its line count, so its lines become batch_cancelled lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import anyio.to_thread
import msgspec

from schemas.messages import DISPATCHED, BatchEvent, RequestMessage
from schemas.openai import BatchError
from services.api import metrics as api_metrics
from services.api import store, token_limit
from services.api.deps import DepsParam
from services.api.publishing import PublishJob
from services.api.validation import (
    MESSAGE_OVERHEAD_BYTES,
    FileCheck,
    ValidationJob,
    validate_in_child,
)
from shared import logs, tracing
from shared.bus import Publisher
from shared.ids import stable_id

log = logging.getLogger(__name__)

_encoder = msgspec.json.Encoder()


def max_line_bytes(deps: DepsParam) -> int:
    """The largest request line that still fits one NATS message on this server."""
    return deps.nc.max_payload - MESSAGE_OVERHEAD_BYTES


async def run_process_batch(deps: DepsParam, batch_id: str) -> None:
    """process_batch as a background task: failures are logged, never lost in an unawaited task."""
    logs.bind(batch_id)
    try:
        with tracing.batch_span("batch validate", batch_id):
            await process_batch(deps, batch_id)
    except asyncio.CancelledError:
        log.warning(
            "batch %s: processing interrupted; re-running process_batch resumes it", batch_id
        )
        raise
    except Exception:
        log.exception("batch %s: processing failed; re-running process_batch resumes it", batch_id)


async def redrive(deps: DepsParam, batch_id: str) -> None:
    """The watchdog's re-drive: process_batch again, unless the batch has been validating for
    longer than JETBATCH_VALIDATION_TIMEOUT_S. Then it fails (`validation_timeout`): a file whose
    validation crashes or hangs every time is not re-driven forever. Checked before the claim, so
    a validation hung in another process does not keep the batch open either."""
    row = await store.get_batch(deps.pool, batch_id)
    timeout_s = deps.settings.health.validation_timeout_s
    if row is not None and row["status"] == "validating":
        if store.now_s() - row["created_at"] >= timeout_s:
            error = BatchError(
                code="validation_timeout",
                message=f"the input file could not be validated within {timeout_s:g} s of the "
                "batch's creation; create the batch again",
                param="input_file_id",
            )
            await _fail(deps, batch_id, [error])
            return
    await process_batch(deps, batch_id)


async def process_batch(deps: DepsParam, batch_id: str) -> None:
    """Validate batch `batch_id`'s input file, then dispatch its requests; see the module
    docstring. Validation holds the batch's claim; dispatch takes it again on the dispatcher's
    own connection, where every batch being dispatched holds its claim."""
    assert deps.settings.database_url is not None
    async with store.claim(deps.settings.database_url, batch_id) as claimed:
        if not claimed:
            log.info("batch %s: another api process is working on it", batch_id)
            return
        row = await _validate_claimed(deps, batch_id)
    if row is not None:
        await _publish(deps, row)


async def _validate_claimed(deps: DepsParam, batch_id: str) -> store.Row | None:
    """The batch's row once it is valid and in progress with lines to dispatch; else None."""
    row = await store.get_batch(deps.pool, batch_id)
    if row is None:
        log.warning("batch %s: no such batch, nothing to process", batch_id)
        return None
    validating = row["status"] == "validating"
    if not validating and (
        row["status"] != "in_progress"
        or row["published_at"] is not None
        or row["ending"] is not None
    ):
        log.debug("batch %s: %s, nothing to process", batch_id, row["status"])
        return None
    if not validating:
        return row
    async with input_copy(deps, row) as path:
        return await _validate(deps, row, path)


@contextlib.asynccontextmanager
async def input_copy(deps: DepsParam, row: store.Row) -> AsyncIterator[Path | None]:
    """A private local copy of the batch's input file from the files bucket, read by the
    validating and publishing children and deleted afterwards; None if the file is gone."""
    file_row = await store.get_file(deps.pool, row["input_file_id"])
    key = None if file_row is None else file_row["storage_key"]
    if key is None or await deps.storage.size(key) is None:
        yield None
        return
    async with deps.storage.local_copy(key, deps.settings.scratch_dir) as path:
        yield path


async def check_input(
    deps: DepsParam,
    row: store.Row,
    path: Path | None,
    tokenizers: dict[str, str] | None = None,
) -> FileCheck:
    """Validate a batch's input file (its local copy `path`, None if gone), counting its input
    tokens with the tokenizers given (model -> directory)."""
    if path is None:
        error = BatchError(
            code="file_not_found",
            message=f"input file {row['input_file_id']} was deleted before the batch ran",
            param="input_file_id",
        )
        return FileCheck(model=None, count=0, errors=[error])
    job = ValidationJob(
        path=str(path),
        endpoint=row["endpoint"],
        models={m.name: list(m.endpoints) for m in deps.settings.models},
        max_lines=deps.settings.max_batch_lines,
        max_line_bytes=max_line_bytes(deps),
        tokenizers=tokenizers or {},
    )
    with api_metrics.child_job("validation"):
        if deps.validators is not None:
            check = await validate_in_child(job, await deps.validators.take())
        else:
            check = await anyio.to_thread.run_sync(job.run)
    api_metrics.LINES_VALIDATED.inc(check.count)
    return check


async def _validate(deps: DepsParam, row: store.Row, path: Path | None) -> store.Row | None:
    """Pass 1. Returns the batch's row once in_progress, or None when it must not be published.
    The batch starts only within its project's batch queue limit (token_limit_exceeded)."""
    batch_id = row["id"]
    tokenizers = await token_limit.tokenizers_for(deps.settings, deps.pool, row["project_id"])
    check = await check_input(deps, row, path, tokenizers)
    model, total = check.model, check.count
    if check.errors:
        await _fail(deps, batch_id, check.errors)
        return None
    assert model is not None  # a file without errors has at least one line, hence a model
    if check.token_note is not None and model in tokenizers:
        token_limit.note_estimate(model, check.token_note)
    started, refused = await token_limit.start_within_limit(
        deps.pool, row, model=model, total=total, tokens=check.input_tokens
    )
    if refused is not None:
        stored = store.batch_from_row(refused).errors
        await _failed(deps, refused, stored.data if stored is not None else [])
        return None
    if started is None:
        if await store.record_validation(deps.pool, batch_id, model=model, total=total):
            log.info("batch %s was cancelled while validating: %d lines, none run", batch_id, total)
        else:
            log.info("batch %s left validating meanwhile: not publishing", batch_id)
        return None
    log.info("batch %s valid: %d requests for model %s", batch_id, total, model)
    return started


async def _fail(deps: DepsParam, batch_id: str, errors: list[BatchError]) -> None:
    """validating -> failed with `errors`, and its batch.failed event."""
    failed = await store.fail_batch(deps.pool, batch_id, errors)
    if failed is not None:
        await _failed(deps, failed, errors)


async def _failed(deps: DepsParam, failed: store.Row, errors: list[BatchError]) -> None:
    """A batch that failed validation: logged, and its batch.failed event."""
    if errors:
        log.info(
            "batch %s failed validation: %d error(s), first: line %s %s: %s",
            failed["id"], len(errors), errors[0].line, errors[0].code, errors[0].message,
        )  # fmt: skip
    await _emit_failed(deps, failed)


async def _publish(deps: DepsParam, row: store.Row) -> None:
    """Pass 2: the batch's lines to REQUESTS, as the dispatcher grants them
    (services/api/dispatcher.py), which then sets `published_at`."""
    batch_id, model = row["id"], row["model"]
    # The batch's publish span; each sampled line's own publish is a trace of its own.
    with tracing.batch_span(f"{RequestMessage.subject_for(model, DISPATCHED)} publish", batch_id):
        job = PublishJob(
            path="",  # the dispatcher's local copy of the input file
            batch_id=batch_id,
            model=model,
            endpoint=row["endpoint"],
            max_line_bytes=max_line_bytes(deps),
            project=row["project_id"],  # the batch's project: a token of its requests' subject
            priority=row.get("priority") or 0,
            trace_line_ratio=(
                deps.settings.observability.trace_line_ratio if tracing.enabled() else 0.0
            ),
        )
        await deps.dispatcher.dispatch(row, job)


async def _emit_failed(deps: DepsParam, row: store.Row) -> None:
    batch = store.batch_from_row(row)
    event = BatchEvent(
        # Deterministic: a re-emitted event is dropped by the stream's duplicate window.
        id=stable_id("evt_", batch.id, "batch.failed"),
        type="batch.failed",
        batch_id=batch.id,
        created_at=batch.failed_at or store.now_s(),
        metadata=batch.metadata,
        project=row["project_id"],
    )
    publisher = Publisher(deps.js)
    await publisher.publish(event.published_on, _encoder.encode(event), event.id)
    await publisher.flush()
