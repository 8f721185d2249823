"""watchdog: records dead letters and keeps every batch moving towards its end.

Consumes: CONSUMER below, the whole of stream DEADLETTERS as durable `watchdog`, max_deliver
unlimited (a dead letter is data that must reach the database): DeadLetterMessage on
`jetbatch.deadletters.<stream>` (from services without a database) and MaxDeliveriesAdvisory on
`$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.REQUESTS.>` (JetStream's advisory for a request that
reached max deliveries: its worker crashed or hung on it every time). Each becomes a row of
`dead_letters`; one that does not decode is rejected by the runner, i.e. recorded as such.
Emits: for a dead-lettered request, an error line (`dead_lettered` ResultMessage on RESULTS, msg
id `<batch_id>:<line>:r:dead_letter`), so its batch can still finish, and a max-delivered request
is then deleted from REQUESTS; BatchCommand `close_out` / `redrive` on CONTROL (for the api);
puts into KV `jetbatch_cancelled`.
Reads: table batches, KV `jetbatch_workers`. Deletes: expired files (their objects in the files
bucket and their copies on RESULTS / REQUESTS), pruned request_results rows.

Every JETBATCH_WATCHDOG_INTERVAL_S it:
  1. expires in_progress batches past expires_at (`ending = 'expired'`),
  2. puts every cancelled or expiring batch into KV `jetbatch_cancelled` (workers stop running
     its requests; the api puts cancels there too, this repairs a put that failed),
  3. once a cancelled/expiring batch's JETBATCH_CLOSE_GRACE_S is over, asks the api to close it
     out (BatchCommand `close_out` on CONTROL): its lines without a result become
     batch_cancelled / batch_expired lines, then the results writer finalizes it,
  4. asks the api to re-drive batches left in `validating` (or in progress, not fully
     published) for JETBATCH_REDRIVE_AFTER_S (BatchCommand `redrive`),
  5. flags open batches without progress for JETBATCH_BATCH_STALL_S (`stalled_at`, shown on the
     batch object) and clears the flag when they move again,
  6. logs workers whose heartbeat is older than JETBATCH_WORKER_STALE_S (GET /v1/workers shows
     them with `stale: true`),
  7. deletes files past their expires_at, with every copy of their content
     (shared/domain/retention.py), except the input file of a batch that has not ended (kept
     until it ends); at most EXPIRE_FILES_PER_ROUND a round,
  8. prunes the request_results rows of ended batches the results writer did not prune itself
     (batches that ended before pruning existed, failed ones), PRUNE_BATCHES_PER_ROUND a round,
     and deletes rate-limit windows (`rate_usage`) that ended more than a day ago,
  9. every ORPHAN_SWEEP_INTERVAL_S, purges the files bucket's chunks of uploads cut short by a
     crash (FileObjects.sweep_orphans).
Finishing batches whose finalization was interrupted is the results writer's own sweep (every
5 s, services/results_writer): not repeated here. Every step is idempotent; several watchdogs may
run at once (commands carry deterministic msg ids, so their duplicates are dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from contextlib import AsyncExitStack
from typing import Any

import asyncpg
import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from schemas.messages import (
    BatchCommand,
    BatchStop,
    DeadLetterMessage,
    LineKey,
    MaxDeliveriesAdvisory,
    RequestMessage,
    ResultMessage,
    WorkerHeartbeat,
    subject_token,
)
from services.watchdog import metrics, store
from shared import bus, config, db, logship, process
from shared.bus import FileObjects
from shared.consumer import Consumer, Delivery, Runner, sleep_unless
from shared.domain import deadletters, replay, retention
from shared.ids import stable_id
from shared.metrics import expose as expose_metrics

log = logging.getLogger(__name__)

SERVICE = "watchdog"

CONSUMER: Consumer[DeadLetterMessage | MaxDeliveriesAdvisory] = Consumer(
    stream=bus.DEADLETTERS,
    durable="watchdog",
    message=(DeadLetterMessage, MaxDeliveriesAdvisory),
    ack_wait_s=60,
    max_deliver=-1,
)
CONSUMERS = (CONSUMER,)
EMITS = (ResultMessage, BatchCommand, "BatchStop into KV `jetbatch_cancelled`")

# Commands to the api are re-sent at most once per this many seconds (msg id bucket).
COMMAND_PERIOD_S = 60
# Retention work per round is bounded in count and time, so a backlog (an upgrade's finished
# batches, a day of expired files) is worked off over rounds without holding up the other steps.
EXPIRE_FILES_PER_ROUND = 100
PRUNE_BATCHES_PER_ROUND = 50
RETENTION_BUDGET_S = 2.0
# The orphan sweep reads every chunk subject of the files bucket: not every round.
ORPHAN_SWEEP_INTERVAL_S = 300.0

_heartbeat = msgspec.json.Decoder(WorkerHeartbeat)
_encoder = msgspec.json.Encoder()


# Dead letters --------------------------------------------------------------------------------


class Recorder:
    """Records DEADLETTERS messages in table `dead_letters` (the runner acks each after)."""

    def __init__(self, pool: asyncpg.Pool, js: JetStreamContext) -> None:
        self.pool = pool
        self.js = js

    async def handle(
        self, value: DeadLetterMessage | MaxDeliveriesAdvisory, _: Delivery[Any]
    ) -> None:
        if isinstance(value, MaxDeliveriesAdvisory):
            await self._max_delivered(value)
            return
        dead_letter_id = await deadletters.record(
            self.pool,
            source=value.stream,
            stream_seq=value.stream_seq,
            consumer=value.consumer,
            subject=value.original_subject,
            payload=value.payload,
            headers=value.headers,
            error=value.error,
            deliveries=value.deliveries,
        )
        if value.stream == bus.REQUESTS.name:
            await self._error_line(
                value.payload, value.original_subject, dead_letter_id, value.error
            )

    async def _max_delivered(self, advisory: MaxDeliveriesAdvisory) -> None:
        try:
            original = await self.js.get_msg(advisory.stream, advisory.stream_seq)
        except NotFoundError:
            # Already recorded and deleted by an earlier attempt (or acked at the last moment).
            log.info(
                "%s seq %d reached max deliveries but is gone: nothing to record",
                advisory.stream, advisory.stream_seq,
            )  # fmt: skip
            return
        payload = original.data or b""
        reason = (
            f"reached max deliveries ({advisory.deliveries}) on consumer {advisory.consumer} "
            "without a result: its worker crashed or timed out on every delivery"
        )
        dead_letter_id = await deadletters.record(
            self.pool,
            source=advisory.stream,
            stream_seq=advisory.stream_seq,
            consumer=advisory.consumer,
            subject=original.subject or "",
            payload=payload,
            headers=dict(original.headers) if original.headers else None,
            error=reason,
            deliveries=advisory.deliveries,
        )
        if advisory.stream == bus.REQUESTS.name:
            await self._error_line(
                payload, original.subject or "", dead_letter_id,
                "the request failed on every delivery",
            )  # fmt: skip
        # Recorded (and answered): it no longer needs to sit in the work queue.
        with contextlib.suppress(NotFoundError):
            await self.js.delete_msg(advisory.stream, advisory.stream_seq)

    async def _error_line(
        self, payload: bytes, subject: str, dead_letter_id: int, reason: str
    ) -> None:
        key = deadletters.line_key(payload)
        if key.batch_id is None or key.custom_id is None or key.line is None:
            log.warning("dead letter %d names no batch line: no error line", dead_letter_id)
            return
        if subject_token(key.project) != RequestMessage.project_in(subject):
            # Its publisher was allowed the subject's project only: no line in another's batch.
            log.warning("dead letter %d names another project: no error line", dead_letter_id)
            return
        result = dead_lettered_result(key, dead_letter_id, reason)
        publisher = bus.Publisher(self.js)
        # Not the result's usual msg id: a replay of the request within the duplicate window
        # must not have its real result dropped as a duplicate of this one. The results writer
        # keeps whichever result of the line it writes first.
        await publisher.publish(
            result.published_on,
            _encoder.encode(result),
            f"{result.msg_id}:dead_letter",
        )
        await publisher.flush()


def dead_lettered_result(key: LineKey, dead_letter_id: int, reason: str) -> ResultMessage:
    """The error line a dead-lettered request becomes."""
    assert key.batch_id is not None and key.custom_id is not None and key.line is not None
    return ResultMessage.failure(
        batch_id=key.batch_id,
        line=key.line,
        custom_id=key.custom_id,
        request_id=stable_id("req_", key.batch_id, key.custom_id),
        status_code=500,
        code="dead_lettered",
        message=f"{reason}; the request was set aside as dead letter {dead_letter_id} "
        "(GET /v1/dead_letters)",
        worker_id=SERVICE,
        project=key.project,
    )


# Rounds -------------------------------------------------------------------------------------


def stale_workers(
    beats: list[WorkerHeartbeat], now: float, stale_after_s: float
) -> list[WorkerHeartbeat]:
    return [b for b in beats if now - b.seen_at > stale_after_s]


async def read_heartbeats(kv) -> list[WorkerHeartbeat]:  # type: ignore[no-untyped-def]
    beats = []
    try:
        keys = await kv.keys()
    except Exception:  # an empty bucket answers NoKeysError
        return []
    for key in keys:
        with contextlib.suppress(Exception):
            entry = await kv.get(key)
            if entry.value:
                beats.append(_heartbeat.decode(entry.value))
    return beats


class Watchdog:
    """The rounds: expiry, stop and close-out, re-drive, stall and stale-worker flags,
    retention."""

    def __init__(
        self,
        settings: config.Settings,
        pool: asyncpg.Pool,
        js: JetStreamContext,
        workers,  # type: ignore[no-untyped-def]
        cancelled,  # type: ignore[no-untyped-def]
        files: FileObjects,
    ) -> None:
        self.settings = settings
        self.health = settings.health
        self.pool = pool
        self.js = js
        self.workers = workers
        self.cancelled = cancelled
        self.files = files
        self._announced: set[str] = set()  # batches put into jetbatch_cancelled by this process
        self._stale_logged: set[str] = set()
        self._next_orphan_sweep = 0.0  # time.monotonic(); the first round sweeps

    async def round(self) -> None:
        """One look at everything. Each step runs even if an earlier one failed."""
        for step in (
            self.expire,
            self.stop_and_close_out,
            self.redrive,
            self.flag_stalled,
            self.flag_stale_workers,
            self.expire_files,
            self.prune_results,
            self.sweep_orphans,
        ):
            try:
                await step()
            except Exception:
                log.exception("watchdog step %s failed; next round retries", step.__name__)
        metrics.LAST_ROUND.set_to_current_time()

    async def expire(self) -> None:
        async with self.pool.acquire() as conn:
            expired = await store.expire_due(conn, int(time.time()))
        for batch_id in expired:
            log.info("batch %s: completion window over, expiring", batch_id)

    async def stop_and_close_out(self) -> None:
        now = int(time.time())
        async with self.pool.acquire() as conn:
            batches = await store.stopping(conn)
        publisher = bus.Publisher(self.js)
        for batch in batches:
            if batch.batch_id not in self._announced:
                stop = BatchStop(batch_id=batch.batch_id, reason=batch.reason, at=batch.since)  # type: ignore[arg-type]
                await self.cancelled.put(batch.batch_id, _encoder.encode(stop))
                self._announced.add(batch.batch_id)
            if not batch.closed_out and now - batch.since >= self.health.close_grace_s:
                await self._command(publisher, batch.batch_id, "close_out", now)
        await publisher.flush()
        # Forget batches that are done stopping, so the set stays small.
        self._announced &= {b.batch_id for b in batches}

    async def redrive(self) -> None:
        now = int(time.time())
        async with self.pool.acquire() as conn:
            due = await store.redrive_due(conn, now - int(self.health.redrive_after_s))
        publisher = bus.Publisher(self.js)
        for batch_id in due:
            log.warning("batch %s: not validated and published in time; re-driving", batch_id)
            await self._command(publisher, batch_id, "redrive", now)
        await publisher.flush()

    async def _command(
        self, publisher: bus.Publisher, batch_id: str, action: str, now: int
    ) -> None:
        command = BatchCommand(batch_id=batch_id, action=action, issued_at=now)  # type: ignore[arg-type]
        # One command per batch and action per period: a command the api is still working on
        # is not piled up every round.
        msg_id = f"{action}:{batch_id}:{now // COMMAND_PERIOD_S}"
        await publisher.publish(BatchCommand.subject_for(action), _encoder.encode(command), msg_id)

    async def flag_stalled(self) -> None:
        now = int(time.time())
        async with self.pool.acquire() as conn:
            flagged = await store.flag_stalled(conn, now, self.health.batch_stall_s)
            cleared = await store.clear_stalled(conn)
        for batch_id in flagged:
            log.warning(
                "batch %s: no progress for %.0f s (flagged stalled)",
                batch_id, self.health.batch_stall_s,
            )  # fmt: skip
        for batch_id in cleared:
            log.info("batch %s: moving again (stalled flag cleared)", batch_id)

    async def flag_stale_workers(self) -> None:
        now = time.time()
        stale = stale_workers(await read_heartbeats(self.workers), now, self.health.worker_stale_s)
        for beat in stale:
            if beat.worker_id not in self._stale_logged:
                log.warning(
                    "worker %s (model %s on %s) last seen %ds ago: stale",
                    beat.worker_id, beat.model, beat.host, int(now - beat.seen_at),
                )  # fmt: skip
        self._stale_logged = {b.worker_id for b in stale}
        metrics.STALE_WORKERS.set(len(stale))

    # Retention (README: Retention) ------------------------------------------------------------

    async def expire_files(self) -> None:
        now = int(time.time())
        async with self.pool.acquire() as conn:
            due = await store.expired_files(conn, now, EXPIRE_FILES_PER_ROUND)
        deadline = time.monotonic() + RETENTION_BUDGET_S
        for file_id in due:
            try:
                deleted = await retention.delete_file(self.pool, self.js, self.files, file_id)
            except retention.FileInUse as e:  # a batch was created from it meanwhile
                log.info("file %s expired, kept: %s", file_id, e)
                continue
            except Exception:
                # Left as it was (one transaction): the next round tries it again.
                log.exception("file %s expired but could not be deleted", file_id)
                continue
            if deleted is not None:
                log.info(
                    "file %s expired: deleted, with the copies of batches %s",
                    file_id, [b.batch_id for b in deleted.batches],
                )  # fmt: skip
            if time.monotonic() > deadline:
                break

    async def prune_results(self) -> None:
        deadline = time.monotonic() + RETENTION_BUDGET_S
        async with self.pool.acquire() as conn:
            for batch_id in await store.unpruned_batches(conn, PRUNE_BATCHES_PER_ROUND):
                if await retention.prune_results(conn, [batch_id]):
                    log.info("batch %s: lines folded into usage_minutes and pruned", batch_id)
                if time.monotonic() > deadline:
                    break
            await store.forget_old_rate_windows(conn, time.time())
            await store.forget_old_idempotency_keys(conn, time.time())

    async def sweep_orphans(self) -> None:
        now = time.monotonic()
        if now < self._next_orphan_sweep:
            return
        # Set first: a sweep that fails is tried again after the interval, not every round.
        self._next_orphan_sweep = now + ORPHAN_SWEEP_INTERVAL_S
        await self.files.sweep_orphans()

    async def rounds(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.round()
            await sleep_unless(stop, self.health.watchdog_interval_s)


# Wiring -------------------------------------------------------------------------------------


async def run(settings: config.Settings, stop: asyncio.Event) -> None:
    config.require(settings, SERVICE, "nats_url", "database_url")
    assert settings.nats_url is not None and settings.database_url is not None
    expose_metrics(settings, SERVICE)
    async with AsyncExitStack() as stack:
        pool = await db.connect_pool(settings.database_url, min_size=1, max_size=4)
        stack.push_async_callback(pool.close)
        nc = await bus.connect(settings.nats_url, name=SERVICE)
        stack.push_async_callback(_drain, nc)
        await stack.enter_async_context(logship.shipping(nc, SERVICE, settings.nats_replicas))
        js = nc.jetstream()
        await bus.ensure_streams(js, replicas=settings.nats_replicas)
        watchdog = Watchdog(
            settings,
            pool,
            js,
            await bus.workers_kv(js, settings.nats_replicas),
            await bus.cancelled_kv(js, settings.nats_replicas),
            await bus.files_bucket(js, settings.nats_replicas),
        )
        dead_letters = Runner(js, CONSUMER, deadletters.InDatabase(pool))
        await replay.serve(nc, pool, js)  # the api's replays of results and control messages
        log.info("watchdog: every %.1f s; dead letters from %s", settings.health.watchdog_interval_s,
                 bus.DEADLETTERS.name)  # fmt: skip
        await asyncio.gather(
            watchdog.rounds(stop), dead_letters.run(Recorder(pool, js).handle, stop)
        )
        log.info("watchdog: stopped")


async def _drain(nc) -> None:  # type: ignore[no-untyped-def]
    with contextlib.suppress(Exception):
        await nc.drain()


def main() -> None:
    process.main(SERVICE, run, batch_only=True)  # nothing synchronous waits on it: it yields
