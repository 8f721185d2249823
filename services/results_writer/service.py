"""Writes request results to PostgreSQL in bulk and finalizes batches whose every line is in.

Consumes: CONSUMER below (RESULTS, every ResultMessage), a fetch of up to 1,000 written in one
transaction and acked after its commit. A message that does not decode (or cannot be stored) is
rejected: recorded in table `dead_letters` and termed; a result that decodes but cannot be
stored becomes an error line (`dead_lettered`), so its batch still finishes.

Emits: `schemas.messages.BatchEvent` on EVENTS, `batch.completed` (from `in_progress`, through
`finalizing`), `batch.cancelled` (from `cancelling`) or `batch.expired` (from `in_progress` once
the watchdog found it past its window), with `Nats-Msg-Id` = the event id, once the batch's
output and error files are written (finalize.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack

import asyncpg

from schemas.messages import BatchEvent, ResultMessage
from services.results_writer import metrics, store
from services.results_writer.finalize import FINALIZE_CONCURRENCY, Finalizer
from services.results_writer.lines import (
    output_file_id,
    output_line,
    result_record,
    unstorable,
)
from shared import bus, config, db, logship, process
from shared.consumer import Batch, Consumer, Runner
from shared.domain import deadletters
from shared.metrics import expose as expose_metrics

__all__ = [
    "CONSUMER",
    "CONSUMERS",
    "EMITS",
    "ResultsWriter",
    "output_file_id",
    "output_line",
    "result_record",
]

log = logging.getLogger(__name__)

SERVICE = "results_writer"
CONSUMER = Consumer(
    stream=bus.RESULTS,
    durable="results_writer",
    message=ResultMessage,
    batch=True,
    fetch=1_000,
    fetch_timeout_s=0.5,
    # A fetch is written in one transaction well under a second; the margin covers a slow
    # database and the bisection of a fetch that holds an unwritable result.
    ack_wait_s=60,
    # Unlimited: a valid result is data that must reach the database. Failures that depend on
    # the message are rejected (termed) explicitly; everything else is the database being
    # unavailable, where we nak with a delay and wait, rather than let JetStream silently drop
    # results.
    max_deliver=-1,
    # Room for several writer processes sharing the durable, each with a fetch in hand.
    max_ack_pending=20_000,
)
CONSUMERS = (CONSUMER,)
EMITS = (BatchEvent,)
DURABLE = CONSUMER.durable
DRAIN_TIMEOUT_S = 20.0

# Errors caused by the content of a result: text PostgreSQL refuses (NUL, bad UTF-8) or an
# integer out of its column's range. The fetch is split to find the culprit. Any other error
# is treated as the database being unavailable, so an outage never makes us throw results away.
_DATA_ERRORS: tuple[type[Exception], ...] = (asyncpg.DataError, UnicodeError, OverflowError)
# A fetch whose every result is refused is retried this many deliveries before being rejected.
SYSTEMATIC_RETRIES = 3


class ResultsWriter(Finalizer):
    async def handle(self, batch: Batch[ResultMessage]) -> None:
        """Write a fetch and queue the batches it completed for finalization. On an error
        caused by content, split the fetch in halves until each culprit is alone and reject it:
        one bad result never holds up the others."""
        results = batch.values
        refused: list[tuple[int, Exception]] = []
        touched = await self._write_split(results, 0, refused)
        if (
            len(refused) == len(results) > 1
            and min(batch.deliveries[i].number for i, _ in refused) < SYSTEMATIC_RETRIES
        ):
            # Every result refused looks like our fault (a bug, a schema change), not theirs:
            # retry the fetch later rather than throw it away. Terming is the last resort, and
            # even then RESULTS keeps the messages for replay.
            raise refused[0][1]
        for i, error in refused:
            result = results[i]
            batch.reject(i, f"unwritable ({result.batch_id}/{result.custom_id}): {error!r}")
            try:
                touched += await self.write([unstorable(result, repr(error))])
            except _DATA_ERRORS as e:  # even its ids are unstorable: the stall flag shows it
                log.error(
                    "no error line for %s/%s either: %r", result.batch_id, result.custom_id, e
                )
        for t in touched:
            if t.fully_accounted:
                self.submit_finalize(t.batch_id)

    async def _write_split(
        self, results: list[ResultMessage], offset: int, refused: list[tuple[int, Exception]]
    ) -> list[store.Touched]:
        if not results:
            return []
        try:
            return await self.write(results)
        except _DATA_ERRORS as e:
            if len(results) == 1:
                refused.append((offset, e))
                return []
            mid = len(results) // 2
            first = await self._write_split(results[:mid], offset, refused)
            return first + await self._write_split(results[mid:], offset + mid, refused)

    async def write(self, results: Sequence[ResultMessage]) -> list[store.Touched]:
        """Write results in one transaction; returns the batches they touched, as they stand."""
        records = [result_record(r) for r in results]
        async with self._pool.acquire() as conn:
            touched = await store.write_results(conn, records, int(time.time()))
        metrics.written(results, sum(t.inserted for t in touched))
        if log.isEnabledFor(logging.DEBUG):
            known = {t.batch_id for t in touched}
            for batch_id in {r.batch_id for r in results} - known:
                # Normal: other services may publish results of their own on RESULTS.
                log.debug("batch %s: results skipped (unknown or closed batch)", batch_id)
            for t in touched:
                log.debug("batch %s: +%d results, %d/%d", t.batch_id, t.inserted, t.done, t.total)
        return touched


async def run(settings: config.Settings, stop: asyncio.Event) -> None:
    """Serve until `stop` is set, then finish the fetch in hand and any finalization (within
    DRAIN_TIMEOUT_S), drain NATS and close the pool."""
    config.require(settings, SERVICE, "database_url", "nats_url")
    assert settings.database_url is not None and settings.nats_url is not None
    expose_metrics(settings, SERVICE)
    async with AsyncExitStack() as stack:
        pool = await db.connect_pool(
            settings.database_url, min_size=2, max_size=2 + FINALIZE_CONCURRENCY
        )
        stack.push_async_callback(pool.close)
        nc = await bus.connect(settings.nats_url, name=SERVICE)
        # Exits run in reverse: NATS is drained (acks flushed) before the pool closes.
        stack.push_async_callback(nc.drain)
        await stack.enter_async_context(logship.shipping(nc, SERVICE, settings.nats_replicas))
        js = nc.jetstream()
        await bus.ensure_streams(js, (bus.RESULTS, bus.EVENTS), replicas=settings.nats_replicas)
        writer = ResultsWriter(pool, js, await bus.files_bucket(js, settings.nats_replicas))
        runner = Runner(js, CONSUMER, deadletters.InDatabase(pool))
        log.info("results_writer: consuming %s", CONSUMER.describe())
        sweeper = asyncio.create_task(writer.sweep_forever(stop), name="sweep")
        try:
            await runner.run(writer.handle, stop)
        finally:
            stop.set()
            await sweeper
            await writer.wait_finalizing(DRAIN_TIMEOUT_S)
        log.info("results_writer: stopped")


def main() -> None:
    process.main(SERVICE, run, batch_only=True)  # batch work only: yields to synchronous requests
