"""`GET /v1/batches/{batch_id}/events`: a batch's progress as server-sent events, what the CLI's
progress bar and the admin page follow (README: API).

Each event is `event: progress`, `id: <version>` (the batch row's version, raised by every update
of the row: strictly increasing), `data: <the Batch object, as GET /v1/batches/{id} returns
it>`: one at once, then one whenever the batch changes, a `: keepalive` comment every
KEEPALIVE_S, and a final `event: done` (data = the final Batch) once the batch is terminal, then
the stream ends. With `Last-Event-ID: n` the current state is sent only if its version is
greater than n (the final `done` always is). Another project's batch or an unknown id is a 404
before any event.

One task per api process reads every batch an open stream follows with one query every
POLL_S, however many streams are open. Streams are capped per process and per project (429)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec
from litestar import Litestar, Request, get
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage

from services.api import store
from services.api.auth import CallerParam
from services.api.batches import not_found
from services.api.deps import Deps, DepsParam
from shared.errors import RateLimited

log = logging.getLogger(__name__)

POLL_S = 0.5
KEEPALIVE_S = 15.0
MAX_STREAMS = 1_000  # per api process
MAX_STREAMS_PER_PROJECT = 100
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})

_encoder = msgspec.json.Encoder()


@dataclass(eq=False)
class _Follower:
    batch_id: str
    project: str
    row: Any = None  # the latest row the poller read
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class BatchWatch:
    """The open streams of one api process and the one poller that serves them all."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.followers: set[_Follower] = set()
        self.closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def admit(self, project: str) -> None:
        if len(self.followers) >= MAX_STREAMS:
            raise RateLimited(
                f"this api serves {MAX_STREAMS} progress streams already; retry later",
                code="too_many_streams",
            )
        if sum(f.project == project for f in self.followers) >= MAX_STREAMS_PER_PROJECT:
            raise RateLimited(
                f"this project has {MAX_STREAMS_PER_PROJECT} progress streams open on this api;"
                " close one first",
                code="too_many_streams",
            )

    def follow(self, batch_id: str, project: str) -> _Follower:
        follower = _Follower(batch_id, project)
        self.followers.add(follower)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._poll(), name="batch events")
        return follower

    def close(self) -> None:
        """The api is shutting down: every stream ends now, not at the graceful timeout."""
        self.closing.set()
        for f in self.followers:
            f.changed.set()

    async def _poll(self) -> None:
        while self.followers and not self.closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closing.wait(), POLL_S)
            ids = sorted({f.batch_id for f in self.followers})
            if not ids:
                break
            try:
                rows = await self.pool.fetch("SELECT * FROM batches WHERE id = ANY($1)", ids)
            except Exception as e:  # the database is away: the next round tries again
                log.warning("batch progress not read: %r", e)
                continue
            by_id = {r["id"]: r for r in rows}
            for f in list(self.followers):
                row = by_id.get(f.batch_id)
                if row is not None and (f.row is None or row["version"] != f.row["version"]):
                    f.row = row
                    f.changed.set()


_watches: weakref.WeakKeyDictionary[Deps, BatchWatch] = weakref.WeakKeyDictionary()


def watch_of(deps: Deps) -> BatchWatch:
    watch = _watches.get(deps)
    if watch is None:
        watch = _watches[deps] = BatchWatch(deps.pool)
    return watch


def close_streams(app: Litestar) -> None:
    """End the open progress streams of `app` (its server is shutting down)."""
    deps = getattr(app.state, "deps", None)
    watch = _watches.get(deps) if deps is not None else None
    if watch is not None:
        watch.close()


def last_event_id(request: Request[Any, Any, Any]) -> int | None:
    raw = request.headers.get("last-event-id")
    try:
        return int(raw) if raw else None
    except ValueError:
        return None  # not one of ours: start over


def _message(event: str, row: Any) -> ServerSentEventMessage:
    data = _encoder.encode(store.batch_from_row(row)).decode()
    return ServerSentEventMessage(event=event, id=row["version"], data=data)


async def _events(
    watch: BatchWatch, follower: _Follower, row: Any, sent: int | None
) -> AsyncIterator[ServerSentEventMessage]:
    loop = asyncio.get_running_loop()
    try:
        while True:
            if row["status"] in TERMINAL:
                yield _message("done", row)
                return
            if sent is None or row["version"] > sent:
                yield _message("progress", row)
                sent = row["version"]
            deadline = loop.time() + KEEPALIVE_S
            while not follower.changed.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(follower.changed.wait(), deadline - loop.time())
                if not follower.changed.is_set():
                    yield ServerSentEventMessage(comment="keepalive", data=None)
                    deadline = loop.time() + KEEPALIVE_S
            follower.changed.clear()
            if watch.closing.is_set():
                return
            if follower.row is not None and follower.row["version"] > row["version"]:
                row = follower.row
    finally:
        watch.followers.discard(follower)


@get("/batches/{batch_id:str}/events")
async def batch_events(
    batch_id: str, request: Request[Any, Any, Any], deps: DepsParam, caller: CallerParam
) -> ServerSentEvent:
    row = await store.get_batch(deps.pool, batch_id, caller.scope)
    if row is None:
        raise not_found(batch_id)
    watch = watch_of(deps)
    project = row["project_id"] or ""
    watch.admit(project)
    follower = watch.follow(batch_id, project)
    return ServerSentEvent(
        _events(watch, follower, row, last_event_id(request)),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


ROUTES = [batch_events]
