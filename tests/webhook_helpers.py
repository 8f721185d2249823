"""For the webhook tests: a real HTTP receiver on loopback (aiohttp) that records every request,
answers as the test tells it to and checks signatures with the official openai SDK; the notifier
run in the test's event loop; rows and events to start from."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import nats
import openai
from aiohttp import web

from schemas.messages import BatchEvent
from services.api import store as api_store
from services.webhook_notifier import service
from shared import config
from shared.domain.webhooks import new_secret
from shared.embedded import free_port
from shared.ids import new_id
from tests.helpers import wait_until

Respond = Callable[["Received", web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]

    def unwrap(self, secret: str) -> Any:
        """The event as the official SDK parses it; raises if the signature does not verify."""
        client = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")
        return client.webhooks.unwrap(self.body, self.headers, secret=secret)


async def ok(_: Received, __: web.Request) -> web.StreamResponse:
    return web.Response(status=200, text="ok")


class Receiver:
    """POSTs to any path are recorded in `received`; `respond` decides each answer."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.received: list[Received] = []
        self.respond: Respond = ok
        self.in_flight = 0
        self.max_in_flight = 0
        self.arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        got = Received(
            path=request.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=await request.read(),
        )
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            async with self.arrived:
                self.received.append(got)
                self.arrived.notify_all()
            return await self.respond(got, request)
        finally:
            self.in_flight -= 1

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_for(self, predicate: Callable[[list[Received]], bool], timeout_s: float) -> None:
        async with self.arrived:
            await asyncio.wait_for(
                self.arrived.wait_for(lambda: predicate(self.received)), timeout_s
            )

    def on(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]


SECRET = new_secret()
LOOPBACK = "127.0.0.0/8,::1/128"


def notifier_env(
    database_url: str, nats_url: str, scratch_dir: Path, **extra: str
) -> dict[str, str]:
    env = {
        "JETBATCH_DATA_DIR": tempfile.mkdtemp(prefix="notifier-", dir=scratch_dir),
        "JETBATCH_DATABASE_URL": database_url,
        "JETBATCH_NATS_URL": nats_url,
        "JETBATCH_WEBHOOK_SECRET": SECRET,
        "JETBATCH_WEBHOOK_ALLOWED_NETWORKS": LOOPBACK,
        "JETBATCH_WEBHOOK_BACKOFF_BASE_S": "0.05",
        "JETBATCH_WEBHOOK_BACKOFF_MAX_S": "0.2",
        "JETBATCH_WEBHOOK_TIMEOUT_S": "10",
        "JETBATCH_WEBHOOK_MAX_ATTEMPTS": "4",
    }
    env.update(extra)
    return env


class Notifier:
    """The notifier's `run()` in this event loop; restartable with other settings."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, **overrides: str) -> Notifier:
        settings = config.load({**self.env, **overrides})
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(service.run(settings, self._stop))
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._stop.set()
            await asyncio.wait_for(self._task, 30)
            self._task = None


async def insert_batch(pool: asyncpg.Pool, metadata: dict[str, str] | None = None) -> str:
    batch_id = new_id("batch_")
    await pool.execute(
        "INSERT INTO batches (id, endpoint, input_file_id, completion_window, status, created_at,"
        " completed_at, metadata) VALUES ($1, '/v1/chat/completions', 'file-x', '24h',"
        " 'completed', 1700000000, 1700000100, $2::jsonb)",
        batch_id,
        None if metadata is None else json.dumps(metadata),
    )
    return batch_id


async def publish(
    js: nats.js.JetStreamContext,
    batch_id: str,
    type_: str = "batch.completed",
    metadata: dict[str, str] | None = None,
    *,
    legacy: bool = False,
) -> BatchEvent:
    """Publish a batch event as the results writer does, or (`legacy`) on the subject of a
    version before projects (`jetbatch.events.batch.<status>`)."""
    event = BatchEvent(
        id=new_id("evt_"),
        type=type_,
        batch_id=batch_id,
        created_at=1700000100,
        metadata=metadata,  # type: ignore[arg-type]
    )
    subject = (
        BatchEvent.legacy_subject.format(status=type_.removeprefix("batch."))
        if legacy
        else event.published_on
    )
    await js.publish(subject, msgspec.json.encode(event), headers={"Nats-Msg-Id": event.id})
    return event


async def register(pool: asyncpg.Pool, url: str, event_types: list[str], secret: str) -> str:
    endpoint_id = new_id("we_")
    await pool.execute(
        "INSERT INTO webhook_endpoints (id, url, secret, event_types, created_at, updated_at)"
        " VALUES ($1, $2, $3, $4, 1, 1)",
        endpoint_id, url, secret, event_types,
    )  # fmt: skip
    return endpoint_id


async def deliveries(pool: asyncpg.Pool, batch_id: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT * FROM webhook_deliveries WHERE batch_id = $1 ORDER BY destination", batch_id
    )


async def attempts(pool: asyncpg.Pool, delivery_id: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT * FROM webhook_attempts WHERE delivery_id = $1 ORDER BY attempt", delivery_id
    )


async def settled(pool: asyncpg.Pool, batch_id: str, count: int = 1) -> list[asyncpg.Record]:
    async def check() -> list[asyncpg.Record] | None:
        rows = await deliveries(pool, batch_id)
        done = len(rows) == count and all(r["status"] != "pending" for r in rows)
        return rows if done else None

    return await wait_until(check, f"{count} settled deliveries of batch {batch_id}")


async def batch_object(pool: asyncpg.Pool, batch_id: str) -> Any:
    row = await pool.fetchrow("SELECT * FROM batches WHERE id = $1", batch_id)
    return api_store.batch_from_row(row)
