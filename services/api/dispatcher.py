"""Dispatch: a batch's lines reach REQUESTS a window at a time, in scheduling order (README:
Scheduling).

Each model's REQUESTS backlog (its messages in the work queue: waiting, or in a worker and not
yet acked) is kept near a window: about DISPATCH_AHEAD_S of the model's measured drain rate, and
at least twice what its live workers hold in their engines (so no worker ever waits for work) and
the configured minimum. Every tick, the room left in the window is split among the model's
batches by services/api/schedule.allocate (projects by fair share, a project's batches by
priority, deadline, age) and each batch this api dispatches gets a grant of that many lines,
published by the api's publishing child (services/api/publishing.py). A small batch of another
project therefore waits behind one window of work, never behind a whole 50,000-line batch.

Every api replica runs a dispatcher for the batches it claimed; all read the same rows, so they
split the same room the same way. Where another replica may dispatch some of a model's batches,
a dispatcher grants only in the model's turn (an advisory lock, TURN_NS): it reads the backlog
again once it holds the turn, so every other replica's grants are counted and the window is not
overshot. A batch's claim (the advisory lock of store.claim) and the turns are held on one
connection per dispatcher, for all its batches, and die with the api. Crash safety: a
batch's cursor (`batches.dispatched`) moves only once the stream holds its lines; a re-drive
resumes at the cursor, and what was published past it again is dropped by the stream's duplicate
window (and by the results writer, which writes each line once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg
import msgspec

from schemas.messages import DISPATCHED, RequestMessage
from services.api import dispatch_store, schedule, store
from services.api.publishing import FILE_GONE, Grant, GrantDone, LinePublisher, PublishJob
from shared import bus, tracing

if TYPE_CHECKING:
    from services.api.deps import Deps

log = logging.getLogger(__name__)

TICK_S = 0.025  # how often a dispatcher tops up its models' windows while they have room
MAX_TICK_S = 0.5  # the longest it waits while every window is full of slowly draining work
# In-process publishing (tests, an api without children) reads, parses and publishes this many
# lines per turn of the event loop, then hands it back (bench/interactive.py measures why);
# fewer while synchronous requests keep coming (one within SYNC_RECENT_S).
YIELD_EVERY = 50
YIELD_EVERY_SYNC = 10
SYNC_RECENT_S = 1.0
MAX_GRANT = 5_000  # lines per grant: one grant's publish holds the child this long at most
RATE_EVERY_S = 1.0  # a model's drain rate is measured over this long
# A model not looked at for this long (no batch of it here meanwhile) starts its rate over: an
# average over its idle time would make it look slow, and its ticks too far apart.
RATE_STALE_S = 5.0
BEATS_EVERY_S = 2.0  # workers' capacity is read this often
PLACES_EVERY_S = 2.0  # queue places written (and cancels noticed with a full window) this often
TURN_NS = 0x6A627475  # "jbtu": (TURN_NS, hashtext(model)), a model's turn to grant lines


@dataclass(eq=False)
class _Local:
    """A batch this dispatcher claimed."""

    row: store.Row
    job: PublishJob
    cursor: int  # lines already in REQUESTS
    files: AsyncExitStack
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def model(self) -> str:
        return self.job.model


def next_tick_s(backlog: int, window: int, capacity: int, lines_per_s: float) -> float:
    """How long a dispatcher may wait before its next look at a model: TICK_S while the model's
    window has room (more to grant) or its drain rate is not measured yet; with a full window, a
    quarter of the time its workers take to drain the backlog down to what they hold themselves
    (`capacity`, where they could begin to wait), at most MAX_TICK_S. A fast model (the instant
    engine's 10,000 lines/s) keeps the 25 ms tick; a vLLM model draining a few lines a second is
    looked at twice a second instead of forty times."""
    if backlog < window or lines_per_s <= 0:
        return TICK_S
    slack_s = (backlog - capacity) / lines_per_s
    return min(MAX_TICK_S, max(TICK_S, slack_s / 4))


@dataclass
class Drain:
    """A model's measured drain rate (lines/s leaving its backlog), every RATE_EVERY_S.

    Counted from the workers' consumer of the dispatched class (`acked`: its deliveries less
    those still unacknowledged), which sees every api replica's lines. Until that consumer
    exists (no worker of the model has run), from the backlog and this dispatcher's own grants,
    which mistakes another replica's grants for slower draining. A model not looked at for
    RATE_STALE_S starts over (its rate 0: not measured)."""

    backlog: int = 0
    granted: int = 0  # lines this dispatcher granted since `since`
    acked: int | None = None  # the consumer's acknowledged deliveries at `since`
    since: float = field(default_factory=time.monotonic)
    lines_per_s: float = 0.0

    def due(self, now: float) -> bool:
        return now - self.since >= RATE_EVERY_S

    def observe(self, backlog: int, acked: int | None, now: float) -> None:
        if not self.due(now):
            return
        elapsed = now - self.since
        if elapsed > RATE_STALE_S:
            self.lines_per_s = 0.0  # an average over idle time: measured afresh from here
        else:
            rate = self._drained(backlog, acked) / elapsed
            self.lines_per_s = (
                rate if self.lines_per_s == 0 else 0.5 * self.lines_per_s + 0.5 * rate
            )
        self.backlog, self.granted, self.acked, self.since = backlog, 0, acked, now

    def _drained(self, backlog: int, acked: int | None) -> int:
        if acked is not None and self.acked is not None:
            return max(0, acked - self.acked)
        return max(0, self.backlog + self.granted - backlog)


class Dispatcher:
    def __init__(self, deps: Deps, publisher: Any = None) -> None:
        self.deps = deps
        # The api's publishing child, or in-process publishing (tests, an api without children).
        self._publisher = publisher or LinePublisher(deps.js, self._slice)
        self._local: dict[str, _Local] = {}
        self._claims: asyncpg.Connection | None = None
        self._claims_lock = asyncio.Lock()
        self._adopting = asyncio.Lock()
        self._loop: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._drains: dict[str, Drain] = {}
        self._capacity: dict[str, int] = {}
        self._beats_at = float("-inf")
        self._places_at = float("-inf")
        self._next_tick_s = TICK_S

    def _slice(self) -> int:
        recent = time.monotonic() - self.deps.sync_seen < SYNC_RECENT_S
        return YIELD_EVERY_SYNC if recent else YIELD_EVERY

    # Claims -------------------------------------------------------------------------------

    async def _claim(self, batch_id: str, take: bool) -> bool:
        return await self._advisory(store.CLAIM_NS, batch_id, take)

    async def _turn(self, model: str, take: bool) -> bool:
        """Take (without waiting) or give back the model's turn to grant lines: like a claim,
        it is held on the claims' connection and ends with this api."""
        return await self._advisory(TURN_NS, model, take)

    async def _advisory(self, namespace: int, key: str, take: bool) -> bool:
        assert self.deps.settings.database_url is not None
        async with self._claims_lock:
            if self._claims is None or self._claims.is_closed():
                self._claims = await asyncpg.connect(self.deps.settings.database_url)
            fn = "pg_try_advisory_lock" if take else "pg_advisory_unlock"
            sql = f"SELECT {fn}($1, hashtext($2))"
            return bool(await self._claims.fetchval(sql, namespace, key))

    # Batches ------------------------------------------------------------------------------

    async def dispatch(self, row: store.Row, job: PublishJob) -> None:
        """Dispatch batch `row` (in progress, validated) until all its lines are in REQUESTS, it
        stops running, or this api stops. Returns at once when another api holds its claim."""
        batch_id = row["id"]
        async with self._adopting:  # a claim is re-entrant on its connection: one adoption
            local = self._local.get(batch_id)
            if local is None:
                if not await self._claim(batch_id, True):
                    log.info("batch %s: another api process is dispatching it", batch_id)
                    return
                local = await self._adopt(row, job)
                if local is None:
                    return
        await asyncio.shield(local.done)

    async def _adopt(self, row: store.Row, job: PublishJob) -> _Local | None:
        files = AsyncExitStack()
        try:
            fresh = await store.get_batch(self.deps.pool, row["id"])
            if fresh is None or (fresh["status"], fresh["ending"]) != ("in_progress", None):
                raise _NotRunning
            if fresh["published_at"] is not None:
                raise _NotRunning
            from services.api.ingest import input_copy  # noqa: PLC0415 - ingest imports this

            path = await files.enter_async_context(input_copy(self.deps, fresh))
            if path is None:
                log.error(
                    "batch %s: input file %s is gone, cannot publish",
                    row["id"],
                    row["input_file_id"],
                )
                raise _NotRunning
        except BaseException as e:
            await files.aclose()
            await self._claim(row["id"], False)
            if isinstance(e, _NotRunning):
                return None
            raise
        local = _Local(
            fresh, msgspec.structs.replace(job, path=str(path)), fresh["dispatched"], files
        )
        self._local[row["id"]] = local
        if self._loop is None or self._loop.done():
            self._loop = asyncio.create_task(self._run(), name="dispatcher")
        self._wake.set()
        return local

    async def _finish(self, local: _Local) -> None:
        batch_id = local.job.batch_id
        if self._local.pop(batch_id, None) is None:
            return
        try:
            await self._publisher_drop(batch_id)
            await local.files.aclose()
            await self._claim(batch_id, False)
        finally:
            if not local.done.done():
                local.done.set_result(None)

    async def _publisher_drop(self, batch_id: str) -> None:
        dropped = self._publisher.drop(batch_id)
        if asyncio.iscoroutine(dropped):
            await dropped

    async def close(self) -> None:
        """Stop dispatching (the api stops): claims end with the connection; batches left go on
        from their cursors wherever they are re-driven."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        for local in list(self._local.values()):
            with contextlib.suppress(Exception):
                await self._finish(local)
        if self._claims is not None:
            await self._claims.close()

    # The loop -----------------------------------------------------------------------------

    async def _run(self) -> None:
        while self._local:
            self._wake.clear()
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("dispatching failed; trying again")
                await asyncio.sleep(1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._next_tick_s)

    async def _tick(self) -> None:
        now = time.time()
        await self._read_capacity()
        write_places = time.monotonic() - self._places_at >= PLACES_EVERY_S
        next_s = MAX_TICK_S
        for model in {local.model for local in self._local.values()}:
            drain = self._drains.setdefault(model, Drain())
            backlog = await self._backlog(model)
            at = time.monotonic()
            if drain.due(at):
                drain.observe(backlog, await self._acked(model), at)
            window = self.window(model)
            room = window - backlog
            capacity, rate = self._capacity.get(model, 0), drain.lines_per_s
            if room <= 0 and not write_places:
                # A full window: nothing to grant, no query (most ticks of a big batch).
                next_s = min(next_s, next_tick_s(backlog, window, capacity, rate))
                continue
            candidates, started = await dispatch_store.candidates(self.deps.pool, model)
            running = {c.batch_id for c in candidates}
            for local in [x for x in self._local.values() if x.model == model]:
                if local.job.batch_id not in running:  # cancelled, expired, or done elsewhere
                    await self._finish(local)
                elif local.cursor >= local.row["total"]:  # re-driven after its last grant
                    await self._published(local)
            if write_places:
                await self._write_places(candidates, started, drain.lines_per_s, now)
            granted = await self._grant_room(model, candidates, room, now) if room > 0 else 0
            next_s = min(next_s, next_tick_s(backlog + granted, window, capacity, rate))
        if write_places:
            self._places_at = time.monotonic()
        self._next_tick_s = next_s

    async def _grant_room(
        self, model: str, candidates: list[schedule.Candidate], room: int, now: float
    ) -> int:
        """Grant the model's batches here their part of `room`; returns the lines published.
        Where some of its batches are not this dispatcher's (another replica's, or not yet
        claimed), only in the model's turn, with the room read again then: another replica's
        grants since are in the backlog."""
        shared = any(c.batch_id not in self._local for c in candidates if c.remaining > 0)
        if shared:
            if not await self._turn(model, True):
                return 0  # another replica is granting: the next tick reads what it published
            room = self.window(model) - await self._backlog(model)
        granted, drain = 0, self._drains[model]
        try:
            grants = schedule.allocate(candidates, room, now) if room > 0 else {}
            for local in [x for x in self._local.values() if x.model == model]:
                lines = min(grants.get(local.job.batch_id, 0), MAX_GRANT)
                if lines > 0:
                    published = await self._grant(local, lines)
                    granted += published
                    drain.granted += published
            return granted
        finally:
            if shared:
                await self._turn(model, False)

    def window(self, model: str) -> int:
        """How many of the model's lines REQUESTS may hold (README: Scheduling)."""
        dispatch = self.deps.settings.dispatch
        drain = self._drains.get(model)
        rate = 0.0 if drain is None else drain.lines_per_s
        return max(
            dispatch.min_window, 2 * self._capacity.get(model, 0), int(rate * dispatch.ahead_s)
        )

    async def _backlog(self, model: str) -> int:
        """The model's messages in REQUESTS: waiting, or in a worker and not yet acked."""
        # Only the lines dispatched here: direct publishers' are a class of their own, which the
        # workers balance against this one (schemas.messages.Priority).
        (dispatched,) = RequestMessage.class_filters(model)[DISPATCHED]
        info = await self.deps.js.stream_info(bus.REQUESTS.name, subjects_filter=dispatched)
        return sum((info.state.subjects or {}).values())

    async def _acked(self, model: str) -> int | None:
        """The acknowledged deliveries of the workers' consumer of the model's dispatched
        lines; None before a worker has made it."""
        durable = RequestMessage.class_durables(model)[DISPATCHED]
        try:
            info = await self.deps.js.consumer_info(bus.REQUESTS.name, durable)
        except Exception:  # no consumer yet, or NATS busy: the fallback counts
            return None
        return (info.delivered.consumer_seq or 0) - (info.num_ack_pending or 0)

    async def _read_capacity(self) -> None:
        if time.monotonic() - self._beats_at < BEATS_EVERY_S:
            return
        from services.api.admin import is_stale, read_heartbeats  # noqa: PLC0415 - admin imports deps

        self._beats_at = time.monotonic()
        capacity: dict[str, int] = {}
        now, stale_s = time.time(), self.deps.settings.health.worker_stale_s
        for beat in await read_heartbeats(self.deps):
            if not is_stale(beat, now, stale_s):
                capacity[beat.model] = capacity.get(beat.model, 0) + beat.capacity
        self._capacity = capacity

    async def _write_places(
        self,
        candidates: list[schedule.Candidate],
        started: set[str],
        lines_per_s: float,
        now: float,
    ) -> None:
        places = schedule.queue_places(candidates, started, lines_per_s, now)
        mine = {b: p for b, p in places.items() if b in self._local and b not in started}
        await dispatch_store.set_queue_places(self.deps.pool, mine)

    async def _grant(self, local: _Local, lines: int) -> int:
        """Publish `lines` more of the batch's lines; returns how many went out."""
        batch_id = local.job.batch_id
        grant = Grant(job=local.job, start=local.cursor, count=lines)
        from services.api import metrics as api_metrics  # noqa: PLC0415 - it imports deps

        try:
            with api_metrics.child_job("publishing"):
                done: GrantDone = await self._publisher.run(grant)
        except Exception:
            log.exception(
                "batch %s: publishing lines from %d failed; retrying", batch_id, local.cursor
            )
            await self._publisher_drop(batch_id)
            return 0
        if done.error == FILE_GONE:
            log.error("batch %s: input file %s is gone, cannot publish", batch_id, local.job.path)
            await self._finish(local)
            return 0
        if done.error is not None:
            log.warning("batch %s: publishing failed (%s); retrying", batch_id, done.error)
            return 0
        local.cursor += done.published
        await dispatch_store.set_dispatched(self.deps.pool, batch_id, local.cursor)
        api_metrics.REQUESTS_PUBLISHED.labels(local.model).inc(done.published)
        tracing.record_minted(f"{local.job.subject} publish", batch_id, done.traced)
        if done.eof or local.cursor >= local.row["total"]:
            await self._published(local)
        return done.published

    async def _published(self, local: _Local) -> None:
        """Every line of the batch is in REQUESTS: `published_at`, and it is done here."""
        batch_id, total = local.job.batch_id, local.row["total"]
        if local.cursor != total:
            log.error(
                "batch %s: published %d requests but validated %d (file changed?)",
                batch_id, local.cursor, total,
            )  # fmt: skip
        await store.mark_published(self.deps.pool, batch_id)
        log.info(
            "batch %s: %d requests published on %s",
            batch_id, local.cursor, RequestMessage.subject_for(local.model, DISPATCHED),
        )  # fmt: skip
        await self._finish(local)


class _NotRunning(Exception):
    """The batch is no longer one to dispatch."""
