"""What the api's handlers need, opened once in the app's lifespan and injected as `deps`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from litestar.datastructures import State
from litestar.di import NamedDependency
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from services.api.children import SpareChild
from services.api.concurrency import SyncSlots
from services.api.dispatcher import Dispatcher
from services.api.key_cache import KeyCache
from services.api.publishing import PublishingChild
from services.api.rate_limits import RateLimiter
from services.api.sync_usage import SyncUsage
from shared.bus import FileObjects
from shared.config import Settings

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Deps:
    settings: Settings
    pool: asyncpg.Pool
    nc: NATS
    js: JetStreamContext
    workers: KeyValue  # heartbeats of the inference workers
    storage: FileObjects  # file bytes: the files bucket
    started_at: int
    # KV bucket `jetbatch_cancelled`: batches whose remaining requests workers must not run.
    cancelled: KeyValue | None = None
    # KV bucket `jetbatch_worker_control`: operators' drain/resume/restart (worker_control.py).
    control: KeyValue | None = None
    # Synchronous requests' own connection: on `nc` one would wait in the socket behind the
    # thousands of publishes of a batch being ingested (measured: p90 36 ms instead of 1 ms).
    nc_sync: NATS | None = None
    # Pass 1 (validation) of a batch's file runs in child processes started ahead of need
    # (validation.validate_in_child), pass 2 (publishing) in one long-lived child
    # (publishing.PublishingChild), off the process serving HTTP. None = pass 1 in a thread,
    # pass 2 in this event loop.
    validators: SpareChild | None = None
    publishing: PublishingChild | None = None
    # When the last synchronous request came in (time.monotonic()): background batch work hands
    # the event loop back more often while they keep coming (services/api/ingest.py).
    sync_seen: float = float("-inf")
    # Background work (batch validation + publishing): referenced here so it is not garbage
    # collected mid-flight, and so shutdown can wait for it.
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    # Synchronous requests running now, in all and per caller (services/api/concurrency.py).
    sync_slots: SyncSlots = field(init=False)
    # Projects' request and token rate limits of synchronous requests (rate_limits.py).
    rate_limiter: RateLimiter = field(init=False)
    # What synchronous requests used, written every few seconds (sync_usage.py).
    sync_usage: SyncUsage = field(default_factory=SyncUsage)

    # Live API keys, read from PostgreSQL once and dropped when one ends (key_cache.py).
    key_cache: KeyCache = field(default_factory=KeyCache)

    # Which batch's lines go to REQUESTS when (services/api/dispatcher.py).
    dispatcher: Dispatcher = field(init=False)

    def __post_init__(self) -> None:
        self.dispatcher = Dispatcher(self, self.publishing)
        limits = self.settings.limits
        self.sync_slots = SyncSlots(limits.max_sync_requests, limits.max_sync_requests_per_key)
        self.rate_limiter = RateLimiter(self.pool)

    # Whether an API key was ever created (services/api/auth.py): asked until it is so.
    keys_exist: bool = False

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def wait_for_tasks(self, timeout_s: float) -> None:
        """Let background work finish; past the timeout, cancel it. Work cut short is safe: a batch
        left in `validating` (or `in_progress` but not published) is re-driven by re-running
        `process_batch`, which is idempotent."""
        if not self.tasks:
            return
        log.info("waiting up to %.0fs for %d background task(s)", timeout_s, len(self.tasks))
        _, pending = await asyncio.wait(set(self.tasks), timeout=timeout_s)
        for task in pending:
            log.warning("cancelling %s at shutdown", task.get_name())
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)


def get_deps(state: State) -> Deps:
    deps: Deps = state.deps
    return deps


# How route handlers ask for Deps: named explicitly, as Litestar 3 will require.
DepsParam = NamedDependency[Deps]
