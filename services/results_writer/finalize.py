"""Finalization: a batch whose every line is accounted for gets its output and error files
(streamed from a server-side cursor), its event on EVENTS and its final status, and its
request_results rows are pruned (folded into usage_minutes); idempotent, so a sweep redoes
whatever a crash interrupted."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Literal

import asyncpg
import msgspec
from nats.js import JetStreamContext

from schemas.messages import BatchEvent
from schemas.openai import OutputLine
from services.results_writer import metrics, store
from services.results_writer.lines import event_id, output_file_id, output_line
from shared import bus, telemetry, tracing
from shared.bus import FileObjects
from shared.bus.objects import ObjectWriter
from shared.consumer import sleep_unless
from shared.domain import retention

log = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)

SWEEP_INTERVAL_S = 5.0
FINALIZE_CONCURRENCY = 2
CURSOR_PREFETCH = 1000
FILE_FLUSH_BYTES = 1024 * 1024

_encoder = msgspec.json.Encoder()


class _JsonlFile:
    """Output lines into an object of the files bucket, published ~1 MB at a time. Nothing is
    written until the first line, so an empty file never exists."""

    def __init__(self, files: FileObjects, key: str) -> None:
        self.key = key
        self.lines = 0
        self.size = 0
        self._files = files
        self._buf = bytearray()
        self._writer: ObjectWriter | None = None

    def add(self, line: OutputLine) -> None:
        _encoder.encode_into(line, self._buf, -1)
        self._buf += b"\n"
        self.lines += 1

    async def flush_if_full(self) -> None:
        if len(self._buf) >= FILE_FLUSH_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        data, self._buf = self._buf, bytearray()
        if self._writer is None:
            self._writer = self._files.writer(self.key)
        await self._writer.write(data)
        self.size += len(data)

    async def commit(self) -> int:
        """Write the rest and the object's meta (replacing an earlier attempt's); returns the
        file's size."""
        await self._flush()
        assert self._writer is not None
        writer, self._writer = self._writer, None
        await writer.commit()
        return self.size

    async def abort(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await writer.abort()


class Finalizer:
    """Writes a fully accounted batch's output and error files, announces and closes it."""

    def __init__(self, pool: asyncpg.Pool, js: JetStreamContext, storage: FileObjects) -> None:
        self._pool = pool
        self._js = js
        self._storage = storage
        self._finalizing: dict[str, asyncio.Task[None]] = {}
        self._finalize_slots = asyncio.Semaphore(FINALIZE_CONCURRENCY)

    # Finalization ----------------------------------------------------------------------------

    async def finalize(self, batch_id: str) -> bool:
        """Write the batch's files, announce it and close it. Idempotent: redoing it after a
        crash at any point rewrites the same files and re-publishes the same event id."""
        async with self._pool.acquire() as conn:
            if await store.start_finalizing(conn, batch_id, int(time.time())):
                log.info("batch %s: finalizing", batch_id)
            async with conn.transaction():
                if not await store.try_finalize_lock(conn, batch_id):
                    log.debug("batch %s: being finalized by another writer", batch_id)
                    return False
                batch = await store.load_batch(conn, batch_id)
                if batch is None or not _ready_to_close(batch):
                    return False
                with tracer.start_as_current_span(
                    "batch finalize", context=tracing.batch_context(batch_id)
                ) as span:
                    span.set_attribute("jetbatch.batch_id", batch_id)
                    with metrics.finalizing(batch.status):
                        await self._close_batch(conn, batch)
        return True

    async def _close_batch(self, conn: asyncpg.Connection, batch: store.BatchToFinalize) -> None:
        now = int(time.time())
        output, errors = await self._write_files(conn, batch.id)
        if output.lines != batch.completed or errors.lines != batch.failed:
            log.warning(
                "batch %s: counters say %d ok / %d failed, rows say %d / %d",
                batch.id,
                batch.completed,
                batch.failed,
                output.lines,
                errors.lines,
            )
        expires_at = (
            None if batch.output_expires_after is None else now + batch.output_expires_after
        )
        file_ids: dict[str, str | None] = {}
        for kind, sink in (("output", output), ("error", errors)):
            if sink.lines == 0:
                file_ids[kind] = None  # as OpenAI: no file rather than an empty one
                continue
            await store.upsert_output_file(
                conn, sink.key, f"{batch.id}_{kind}.jsonl", sink.size, now, expires_at, batch.id
            )
            file_ids[kind] = sink.key

        # Published before the status commits: a crash in between re-publishes the same event
        # id, which JetStream's duplicate window drops, so no batch ends without its event.
        type_: Literal["batch.completed", "batch.cancelled", "batch.expired"] = (
            "batch.cancelled"
            if batch.status == "cancelling"
            else "batch.expired"
            if batch.status == "in_progress"
            else "batch.completed"
        )
        event = BatchEvent(
            id=event_id(batch.id, type_),
            type=type_,
            batch_id=batch.id,
            created_at=now,
            metadata=_metadata(batch),
            project=batch.project_id,
        )
        subject = event.published_on
        with tracer.start_as_current_span(f"{subject} publish"):
            publisher = bus.Publisher(self._js)
            await publisher.publish(subject, _encoder.encode(event), event.id)
            await publisher.flush()

        closed = await store.finish_batch(
            conn, batch.id, batch.status, now, file_ids["output"], file_ids["error"]
        )
        if closed:
            # Its lines are in its files now: the rows become usage per minute, in this same
            # transaction, so no batch is final with its rows or has rows pruned yet not final.
            await retention.prune_results(conn, [batch.id], now)
            log.info(
                "batch %s: %s (%d ok, %d failed)",
                batch.id,
                type_.removeprefix("batch."),
                output.lines,
                errors.lines,
            )
        else:
            log.warning("batch %s: status changed while finalizing; left as is", batch.id)

    async def _write_files(
        self, conn: asyncpg.Connection, batch_id: str
    ) -> tuple[_JsonlFile, _JsonlFile]:
        output = _JsonlFile(self._storage, output_file_id(batch_id, "output"))
        errors = _JsonlFile(self._storage, output_file_id(batch_id, "error"))
        try:
            async for rows in store.iter_results(conn, batch_id, CURSOR_PREFETCH):
                # A chunk is rendered in one go: no coroutine per line.
                for custom_id, ok, status_code, request_id, body, error_code, error_message in rows:
                    line = output_line(
                        batch_id,
                        custom_id,
                        ok=ok,
                        status_code=status_code,
                        request_id=request_id,
                        response_body=body,
                        error_code=error_code,
                        error_message=error_message,
                    )
                    (output if ok else errors).add(line)
                await output.flush_if_full()
                await errors.flush_if_full()
            for sink in (output, errors):
                if sink.lines:
                    await sink.commit()
        except BaseException:
            await output.abort()
            await errors.abort()
            raise
        return output, errors

    def submit_finalize(self, batch_id: str) -> None:
        """Finalize in the background (writing results goes on meanwhile), once per batch at a
        time in this process."""
        if batch_id in self._finalizing:
            return
        task = asyncio.create_task(self._finalize_task(batch_id), name=f"finalize {batch_id}")
        self._finalizing[batch_id] = task

    async def _finalize_task(self, batch_id: str) -> None:
        try:
            async with self._finalize_slots:
                await self.finalize(batch_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The sweep picks it up again: every step of finalize is idempotent.
            log.exception("batch %s: finalize failed; the sweep will retry", batch_id)
        finally:
            self._finalizing.pop(batch_id, None)

    async def sweep(self) -> int:
        """Queue every batch that is fully accounted but not closed: after a crash between a
        commit and its finalization, a batch stuck in `finalizing`, a batch whose last results
        were all duplicates, or one whose counters were completed by another service."""
        async with self._pool.acquire() as conn:
            batch_ids = await store.finalizable_batch_ids(conn)
        for batch_id in batch_ids:
            self.submit_finalize(batch_id)
        return len(batch_ids)

    async def wait_finalizing(self, timeout_s: float) -> None:
        tasks = list(self._finalizing.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            # Safe: the transaction rolls back and the sweep of the next writer redoes it.
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    async def sweep_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.sweep()
            except Exception:
                log.exception("sweep failed")
            await sleep_unless(stop, SWEEP_INTERVAL_S)


def _ready_to_close(batch: store.BatchToFinalize) -> bool:
    if batch.status == "finalizing":
        return True
    accounted = batch.total <= batch.completed + batch.failed
    if batch.status == "cancelling":
        # Without a close-out, only a batch whose every line was published can be accounted.
        return accounted and (batch.total > 0 or batch.closed_out_at is not None)
    return batch.status == "in_progress" and batch.ending == "expired" and accounted


def _metadata(batch: store.BatchToFinalize) -> dict[str, str] | None:
    if batch.metadata_json is None:
        return None
    try:
        return msgspec.json.decode(batch.metadata_json, type=dict[str, str] | None)
    except msgspec.ValidationError:
        log.warning("batch %s: metadata is not a string map; event sent without it", batch.id)
        return None
