"""Writes request results to PostgreSQL in bulk and finalizes batches whose every line is in.

Consumes: stream RESULTS, durable `results_writer`, filter `jetbatch.results.>`, messages
`schemas.messages.ResultMessage` (msgspec JSON), ack_wait ACK_WAIT_S, max_deliver unlimited
(MAX_DELIVER), up to FETCH_BATCH messages per fetch written in one transaction and acked after
commit. A message that does not decode (or cannot be stored) is rejected: recorded in table
`dead_letters` and termed; a result that decodes but cannot be stored becomes an error line
(`dead_lettered`), so its batch still finishes.

Emits: `schemas.messages.BatchEvent` on EVENTS, `batch.completed` (from `in_progress`, through
`finalizing`), `batch.cancelled` (from `cancelling`) or `batch.expired` (from `in_progress` once
the watchdog found it past its window), with `Nats-Msg-Id` = the event id, once the batch's
output and error files are written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from io import BufferedWriter
from typing import Literal

import asyncpg
import msgspec
from nats.aio.msg import Msg
from nats.errors import MsgAlreadyAckdError
from nats.js import JetStreamContext

from schemas.messages import BatchEvent, ResultMessage
from schemas.openai import LineError, LineResponse, OutputLine
from services.results_writer import store
from shared import bus, config, db, deadletters, telemetry
from shared.config import ConfigError, Settings
from shared.ids import stable_id
from shared.lane import lower_priority
from shared.storage import FileStorage

log = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)

SERVICE = "results_writer"
STREAM = bus.RESULTS
DURABLE = "results_writer"
FILTER_SUBJECT = "jetbatch.results.>"
# A fetch is written in one transaction well under a second; the margin covers a slow database
# and the bisection of a fetch that holds an unwritable result.
ACK_WAIT_S = 60
# Unlimited: a valid result is data that must reach the database. Failures that depend on the
# message are rejected (termed) explicitly; everything else is the database being unavailable,
# where we nak with a delay and wait, rather than let JetStream silently drop results.
MAX_DELIVER = -1
FETCH_BATCH = 1000
FETCH_TIMEOUT_S = 0.5
# Room for several writer processes sharing the durable, each with a fetch in hand.
MAX_ACK_PENDING = 20 * FETCH_BATCH

SWEEP_INTERVAL_S = 5.0
FINALIZE_CONCURRENCY = 2
CURSOR_PREFETCH = 1000
FILE_FLUSH_BYTES = 1024 * 1024
DRAIN_TIMEOUT_S = 20.0
RETRY_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)

# Errors caused by the content of a result: text PostgreSQL refuses (NUL, bad UTF-8) or an
# integer out of its column's range. The fetch is split to find the culprit. Any other error
# is treated as the database being unavailable, so an outage never makes us throw results away.
_DATA_ERRORS: tuple[type[Exception], ...] = (asyncpg.DataError, UnicodeError, OverflowError)
# A fetch whose every result is refused is retried this many deliveries before being rejected.
SYSTEMATIC_RETRIES = 3

_decoder = msgspec.json.Decoder(ResultMessage)
_encoder = msgspec.json.Encoder()


async def reject(pool: asyncpg.Pool, msg: Msg, reason: str) -> None:
    """A message we will never be able to use: record it as a dead letter (an operator can see
    and replay it), then term it so it is not redelivered. A crash in between redelivers it, and
    the dead letter is recorded once."""
    log.error(
        "rejected result message: subject=%s delivery=%d reason=%s",
        msg.subject,
        bus.delivery_count(msg),
        reason,
    )
    await deadletters.record_msg(pool, msg, reason)
    await msg.term()


def unstorable(result: ResultMessage, reason: str) -> ResultMessage:
    """The error line that stands in for a result PostgreSQL refused."""
    return ResultMessage(
        batch_id=result.batch_id,
        line=result.line,
        custom_id=result.custom_id,
        request_id=result.request_id,
        status_code=500,
        error_code="dead_lettered",
        error_message=f"the result of this request could not be stored ({reason[:200]}); it "
        "was kept as a dead letter",
        worker_id=result.worker_id,
        finished_at_ms=result.finished_at_ms,
    )


def result_record(result: ResultMessage) -> store.ResultRecord:
    """A request_results row; raises ValueError if the body is not UTF-8 (a poisoned message)."""
    body: str | None = None if result.response_body is None else str(result.response_body, "utf-8")
    if body == "null":
        # msgspec cannot tell `Raw | None` apart: a missing or null body decodes as Raw("null").
        body = None
    return (
        result.batch_id,
        result.custom_id,
        result.line,
        result.ok,
        result.status_code,
        result.request_id,
        body,
        result.error_code,
        result.error_message,
        result.input_tokens,
        result.cached_tokens,
        result.output_tokens,
    )


def output_line(
    batch_id: str,
    custom_id: str,
    *,
    ok: bool,
    status_code: int,
    request_id: str,
    response_body: str | None,
    error_code: str | None,
    error_message: str | None,
) -> OutputLine:
    """One line of the output (ok) or error file, as OpenAI writes it.

    A request the engine answered, even with an error object, keeps its response and has no
    `error`; one that never got an answer (expired, cancelled, dead-lettered) has only `error`.
    """
    line_id = stable_id("batch_req_", batch_id, custom_id)
    if response_body is not None or ok:
        body = msgspec.Raw(response_body.encode() if response_body is not None else b"null")
        response = LineResponse(status_code=status_code, request_id=request_id, body=body)
        return OutputLine(id=line_id, custom_id=custom_id, response=response, error=None)
    message = error_message or f"request failed with status {status_code}"
    return OutputLine(
        id=line_id,
        custom_id=custom_id,
        response=None,
        error=LineError(code=error_code, message=message),
    )


def output_file_id(batch_id: str, kind: Literal["output", "error"]) -> str:
    # Deterministic, so a finalization redone after a crash rewrites the same files.
    return stable_id("file-", batch_id, kind)


def event_id(batch_id: str, type_: str) -> str:
    return stable_id("evt_", batch_id, type_)


class _JsonlFile:
    """Output lines into a storage temp file, written in chunks off the event loop. Nothing is
    created on disk until the first line, so an empty file never exists."""

    def __init__(self, storage: FileStorage, key: str) -> None:
        self.key = key
        self.lines = 0
        self.size = 0
        self._storage = storage
        self._buf = bytearray()
        self._file: BufferedWriter | None = None

    def add(self, line: OutputLine) -> None:
        _encoder.encode_into(line, self._buf, -1)
        self._buf += b"\n"
        self.lines += 1

    async def flush_if_full(self) -> None:
        if len(self._buf) >= FILE_FLUSH_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        data, self._buf = self._buf, bytearray()
        if self._file is None:
            self._file = await asyncio.to_thread(open, self._storage.temp_path(self.key), "wb")
        await asyncio.to_thread(self._file.write, data)
        self.size += len(data)

    async def commit(self) -> int:
        """Flush, fsync and move into place; returns the file's size."""
        await self._flush()
        assert self._file is not None
        await asyncio.to_thread(self._file.close)
        await asyncio.to_thread(self._storage.commit, self.key)
        return self.size

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()


class ResultsWriter:
    def __init__(self, pool: asyncpg.Pool, js: JetStreamContext, storage: FileStorage) -> None:
        self._pool = pool
        self._js = js
        self._storage = storage
        self.pool = pool  # dead letters are recorded with it
        self._finalizing: dict[str, asyncio.Task[None]] = {}
        self._finalize_slots = asyncio.Semaphore(FINALIZE_CONCURRENCY)

    async def handle(self, results: Sequence[ResultMessage]) -> list[store.Touched]:
        """Write results in one transaction; returns the batches they touched, as they stand."""
        records = [result_record(r) for r in results]
        async with self._pool.acquire() as conn:
            touched = await store.write_results(conn, records, int(time.time()))
        if log.isEnabledFor(logging.DEBUG):
            known = {t.batch_id for t in touched}
            for batch_id in {r.batch_id for r in results} - known:
                # Normal: other services may publish results of their own on RESULTS.
                log.debug("batch %s: results skipped (unknown or closed batch)", batch_id)
            for t in touched:
                log.debug("batch %s: +%d results, %d/%d", t.batch_id, t.inserted, t.done, t.total)
        return touched

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
                with tracer.start_as_current_span("batch finalize") as span:
                    span.set_attribute("jetbatch.batch_id", batch_id)
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
                conn, sink.key, f"{batch.id}_{kind}.jsonl", sink.size, now, expires_at
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
        )
        subject = BatchEvent.subject_for(type_)
        with tracer.start_as_current_span(f"{subject} publish"):
            publisher = bus.Publisher(self._js)
            await publisher.publish(subject, _encoder.encode(event), event.id)
            await publisher.flush()

        closed = await store.finish_batch(
            conn, batch.id, batch.status, now, file_ids["output"], file_ids["error"]
        )
        if closed:
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
        finally:
            output.close()
            errors.close()
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


# Runner ------------------------------------------------------------------------------------


class _Runner:
    """Fetch, decode, write, ack after commit, and keep finalization going."""

    def __init__(self, writer: ResultsWriter, sub: bus.FastPull) -> None:
        self._writer = writer
        self._sub = sub
        self._failures = 0

    async def consume(self, stop: asyncio.Event) -> None:
        # The next fetch runs while this one is written, so pulling (client CPU) overlaps the
        # database's work. A fetch in hand when `stop` comes is still written: that takes less
        # time than waiting for its redelivery.
        ahead: asyncio.Task[list[Msg]] | None = asyncio.create_task(self._fetch(stop))
        try:
            while ahead is not None:
                msgs = await ahead
                ahead = None if stop.is_set() else asyncio.create_task(self._fetch(stop))
                if msgs:
                    await self._process_or_retry(msgs, stop)
        finally:
            if ahead is not None:
                ahead.cancel()

    async def _fetch(self, stop: asyncio.Event) -> list[Msg]:
        try:
            return await self._sub.fetch(FETCH_BATCH, FETCH_TIMEOUT_S)
        except Exception as e:  # disconnected: the client reconnects by itself
            log.warning("fetch failed: %r", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RETRY_BACKOFF_S[0])
            return []

    async def _process_or_retry(self, msgs: list[Msg], stop: asyncio.Event) -> None:
        try:
            with tracer.start_as_current_span(f"{FILTER_SUBJECT} process") as span:
                span.set_attribute("messaging.batch.message_count", len(msgs))
                await self.process(msgs)
            self._failures = 0
        except Exception:
            delay = RETRY_BACKOFF_S[min(self._failures, len(RETRY_BACKOFF_S) - 1)]
            self._failures += 1
            log.exception("writing %d results failed; retrying in %.0fs", len(msgs), delay)
            await _nak_unacked(msgs, delay)
            # Stop pulling meanwhile: the database is most likely down.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def process(self, msgs: list[Msg]) -> None:
        results: list[ResultMessage] = []
        held: list[Msg] = []
        for msg in msgs:
            try:
                result = _decoder.decode(msg.data)
            except msgspec.DecodeError as e:  # ValidationError included
                await reject(self._writer.pool, msg, f"undecodable: {e}")
                continue
            results.append(result)
            held.append(msg)
        for t in await self._write(results, held):
            if t.fully_accounted:
                self._writer.submit_finalize(t.batch_id)

    async def _write(self, results: list[ResultMessage], msgs: list[Msg]) -> list[store.Touched]:
        """Write and ack. On an error caused by content, split the fetch in halves until each
        culprit is alone and reject it: one bad result never holds up the others."""
        refused: list[tuple[Msg, ResultMessage, Exception]] = []
        touched = await self._write_split(results, msgs, refused)
        if (
            len(refused) == len(results) > 1
            and min(bus.delivery_count(m) for m, _, _ in refused) < SYSTEMATIC_RETRIES
        ):
            # Every result refused looks like our fault (a bug, a schema change), not theirs:
            # retry the fetch later rather than throw it away. Terming is the last resort, and
            # even then RESULTS keeps the messages for replay.
            raise refused[0][2]
        for msg, result, error in refused:
            reason = f"unwritable ({result.batch_id}/{result.custom_id}): {error!r}"
            await reject(self._writer.pool, msg, reason)
            try:
                touched += await self._writer.handle([unstorable(result, repr(error))])
            except _DATA_ERRORS as e:  # even its ids are unstorable: the stall flag shows it
                log.error(
                    "no error line for %s/%s either: %r", result.batch_id, result.custom_id, e
                )
        return touched

    async def _write_split(
        self,
        results: list[ResultMessage],
        msgs: list[Msg],
        refused: list[tuple[Msg, ResultMessage, Exception]],
    ) -> list[store.Touched]:
        if not results:
            return []
        try:
            touched = await self._writer.handle(results)
        except _DATA_ERRORS as e:
            if len(results) == 1:
                refused.append((msgs[0], results[0], e))
                return []
            mid = len(results) // 2
            first = await self._write_split(results[:mid], msgs[:mid], refused)
            return first + await self._write_split(results[mid:], msgs[mid:], refused)
        for msg in msgs:  # after commit: a crash before this only causes redelivery
            await msg.ack()
        return touched

    async def sweep_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._writer.sweep()
            except Exception:
                log.exception("sweep failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SWEEP_INTERVAL_S)


async def _nak_unacked(msgs: Sequence[Msg], delay_s: float) -> None:
    for msg in msgs:
        with contextlib.suppress(MsgAlreadyAckdError):
            await msg.nak(delay=delay_s)


# Wiring ------------------------------------------------------------------------------------


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Serve until `stop` is set, then finish the fetch in hand and any finalization (within
    DRAIN_TIMEOUT_S), drain NATS and close the pool."""
    if not settings.database_url or not settings.nats_url:
        raise ConfigError("results_writer needs JETBATCH_DATABASE_URL and JETBATCH_NATS_URL")
    async with AsyncExitStack() as stack:
        pool = await db.connect_pool(
            settings.database_url, min_size=2, max_size=2 + FINALIZE_CONCURRENCY
        )
        stack.push_async_callback(pool.close)
        nc = await bus.connect(settings.nats_url, name=SERVICE)
        # Exits run in reverse: NATS is drained (acks flushed) before the pool closes.
        stack.push_async_callback(nc.drain)
        js = nc.jetstream()
        await bus.ensure_streams(js, (bus.RESULTS, bus.EVENTS))
        sub = await bus.durable_fast_pull(
            js,
            STREAM,
            DURABLE,
            FILTER_SUBJECT,
            ack_wait_s=ACK_WAIT_S,
            max_deliver=MAX_DELIVER,
            max_ack_pending=MAX_ACK_PENDING,
        )
        # Before the drain: draining a pull subscription waits for late fetch-status replies
        # that nobody consumes (up to the 30 s drain timeout); we hold no unprocessed message.
        stack.push_async_callback(sub.unsubscribe)
        writer = ResultsWriter(pool, js, FileStorage(settings.files_dir))
        runner = _Runner(writer, sub)
        log.info("results_writer: consuming %s as %s", FILTER_SUBJECT, DURABLE)
        sweeper = asyncio.create_task(runner.sweep_forever(stop), name="sweep")
        try:
            await runner.consume(stop)
        finally:
            stop.set()
            await sweeper
            await writer.wait_finalizing(DRAIN_TIMEOUT_S)
        log.info("results_writer: stopped")


def main() -> None:
    settings = config.load()
    telemetry.setup(SERVICE, settings.log_level)
    lower_priority(settings.batch_nice)  # batch work only: yield to synchronous requests
    asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run(settings, stop)
