"""The api's part in the batch lifecycle beyond HTTP: the watchdog's orders (README: Lifecycle).

Consumes: CONSUMER below, stream CONTROL as durable `api` (shared by every api replica),
BatchCommand on `jetbatch.control.batch.<action>`, four at a time, each kept alive while it runs,
max_deliver 20. A command that does not decode is a dead letter (table `dead_letters`).

- `redrive`: ingest.redrive (process_batch, idempotent; a batch validating for longer than
  JETBATCH_VALIDATION_TIMEOUT_S fails instead), for a batch a crashed api left in `validating`
  (or in progress and not fully published).
- `close_out`: a cancelled or expired batch whose grace period is over. Every line of its input
  file without a result gets a `batch_cancelled` / `batch_expired` error line (written straight
  to PostgreSQL, counted like the results writer counts), then `closed_out_at` is set and the
  results writer's sweep finalizes the batch to `cancelled` / `expired`.

The api does this work because it owns reading input files (validation.py); the watchdog decides
when. Both commands run under the batch's claim (store.claim), so one process at a time works on
a batch, and a process that dies mid-way leaves nothing that a re-run does not finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import anyio.to_thread

from schemas.messages import BatchCommand, BatchStop, StopReason
from schemas.openai import BatchError, RequestLine
from services.api import ingest, store
from services.api.deps import DepsParam
from services.api.validation import iter_requests
from shared import bus
from shared.consumer import Consumer, Delivery, Retry, Runner, sleep_unless
from shared.domain import deadletters
from shared.ids import stable_id

log = logging.getLogger(__name__)

CONSUMER = Consumer(
    stream=bus.CONTROL,
    durable="api",
    message=BatchCommand,
    ack_wait_s=60,
    max_deliver=20,
    concurrency=4,
    fetch=4,
    keep_alive=True,  # a close-out of a large batch takes longer than the ack wait
)
FILL_CHUNK_LINES = 5_000
RETRY_DELAY_S = 2.0  # a batch claimed by another process; a consumer that failed to start


def closing_reason(row: store.Row) -> StopReason | None:
    """Why the batch's unfinished lines are to be closed out, if they are."""
    if row["status"] == "cancelling":
        return "cancelled"
    if row["status"] == "in_progress" and row["ending"] == "expired":
        return "expired"
    return None


async def close_out(deps: DepsParam, batch_id: str) -> bool:
    """Give every line of a cancelled/expired batch a result row. False: another process holds
    the batch (publishing it, or closing it out): try again later."""
    assert deps.settings.database_url is not None
    async with store.claim(deps.settings.database_url, batch_id) as claimed:
        if not claimed:
            return False
        await _close_out_claimed(deps, batch_id)
        return True


async def _close_out_claimed(deps: DepsParam, batch_id: str) -> None:
    row = await store.get_batch(deps.pool, batch_id)
    if row is None or row["closed_out_at"] is not None:
        return
    reason = closing_reason(row)
    if reason is None:
        log.debug("batch %s: %s, nothing to close out", batch_id, row["status"])
        return
    async with ingest.input_copy(deps, row) as path:
        if row["total"] == 0:
            # Cancelled before its validation finished (or the api died validating it): count it.
            try:
                check = await ingest.check_input(deps, row, path)
                errors, model, total = check.errors, check.model, check.count
            except (RuntimeError, ValueError, MemoryError) as e:
                # The validation itself failed (its child crashed): the cancel still ends the
                # batch, with no lines to account for, rather than being retried forever.
                log.error("batch %s: cancelled, and its file cannot be validated: %s", batch_id, e)
                errors = [
                    BatchError(
                        code="validation_failed",
                        message="the input file could not be validated",
                        param="input_file_id",
                    )
                ]
                model, total = None, 0
            if errors or model is None:
                await store.record_unrunnable(deps.pool, batch_id, errors)
                log.info("batch %s: cancelled before it had any valid request", batch_id)
                return
            await store.record_validation(deps.pool, batch_id, model=model, total=total)
        if path is None:
            log.error(
                "batch %s: input file %s is gone; its lines without a result cannot be named,"
                " the batch ends with the %d it has", batch_id, row["input_file_id"],
                row["completed"] + row["failed"],
            )  # fmt: skip
            await store.shrink_to_results(deps.pool, batch_id)
            await store.mark_closed_out(deps.pool, batch_id)
            return
        filled = await _fill(deps, row, reason, path)
        if filled is None:
            return
    if await store.mark_closed_out(deps.pool, batch_id):
        log.info("batch %s %s: %d unfinished lines are closed out", batch_id, reason, filled)


async def _fill(deps: DepsParam, row: store.Row, reason: StopReason, path: Path) -> int | None:
    """A `batch_cancelled` / `batch_expired` line for every line of the input file without a
    result; None if the batch left its state meanwhile."""
    batch_id = row["id"]
    stop = BatchStop(batch_id=batch_id, reason=reason, at=store.now_s())
    code, message = stop.error_code, stop.error_message
    filled = 0
    lines = iter_requests(path, ingest.max_line_bytes(deps))
    with contextlib.closing(lines):
        while chunk := await anyio.to_thread.run_sync(_take, lines, FILL_CHUNK_LINES):
            keyed = [
                (index, r.custom_id, stable_id("req_", batch_id, r.custom_id)) for index, r in chunk
            ]
            added = await store.fill_missing_lines(deps.pool, batch_id, keyed, code, message)
            if added is None:
                log.info("batch %s left %s while being closed out", batch_id, row["status"])
                return None
            filled += added
    return filled


def _take(lines: Iterator[tuple[int, RequestLine]], n: int) -> list[tuple[int, RequestLine]]:
    return list(itertools.islice(lines, n))


# The consumer -----------------------------------------------------------------------------


async def handle(deps: DepsParam, command: BatchCommand, _: Delivery[BatchCommand]) -> None:
    """Run one command; Retry while the batch is claimed by another process."""
    if command.action == "redrive":
        log.info("batch %s: re-driven by the watchdog", command.batch_id)
        await ingest.redrive(deps, command.batch_id)
    elif not await close_out(deps, command.batch_id):
        raise Retry(f"batch {command.batch_id} is claimed elsewhere", delay_s=RETRY_DELAY_S)


async def consume(deps: DepsParam, stop: asyncio.Event) -> None:
    """Take the watchdog's commands until `stop` is set. The api serves HTTP whatever happens
    here, so a failure is logged and the consumer started again."""
    while not stop.is_set():
        runner = Runner(deps.js, CONSUMER, deadletters.InDatabase(deps.pool))
        try:
            await runner.run(functools.partial(handle, deps), stop)
        except Exception:
            log.exception("control consumer failed; restarting it")
            await sleep_unless(stop, RETRY_DELAY_S)
