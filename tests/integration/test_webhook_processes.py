"""No webhook is lost, with real processes: a `python -m services.webhook_notifier` SIGKILLed in the
middle of a delivery resumes after a restart and the receiver ends up with the event exactly once
(by webhook-id); a receiver that is down gets the event once it is back."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import nats
import pytest
from aiohttp import web

from shared import bus
from tests.helpers import wait_until
from tests.webhook_helpers import (
    SECRET,
    Received,
    Receiver,
    attempts,
    batch_object,
    insert_batch,
    notifier_env,
    publish,
)

REPO = Path(__file__).resolve().parents[2]


class NotifierProcess:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NotifierProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.webhook_notifier"],
                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_exit(self, timeout_s: float) -> int:
        assert self.proc is not None
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.proc.poll() is None:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"notifier still running after {timeout_s}s:\n{self.log()}")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def processes() -> Iterator[list[NotifierProcess]]:
    started: list[NotifierProcess] = []
    yield started
    for p in started:
        p.kill()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    yield p
    await p.close()


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[nats.js.JetStreamContext]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await bus.ensure_streams(js)
    yield js
    await nc.close()


async def delivery_of(pool: asyncpg.Pool, batch_id: str) -> asyncpg.Record | None:
    return await pool.fetchrow("SELECT * FROM webhook_deliveries WHERE batch_id = $1", batch_id)


async def test_a_notifier_killed_mid_delivery_resumes_and_the_event_arrives_once_by_webhook_id(
    database_url: str,
    nats_url: str,
    scratch_dir: Path,
    processes: list[NotifierProcess],
    pool: asyncpg.Pool,
    js: nats.js.JetStreamContext,
) -> None:
    receiver = await Receiver().start()
    first_arrived = asyncio.Event()
    release = asyncio.Event()
    processed: list[str] = []  # what a de-duplicating receiver acts on

    async def hold_the_first(got: Received, __: web.Request) -> web.StreamResponse:
        if not first_arrived.is_set():
            first_arrived.set()
            await release.wait()  # the notifier dies while waiting for this answer
            return web.Response(status=200)
        got.unwrap(SECRET)
        if got.webhook_id not in processed:
            processed.append(got.webhook_id)
        return web.Response(status=200)

    receiver.respond = hold_the_first
    # timeout 3 s: the lease of the killed notifier's attempt ends 13 s after it started.
    env = notifier_env(database_url, nats_url, scratch_dir, JETBATCH_WEBHOOK_TIMEOUT_S="3")
    try:
        metadata = {"webhook_url": receiver.url()}
        batch_id = await insert_batch(pool, metadata)
        first = NotifierProcess(env, scratch_dir / f"notifier-{batch_id}.log").start()
        processes.append(first)
        event = await publish(js, batch_id, metadata=metadata)

        await asyncio.wait_for(first_arrived.wait(), 60)
        first.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        assert await first.wait_exit(10) == -signal.SIGKILL
        release.set()
        row = await delivery_of(pool, batch_id)
        assert row is not None and (row["status"], row["attempts"]) == ("pending", 1)

        second = NotifierProcess(env, first.log_path).start()
        processes.append(second)

        async def delivered() -> asyncpg.Record | None:
            row = await delivery_of(pool, batch_id)
            return row if row is not None and row["status"] == "delivered" else None

        row = await wait_until(delivered)
        assert processed == [event.id]
        assert {r.webhook_id for r in receiver.received} == {event.id}
        log = await attempts(pool, row["id"])
        assert [a["attempt"] for a in log] == [1, 2]
        assert log[0]["error"].startswith("interrupted") and log[0]["status_code"] is None
        assert (log[1]["status_code"], log[1]["error"]) == (200, None)
        batch = await batch_object(pool, batch_id)
        assert (batch.webhook_status, batch.webhook_attempts) == ("delivered", 2)

        second.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert await second.wait_exit(30) == 0, second.log()
    finally:
        release.set()
        await receiver.stop()


async def test_a_receiver_that_was_down_gets_the_event_when_it_is_back(
    database_url: str,
    nats_url: str,
    scratch_dir: Path,
    processes: list[NotifierProcess],
    pool: asyncpg.Pool,
    js: nats.js.JetStreamContext,
) -> None:
    receiver = Receiver()  # its port is chosen, nothing listens on it yet
    env = notifier_env(
        database_url, nats_url, scratch_dir,
        JETBATCH_WEBHOOK_BACKOFF_BASE_S="0.2", JETBATCH_WEBHOOK_BACKOFF_MAX_S="1",
        JETBATCH_WEBHOOK_MAX_ATTEMPTS="100",
    )  # fmt: skip
    metadata = {"webhook_url": receiver.url()}
    batch_id = await insert_batch(pool, metadata)
    # Published while no notifier runs: the durable consumer keeps it.
    event = await publish(js, batch_id, "batch.failed", metadata=metadata)
    notifier = NotifierProcess(env, scratch_dir / f"notifier-{batch_id}.log").start()
    processes.append(notifier)
    try:

        async def failed_twice() -> bool:
            row = await delivery_of(pool, batch_id)
            return row is not None and row["attempts"] >= 2

        await wait_until(failed_twice)
        batch = await batch_object(pool, batch_id)
        assert batch.webhook_status == "pending" and "ClientConnectorError" in batch.webhook_error

        await receiver.start()
        await receiver.wait_for(lambda got: len(got) == 1, 60)
        got = receiver.received[0]
        parsed = got.unwrap(SECRET)
        assert (parsed.type, parsed.id, parsed.data.id) == ("batch.failed", event.id, batch_id)
        assert json.loads(got.body)["data"]["metadata"] == metadata

        async def delivered() -> asyncpg.Record | None:
            row = await delivery_of(pool, batch_id)
            return row if row is not None and row["status"] == "delivered" else None

        row = await wait_until(delivered)
        log = await attempts(pool, row["id"])
        assert len(log) == row["attempts"] >= 3
        assert all("ClientConnectorError" in a["error"] for a in log[:-1])
        assert all(a["status_code"] is None for a in log[:-1])
        assert (log[-1]["status_code"], log[-1]["error"]) == (200, None)
        await asyncio.sleep(0.5)
        assert len(receiver.received) == 1
    finally:
        await receiver.stop()
