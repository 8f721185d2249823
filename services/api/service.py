"""api: OpenAI-compatible Files, Batches, Models and synchronous inference (Litestar).

Reads: PostgreSQL (files, batches), file bytes under the data dir, KV bucket `jetbatch_workers`
(heartbeats). Emits: REQUESTS `jetbatch.requests.<model>.<project>.dispatched` (one RequestMessage
per input line, msg id `<batch_id>:<line>`), EVENTS `jetbatch.events.batch.<project>.failed` (invalid input
file), core requests on `jetbatch.interactive.<model>.<project>` (synchronous calls) and their aborts on
`jetbatch.interactive.abort.<model>.<project>` (a call the api stopped waiting for). Routes live in
files.py, batches.py (+ ingest.py, the background validation and publishing) and interactive.py;
tenants (OpenAI's admin API) in organization.py and project_members.py. Every /v1 request is
authenticated once by auth.py, which injects its `Caller` (project, admin or not).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from types import FrameType

import msgspec
import uvicorn
from litestar import Litestar, Router, get
from litestar.di import Provide
from nats.aio.client import Client as NATS

from schemas.messages import BatchEvent, InteractiveAbort, InteractiveRequest, RequestMessage
from services.api import (
    admin,
    admin_ui,
    auth,
    batch_events,
    batches,
    files,
    interactive,
    lifecycle,
    log_records,
    metrics,
    organization,
    project_members,
    stats,
    validation,
    webhooks,
    worker_control,
)
from services.api.children import SpareChild
from services.api.deps import Deps, DepsParam, get_deps
from services.api.exceptions import EXCEPTION_HANDLERS
from services.api.http_limits import GuardedHttpTools, limits_middleware
from services.api.publishing import PublishingChild
from services.api.tenants import any_keys
from shared import bus, logship, process, telemetry
from shared.config import ConfigError, Settings
from shared.db import connect_pool
from shared.errors import Unavailable

log = logging.getLogger(__name__)

SERVICE = "api"
CONSUMERS = (lifecycle.CONSUMER,)
EMITS = (
    RequestMessage,
    BatchEvent,
    InteractiveRequest,
    InteractiveAbort,
    "BatchStop into KV `jetbatch_cancelled`",
)
# JSON bodies (batch creation, synchronous requests): a synchronous request travels as one NATS
# message, 8 MB at most on a jetbatch server. Uploads have their own limit (max_file_bytes).
MAX_JSON_BODY_BYTES = 8 * 1024 * 1024
# On SIGTERM: how long in-flight HTTP requests, then background batch work, may take to finish.
GRACEFUL_SHUTDOWN_S = 30
HEALTH_TIMEOUT_S = 2.0


class Health(msgspec.Struct, kw_only=True):
    status: str


@get("/healthz")
async def healthz(deps: DepsParam) -> Health:
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT_S):
            await deps.pool.fetchval("SELECT 1")
    except Exception as e:
        raise Unavailable(f"database unreachable: {e}") from None
    if not deps.nc.is_connected:
        raise Unavailable("NATS unreachable")
    return Health(status="ok")


async def _stop_task(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    stop.set()
    try:
        await asyncio.wait_for(task, GRACEFUL_SHUTDOWN_S)
    except Exception:
        log.exception("%s did not stop cleanly", task.get_name())


async def _close_nats(nc: NATS) -> None:
    # drain() lets in-flight publishes and replies go out; it refuses a connection already closed.
    with contextlib.suppress(Exception):
        await nc.drain()


def _lifespan(
    settings: Settings, database_url: str, nats_url: str
) -> Callable[[Litestar], AbstractAsyncContextManager[None]]:
    """The api's connections, child processes and background tasks, for the app's lifetime."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            pool = await connect_pool(database_url)
            stack.push_async_callback(pool.close)
            nc = await bus.connect(nats_url, name=f"jetbatch-{SERVICE}")
            stack.push_async_callback(_close_nats, nc)
            await stack.enter_async_context(logship.shipping(nc, SERVICE, settings.nats_replicas))
            js = nc.jetstream()
            await bus.ensure_streams(js, replicas=settings.nats_replicas)
            nc_sync = await bus.connect(nats_url, name=f"jetbatch-{SERVICE}-sync")
            stack.push_async_callback(_close_nats, nc_sync)
            # Batch-only work: niced, so it yields the CPU to the requests this process serves.
            nice = [str(settings.batch_nice)]
            validators = SpareChild(validation.CHILD_MODULE, nice)
            validators.start()
            stack.push_async_callback(validators.close)
            publishing_child = PublishingChild(nats_url, settings.batch_nice)
            stack.push_async_callback(publishing_child.close)
            deps = Deps(
                settings=settings,
                pool=pool,
                nc=nc,
                js=js,
                workers=await bus.workers_kv(js, settings.nats_replicas),
                storage=await bus.files_bucket(js, settings.nats_replicas),
                started_at=int(time.time()),
                cancelled=await bus.cancelled_kv(js, settings.nats_replicas),
                nc_sync=nc_sync,
                validators=validators,
                publishing=publishing_child,
            )
            # Runs first at shutdown: background batch work still has its connections.
            stack.push_async_callback(deps.wait_for_tasks, GRACEFUL_SHUTDOWN_S)
            # Before that: dispatch stops, so batches being dispatched end their tasks at once
            # (they go on from their cursors wherever they are re-driven).
            stack.push_async_callback(deps.dispatcher.close)
            # The watchdog's orders (re-drive, close out): services/api/lifecycle.py. Stopped
            # even before background batch work is waited for, so no new work starts meanwhile.
            control_stop = asyncio.Event()
            control = asyncio.create_task(lifecycle.consume(deps, control_stop), name="control")
            stack.push_async_callback(_stop_task, control, control_stop)
            # API keys' ends, heard from PostgreSQL: until then every key is read from it.
            keys_stop = asyncio.Event()
            keys = asyncio.create_task(deps.key_cache.listen(database_url, keys_stop), name="keys")
            stack.push_async_callback(_stop_task, keys, keys_stop)
            # What synchronous requests used: written every few seconds, and at the end.
            usage_stop = asyncio.Event()
            usage = asyncio.create_task(
                deps.sync_usage.flush_every(pool, usage_stop), name="sync-usage"
            )
            stack.push_async_callback(_stop_task, usage, usage_stop)
            app.state.deps = deps
            if settings.api_key is None and not await any_keys(pool):
                log.warning(
                    "JETBATCH_API_KEY is not set and no API key exists: the api accepts every"
                    " request until one is created"
                )
            log.info("api ready on %s:%d", settings.api_host, settings.api_port)
            yield

    return lifespan


def create_app(settings: Settings) -> Litestar:
    """The api as an ASGI app. Its connections open in the lifespan, not here."""
    if not settings.database_url:
        raise ConfigError("JETBATCH_DATABASE_URL is not set: the api needs PostgreSQL")
    if not settings.nats_url:
        raise ConfigError("JETBATCH_NATS_URL is not set: the api needs NATS")
    database_url, nats_url = settings.database_url, settings.nats_url

    v1 = Router(
        "/v1",
        route_handlers=[
            *files.ROUTES,
            *batches.ROUTES,
            *batch_events.ROUTES,
            *interactive.ROUTES,
            *webhooks.ROUTES,
            *admin.ROUTES,
            *worker_control.ROUTES,
            *log_records.ROUTES,
            *organization.ROUTES,
            *project_members.ROUTES,
        ],
        # Every /v1 request: who is calling (services/api/auth.py), injected as `caller`.
        guards=[auth.authenticate],
        dependencies={"caller": Provide(auth.get_caller, sync_to_thread=False)},
    )
    return Litestar(
        route_handlers=[healthz, *stats.ROUTES, *metrics.ROUTES, *admin_ui.ROUTES, v1],
        dependencies={"deps": Provide(get_deps, sync_to_thread=False)},
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        lifespan=[_lifespan(settings, database_url, nats_url)],
        request_max_body_size=MAX_JSON_BODY_BYTES,
        middleware=[limits_middleware],  # slow bodies, NUL in URLs (README: Hostile input)
        openapi_config=None,
        logging_config=None,  # telemetry.setup owns logging
    )


class Server(uvicorn.Server):
    """uvicorn, with its signal handling replaced: uvicorn re-raises a captured SIGTERM once its
    graceful shutdown is done, so the process would die of the signal; here SIGTERM/SIGINT only
    start the graceful shutdown and the process then exits 0. `handle_signals=False` leaves
    signals alone (an api embedded in another program or a test)."""

    def __init__(self, config: uvicorn.Config, *, handle_signals: bool = True) -> None:
        super().__init__(config)
        self._handle_signals = handle_signals

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if not self._handle_signals:
            yield
            return
        with process.on_signals(lambda sig: self.handle_exit(sig, None)):
            yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Open progress streams end now, rather than hold the graceful shutdown to its timeout.
        if isinstance(self.config.app, Litestar):
            batch_events.close_streams(self.config.app)
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        log.info("%s: shutting down", signal.Signals(sig).name)
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for in-flight requests
        self.should_exit = True


def server_config(settings: Settings, app: Litestar) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.api_host,
        port=settings.api_port,
        lifespan="on",
        log_config=None,  # keep telemetry's logging
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        http=GuardedHttpTools,  # slow or endless request heads (README: Hostile input)
    )


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[str]:
    """Serve the api in this event loop while the block runs; yields its base URL (…/v1).
    For embedding and tests; `main()` is the process entry point."""
    server = Server(server_config(settings, create_app(settings)), handle_signals=False)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()  # raises what stopped it
                raise RuntimeError("the api stopped during start-up")
            await asyncio.sleep(0.02)
        yield f"http://{settings.api_host}:{settings.api_port}/v1"
    finally:
        server.should_exit = True
        await task


def main() -> None:
    # NATS and the database are checked by create_app, which `running()` shares.
    settings = process.load_settings(SERVICE, ())
    telemetry.setup(SERVICE, settings.log_level, settings.observability)
    try:
        app = create_app(settings)
    except ConfigError as e:
        log.error("%s", e)
        sys.exit(2)
    server = Server(server_config(settings, app))
    # SIGTERM/SIGINT -> graceful shutdown: stop accepting, finish in-flight requests, then the
    # lifespan closes (background batch work, NATS drain, pool), then exit 0.
    server.run()
    if not server.started:
        sys.exit(1)  # start-up failed; uvicorn has logged why
