"""The whole system in the test's event loop, on the test's own nats-server and database: the api
(served by uvicorn), the results writer, the watchdog and inference workers on the instant
engine, each startable and stoppable on its own. For lifecycle tests that need every service but
not separate processes (tests/crash/ kills real processes)."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import openai

from schemas.openai import OutputLine
from services.api.service import running
from services.inference import service as inference
from services.results_writer import service as results_writer
from services.watchdog import service as watchdog
from shared import config
from shared.embedded import free_port
from tests.helpers import API_KEY, CHAT, CHAT_MODEL, stored_bytes, wait_until

TIMEOUT_S = 30.0


def lifecycle_env(
    database_url: str, nats_url: str, scratch_dir: Path, **overrides: str
) -> dict[str, str]:
    env = {
        "JETBATCH_DATA_DIR": tempfile.mkdtemp(prefix="lifecycle-", dir=scratch_dir),
        "JETBATCH_DATABASE_URL": database_url,
        "JETBATCH_NATS_URL": nats_url,
        "JETBATCH_ENGINE": "instant",
        "JETBATCH_API_KEY": API_KEY,
        "JETBATCH_API_PORT": str(free_port()),
        "JETBATCH_MODELS": CHAT_MODEL,
        "JETBATCH_HEARTBEAT_INTERVAL_S": "0.5",
        "JETBATCH_WATCHDOG_INTERVAL_S": "0.2",
        "JETBATCH_CLOSE_GRACE_S": "1",
        "JETBATCH_REDRIVE_AFTER_S": "2",
        # Tests wait for whole batches to be published, some before a worker runs: no dispatch
        # window (tests of the window set one).
        "JETBATCH_DISPATCH_MIN_WINDOW": "1000000",
    }
    env.update(overrides)
    return env


@dataclass
class System:
    settings: config.Settings
    base_url: str
    client: openai.AsyncOpenAI
    _stops: dict[str, asyncio.Event] = field(default_factory=dict)
    _tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    def start(self, name: str, settings: config.Settings | None = None) -> None:
        """Start `results_writer`, `watchdog` or `worker:<id>` (the chat model's worker)."""
        settings = settings or self.settings
        stop = asyncio.Event()
        if name == "results_writer":
            coro = results_writer.run(settings, stop)
        elif name == "watchdog":
            coro = watchdog.run(settings, stop)
        elif name.startswith("worker:"):
            worker_id = name.removeprefix("worker:")
            coro = inference.run(settings, CHAT_MODEL, None, stop, worker_id=worker_id)
        else:
            raise ValueError(name)
        self._stops[name] = stop
        self._tasks[name] = asyncio.create_task(coro, name=name)

    async def stop(self, name: str, timeout_s: float = TIMEOUT_S) -> None:
        self._stops.pop(name).set()
        await asyncio.wait_for(self._tasks.pop(name), timeout_s)

    async def stop_all(self) -> None:
        for name in list(self._tasks):
            await self.stop(name)

    async def upload(self, content: bytes) -> str:
        f = await self.client.files.create(file=("in.jsonl", content), purpose="batch")
        return f.id

    async def create(self, content: bytes) -> str:
        file_id = await self.upload(content)
        batch = await self.client.batches.create(
            input_file_id=file_id, endpoint=CHAT, completion_window="24h"
        )
        return batch.id

    async def wait_batch(
        self, batch_id: str, statuses: set[str], timeout_s: float = TIMEOUT_S
    ) -> Any:
        async def reached() -> Any:
            batch = await self.client.batches.retrieve(batch_id)
            return batch if batch.status in statuses else None

        what = f"batch {batch_id} to be {statuses}"
        return await wait_until(reached, what, timeout_s=timeout_s, interval_s=0.1)

    async def lines(self, file_id: str | None) -> list[OutputLine]:
        if file_id is None:
            return []
        assert self.settings.nats_url is not None
        data = await stored_bytes(self.settings.nats_url, file_id)
        assert data is not None, f"file {file_id} has no bytes"
        return [msgspec.json.decode(x, type=OutputLine) for x in data.splitlines()]


@asynccontextmanager
async def running_system(
    env: dict[str, str], *, start: tuple[str, ...] = ("results_writer", "watchdog", "worker:w1")
) -> AsyncIterator[System]:
    settings = config.load(env)
    async with running(settings) as base_url:
        client = openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0)
        system = System(settings=settings, base_url=base_url, client=client)
        for name in start:
            system.start(name)
        try:
            yield system
        finally:
            await system.stop_all()
            await client.close()


async def fetchrow(database_url: str, sql: str, *args: Any) -> asyncpg.Record | None:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchrow(sql, *args)
    finally:
        await conn.close()


def check_exactly_once(ids: list[str], expected: set[str]) -> None:
    """Every expected custom_id exactly once, nothing else."""
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)[:10]
    assert set(ids) == expected, (
        sorted(expected - set(ids))[:10],
        sorted(set(ids) - expected)[:10],
    )
