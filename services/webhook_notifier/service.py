"""webhook_notifier: tells clients that a batch ended, with Standard-Webhooks-signed POSTs.

Consumes: CONSUMER below, stream EVENTS as durable `webhook_notifier`, BatchEvent on
`jetbatch.events.batch.<project>.<status>`, a fetch of up to 100 at a time, max_deliver unlimited (an event
is data that must reach the database). Each fetch becomes one transaction that inserts a delivery
per destination (idempotent on (event_id, destination)) and is acked after its commit. An event
that does not decode, or that PostgreSQL cannot store, is a dead letter (table `dead_letters`).
Emits: HTTP POSTs of `schemas.webhooks.WebhookEvent` to the registered endpoints whose event types
match, among the batch's project's endpoints only, and to the batch's own `metadata.webhook_url`
(signed with its project's secret; the default project's is JETBATCH_WEBHOOK_SECRET until it is
rotated through `/v1/organization/projects/{id}/webhook_secret/rotate`).

The delivery loop (Deliverer), in the same process, claims due deliveries (`FOR UPDATE SKIP
LOCKED`, then a lease: services/webhook_notifier/store.py) and attempts each: any non-2xx answer
or network error is retried with exponential backoff and full jitter until
JETBATCH_WEBHOOK_MAX_ATTEMPTS or JETBATCH_WEBHOOK_MAX_AGE_S, then the delivery is a dead letter
(`/v1/webhook_deliveries`). Every attempt is recorded. Each retry carries the same `webhook-id`
(the event id), so a receiver de-duplicates the rare second copy (a notifier killed after the
POST but before recording it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import AsyncExitStack

import aiohttp
import asyncpg
import msgspec

from schemas.messages import BatchEvent
from schemas.projects import DEFAULT_PROJECT_ID
from schemas.webhooks import WebhookEvent, WebhookEventData
from services.webhook_notifier import metrics, sender, store
from shared import bus, config, db, logs, logship, process, telemetry, tracing
from shared.backoff import BACKOFF, Backoff
from shared.config import Settings, WebhookSettings
from shared.consumer import Batch, Consumer, Runner
from shared.domain import deadletters
from shared.domain.webhooks import UnsafeUrl, host_key, parse_url
from shared.ids import stable_id
from shared.metrics import expose as expose_metrics

log = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)

SERVICE = "webhook_notifier"

CONSUMER = Consumer(
    stream=bus.EVENTS,
    durable="webhook_notifier",
    message=BatchEvent,
    batch=True,
    fetch=100,
    ack_wait_s=60,
    max_deliver=-1,
    max_ack_pending=1_000,
)
CONSUMERS = (CONSUMER,)
EMITS = ("WebhookEvent as signed HTTP POSTs",)

BATCH_URL_KEY = "webhook_url"  # metadata key of a batch's own destination
BATCH_URL_DESTINATION = "batch_url"
# The body is small (an id and at most 16 metadata pairs); an event published straight onto the
# bus with more than this is dead-lettered rather than sent.
MAX_PAYLOAD_BYTES = 64 * 1024
# A claimed delivery is leased for its attempt's timeout plus this margin (the time to record
# the outcome); past it, a notifier that died mid-attempt is presumed dead and the delivery is
# claimed again.
LEASE_MARGIN_S = 10.0
IDLE_POLL_S = 2.0  # longest sleep of the delivery loop (new rows also wake it)
CANDIDATES_PER_SLOT = 2

# Errors caused by an event's content rather than by the database being unavailable.
_DATA_ERRORS: tuple[type[Exception], ...] = (asyncpg.DataError, UnicodeError)
_encoder = msgspec.json.Encoder()
_metadata_decoder = msgspec.json.Decoder(dict[str, str] | None)
# A batch without a row (an event published by hand): the default project's.
_DEFAULT_BATCH = store.BatchInfo()


def delivery_id(event_id: str, destination: str) -> str:
    return stable_id("whd_", event_id, destination)


def payload(event: BatchEvent, metadata: dict[str, str] | None) -> bytes:
    body = WebhookEvent(
        id=event.id,
        type=event.type,
        created_at=event.created_at,
        data=WebhookEventData(id=event.batch_id, metadata=metadata),
    )
    return _encoder.encode(body)


# The handler: events -> delivery rows --------------------------------------------------------


class Scheduler:
    """Turns events into delivery rows, one per destination, and wakes the delivery loop."""

    def __init__(
        self, pool: asyncpg.Pool, policy: WebhookSettings, wake: asyncio.Event | None = None
    ) -> None:
        self._pool = pool
        self._policy = policy
        self._wake = wake or asyncio.Event()

    async def handle(self, batch: Batch[BatchEvent]) -> None:
        """One fetch, in one transaction; the runner acks it after the commit. From then on the
        deliveries live in PostgreSQL, not on the bus."""
        events = batch.values
        try:
            new = await self.schedule(events)
        except _DATA_ERRORS:
            # Text PostgreSQL refuses (a NUL in a URL, say) in one event: schedule them one by
            # one, so the culprit alone is rejected and the others go out.
            new = 0
            for i, event in enumerate(events):
                try:
                    new += await self.schedule([event])
                except _DATA_ERRORS as e:
                    batch.reject(i, f"unstorable event {event.id} of {event.batch_id}: {e!r}")
        for i, event in enumerate(events):
            if i not in batch.rejected:
                log.info("batch %s: event %s %s scheduled", event.batch_id, event.id, event.type)
        if new:
            self._wake.set()

    async def schedule(self, events: Sequence[BatchEvent]) -> int:
        """Insert the events' deliveries in one transaction; returns how many were new."""
        now = int(time.time())
        async with self._pool.acquire() as conn, conn.transaction():
            endpoints = await store.live_endpoints(conn)
            batches = await store.batch_info(conn, sorted({e.batch_id for e in events}))
            rows: list[store.NewDelivery] = []
            for event in events:
                info = batches.get(event.batch_id, _DEFAULT_BATCH)
                metadata = event.metadata
                if metadata is None and info.metadata_json is not None:
                    with contextlib.suppress(msgspec.DecodeError):
                        metadata = _metadata_decoder.decode(info.metadata_json)
                rows.extend(self._rows(event, metadata, endpoints, now, info))
            inserted = await store.insert_deliveries(conn, rows)
            await store.refresh_batches(conn, sorted(set(inserted)))
        return len(inserted)

    def _rows(
        self,
        event: BatchEvent,
        metadata: dict[str, str] | None,
        endpoints: Sequence[store.EndpointRow],
        now: int,
        batch: store.BatchInfo = _DEFAULT_BATCH,
    ) -> list[store.NewDelivery]:
        body = payload(event, metadata)
        too_big = (
            f"payload of {len(body)} bytes is over the {MAX_PAYLOAD_BYTES}-byte limit"
            if len(body) > MAX_PAYLOAD_BYTES
            else None
        )
        text = body.decode()
        rows: list[store.NewDelivery] = []

        def add(destination: str, endpoint_id: str | None, url: str, refused: str | None) -> None:
            rows.append((
                delivery_id(event.id, destination), event.id, event.type, event.batch_id,
                destination, endpoint_id, url, host_key(url), text,
                "dead" if refused else "pending", now, now if refused else None, refused,
                batch.project_id,
            ))  # fmt: skip
            if refused:
                log.warning(
                    "batch %s: webhook %s to %s refused: %s", event.batch_id, event.id, url, refused
                )

        for endpoint in endpoints:
            if event.type in endpoint.event_types and endpoint.project_id == batch.project_id:
                add(endpoint.id, endpoint.id, endpoint.url, too_big)
        url = (metadata or {}).get(BATCH_URL_KEY)
        if url:
            refused = too_big
            try:
                parse_url(url)
            except UnsafeUrl as e:
                refused = refused or str(e)
            if self._project_secret(batch.project_id, batch.project_secret) is None:
                refused = refused or (
                    "JETBATCH_WEBHOOK_SECRET is not set: nothing to sign metadata.webhook_url "
                    "deliveries with"
                )
            add(BATCH_URL_DESTINATION, None, url, refused)
        return rows

    def _project_secret(self, project_id: str, own: str | None) -> str | None:
        return project_secret(self._policy, project_id, own)


def project_secret(policy: WebhookSettings, project_id: str, own: str | None) -> str | None:
    """What signs a project's metadata.webhook_url deliveries: its own secret; the default
    project's is the deployment's until it is rotated."""
    if own is not None:
        return own
    return policy.secret if project_id == DEFAULT_PROJECT_ID else None


# Delivery: due rows -> signed POSTs ---------------------------------------------------------


def backoff_s(policy: WebhookSettings, cycle_attempt: int, rng: random.Random) -> float:
    """The wait after the n-th failed attempt: the one Backoff, with full jitter."""
    return Backoff(policy.backoff_base_s, policy.backoff_max_s, jitter=True).delay_s(
        cycle_attempt, rng
    )


def next_state(
    policy: WebhookSettings,
    claimed: store.Claimed,
    outcome: sender.Outcome,
    rng: random.Random,
) -> tuple[str, float, str | None]:
    """(status, seconds until the next attempt, error to record) after an attempt."""
    if outcome.ok:
        return "delivered", 0.0, None
    error = outcome.error or "failed"
    if outcome.permanent:
        return "dead", 0.0, error
    if claimed.cycle_attempt >= policy.max_attempts:
        return "dead", 0.0, f"gave up after {claimed.cycle_attempt} attempts; last: {error}"
    left_s = policy.max_age_s - claimed.cycle_age_s
    if left_s <= 0:
        return "dead", 0.0, f"gave up after {policy.max_age_s:g}s; last: {error}"
    # The last retry lands at the max age rather than never happening.
    return "pending", min(backoff_s(policy, claimed.cycle_attempt, rng), left_s), error


class Deliverer:
    """Claims due deliveries within its concurrency (total and per host) and attempts them."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        session: aiohttp.ClientSession,
        policy: WebhookSettings,
        rng: random.Random | None = None,
    ) -> None:
        self._pool = pool
        self._session = session
        self._policy = policy
        self._rng = rng or random.Random()
        self._in_flight: Counter[str] = Counter()  # per host
        self._tasks: set[asyncio.Task[None]] = set()
        self.wake = asyncio.Event()

    @property
    def lease_s(self) -> float:
        return self._policy.timeout_s + LEASE_MARGIN_S

    def _saturated(self) -> list[str]:
        limit = self._policy.concurrency_per_host
        return [host for host, n in self._in_flight.items() if n >= limit]

    async def claim(self) -> int:
        """One round: lease what fits in the free slots and start attempting it."""
        free = self._policy.concurrency - len(self._tasks)
        if free <= 0:
            return 0
        saturated = self._saturated()
        async with self._pool.acquire() as conn, conn.transaction():
            candidates = await store.due_candidates(conn, saturated, free * CANDIDATES_PER_SLOT)
            picked: list[asyncpg.Record] = []
            room = Counter(
                {h: self._policy.concurrency_per_host - n for h, n in self._in_flight.items()}
            )
            for row in candidates:
                host = row["host"]
                left = room.get(host, self._policy.concurrency_per_host)
                if left <= 0 or len(picked) >= free:
                    continue  # stays due; its lock ends with this transaction
                room[host] = left - 1
                picked.append(row)
            claimed = await store.start_attempts(conn, picked, self.lease_s, int(time.time()))
        for delivery in claimed:
            self._in_flight[delivery.host] += 1
            task = asyncio.create_task(self._attempt(delivery), name=f"deliver {delivery.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(claimed)

    async def _attempt(self, delivery: store.Claimed) -> None:
        logs.bind(delivery.batch_id)  # this task's records name the batch
        try:
            with tracer.start_as_current_span(
                "webhook deliver", context=tracing.batch_context(delivery.batch_id)
            ) as span:
                span.set_attribute("jetbatch.batch_id", delivery.batch_id)
                span.set_attribute("jetbatch.delivery_id", delivery.id)
                outcome = await self._send(delivery)
                span.set_attribute("http.response.status_code", outcome.status_code or 0)
            status, retry_in_s, error = next_state(self._policy, delivery, outcome, self._rng)
            async with self._pool.acquire() as conn:
                kept = await store.finish_attempt(
                    conn, delivery, status_code=outcome.status_code, error=outcome.error,
                    latency_ms=outcome.latency_ms, new_status=status, last_error=error,
                    retry_in_s=retry_in_s,
                    now=int(time.time()),
                )  # fmt: skip
            self._log(delivery, outcome, status, retry_in_s, error, kept)
            metrics.attempted(status, outcome.latency_ms)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The lease runs out and the delivery is attempted again (same webhook-id).
            log.exception("batch %s: recording delivery %s failed", delivery.batch_id, delivery.id)
        finally:
            self._in_flight[delivery.host] -= 1
            if self._in_flight[delivery.host] <= 0:
                del self._in_flight[delivery.host]
            self.wake.set()

    async def _send(self, delivery: store.Claimed) -> sender.Outcome:
        if delivery.endpoint_deleted:
            return sender.Outcome(ok=False, error="endpoint removed", permanent=True)
        if delivery.endpoint_id is None:
            own = delivery.secrets[0] if delivery.secrets else None
            secret = project_secret(self._policy, delivery.project_id, own)
            secrets: tuple[str, ...] = (secret,) if secret else ()
        else:
            secrets = delivery.secrets
        return await sender.send(
            self._session, delivery.url, delivery.payload.encode(), msg_id=delivery.event_id,
            secrets=secrets, allowed=self._policy.allowed_networks,
            timeout_s=self._policy.timeout_s,
        )  # fmt: skip

    @staticmethod
    def _log(
        d: store.Claimed,
        outcome: sender.Outcome,
        status: str,
        retry_in_s: float,
        error: str | None,
        kept: bool,
    ) -> None:
        where = f"batch {d.batch_id}: webhook {d.event_id} to {d.url} (attempt {d.attempt})"
        if not kept:
            log.warning("%s: outcome recorded, but the delivery was taken over or cancelled", where)
        elif status == "delivered":
            log.info(
                "%s: delivered, HTTP %s in %s ms", where, outcome.status_code, outcome.latency_ms
            )
        elif status == "dead":
            log.error("%s: dead letter: %s", where, error)
        else:
            log.warning("%s: %s; retrying in %.1fs", where, error, retry_in_s)

    async def run(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            self.wake.clear()
            try:
                while await self.claim():
                    pass
                wait_s = await store.seconds_until_due(self._pool, self._saturated())
                failures = 0
            except Exception:
                failures += 1
                log.exception("claiming deliveries failed; retrying")
                wait_s = BACKOFF.delay_s(failures)
            if len(self._tasks) >= self._policy.concurrency or wait_s is None:
                wait_s = IDLE_POLL_S
            wait_s = min(max(wait_s, 0.005), IDLE_POLL_S)
            waiter = asyncio.create_task(self.wake.wait())
            stopper = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait({waiter, stopper}, timeout=wait_s, return_when="FIRST_COMPLETED")
            finally:
                waiter.cancel()
                stopper.cancel()

    async def drain(self, timeout_s: float) -> None:
        """Let attempts in flight finish and be recorded; past the timeout, cancel them (their
        lease runs out and they are attempted again)."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


# Wiring -------------------------------------------------------------------------------------


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Serve until `stop` is set, then let attempts in flight finish (up to one timeout), drain
    NATS and close the pool."""
    config.require(settings, SERVICE, "database_url", "nats_url")
    assert settings.database_url is not None and settings.nats_url is not None
    expose_metrics(settings, SERVICE)
    policy = settings.webhooks
    if policy.secret is None:
        log.warning(
            "JETBATCH_WEBHOOK_SECRET is not set: batches' metadata.webhook_url deliveries will "
            "be dead-lettered (registered endpoints have their own secrets)"
        )
    async with AsyncExitStack() as stack:
        pool = await db.connect_pool(settings.database_url, min_size=2, max_size=4)
        stack.push_async_callback(pool.close)
        session = sender.new_session(
            allowed=policy.allowed_networks,
            concurrency=policy.concurrency,
            concurrency_per_host=policy.concurrency_per_host,
        )
        stack.push_async_callback(session.close)
        nc = await bus.connect(settings.nats_url, name=SERVICE)
        stack.push_async_callback(nc.drain)
        await stack.enter_async_context(logship.shipping(nc, SERVICE, settings.nats_replicas))
        js = nc.jetstream()
        await bus.ensure_streams(js, (bus.EVENTS,), replicas=settings.nats_replicas)
        deliverer = Deliverer(pool, session, policy)
        scheduler = Scheduler(pool, policy, deliverer.wake)
        events = Runner(js, CONSUMER, deadletters.InDatabase(pool))
        log.info("webhook_notifier: consuming %s", CONSUMER.describe())
        delivering = asyncio.create_task(deliverer.run(stop), name="deliver")
        try:
            await events.run(scheduler.handle, stop)
        finally:
            stop.set()
            await delivering
            await deliverer.drain(policy.timeout_s + 2)
        log.info("webhook_notifier: stopped")


def main() -> None:
    # Deliveries wait seconds, not milliseconds: the notifier yields the CPU.
    process.main(SERVICE, run, batch_only=True)
