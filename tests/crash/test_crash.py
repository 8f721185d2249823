"""Crash-proof, proven with real faults: every service runs as its own process (tests/harness.py)
on the instant engine, and mid-batch one of them is SIGKILLed (or the nats-server is, and
restarted on the same store). After the restart every batch finishes with every custom_id exactly
once across its output and error files and its request_counts right. Plus a graceful SIGTERM of
an inference worker that hands its in-flight requests back.

Slow (each ~10-70 s: a SIGKILLed results writer's fetch comes back after its 60 s ack wait):
`pytest -m crash` runs only these, `-m "not slow"` skips them."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import openai
import pytest

from schemas.openai import OutputLine
from shared import bus
from shared.embedded import EmbeddedNats
from tests.harness import API_KEY, Harness
from tests.helpers import CHAT, chat_jsonl, wait_until_sync

pytestmark = [pytest.mark.slow, pytest.mark.crash]

SERVICES = ("api", "results_writer", "watchdog", "worker-1")
# Timings that make recovery take seconds, not the production defaults' minutes.
FAST_RECOVERY = {
    "JETBATCH_REQUEST_ACK_WAIT_S": "5",  # a killed worker's requests come back after 5 s
    "JETBATCH_REDRIVE_AFTER_S": "3",
    "JETBATCH_WATCHDOG_INTERVAL_S": "0.5",
    "JETBATCH_CLOSE_GRACE_S": "2",
    "JETBATCH_HEARTBEAT_INTERVAL_S": "1",
    # 8 requests at a time, 20 ms each: a few hundred lines take a few seconds.
    "JETBATCH_INSTANT_DELAY_S": "0.02",
    "JETBATCH_MAX_IN_FLIGHT": "8",
}
FINISH_TIMEOUT_S = 150
# What the api answers while it is down or restarting: to a wait, "not yet".
API_DOWN = (openai.APIConnectionError, openai.InternalServerError)


@pytest.fixture
def harness(nats_server: EmbeddedNats, database_url: str, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(
        tmp_path / "harness", dict(FAST_RECOVERY), nats=nats_server, database_url=database_url
    )
    h.start_servers()
    for name in SERVICES:
        h.start(name)
    h.wait_api()
    yield h
    h.stop_all()


def client(h: Harness) -> openai.OpenAI:
    return openai.OpenAI(base_url=h.base_url, api_key=API_KEY, max_retries=3, timeout=30)


def create(c: openai.OpenAI, n: int, prefix: str) -> str:
    f = c.files.create(file=(f"{prefix}.jsonl", chat_jsonl(n, prefix)), purpose="batch")
    return c.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h").id


def done(c: openai.OpenAI, batch_id: str) -> int:
    counts = c.batches.retrieve(batch_id).request_counts
    return 0 if counts is None else counts.completed + counts.failed


def lines(c: openai.OpenAI, file_id: str | None) -> list[OutputLine]:
    if file_id is None:
        return []
    data = c.files.content(file_id).read()
    return [msgspec.json.decode(x, type=OutputLine) for x in data.splitlines()]


def check_batch(
    h: Harness, c: openai.OpenAI, batch_id: str, n: int, prefix: str, final: set[str]
) -> Any:
    """The batch reaches a final status with each of its n custom_ids exactly once."""
    try:
        batch: Any = wait_until_sync(
            lambda: b if (b := c.batches.retrieve(batch_id)).status in final else None,
            f"batch {batch_id} to be {final}",
            timeout_s=FINISH_TIMEOUT_S,
            interval_s=0.5,
            retry_on=API_DOWN,
        )
    except AssertionError:
        logs = "\n".join(f"--- {s}\n{h.log_tail(s, 15)}" for s in h.procs)
        raise AssertionError(f"{c.batches.retrieve(batch_id)}\n{logs}") from None
    output, errors = lines(c, batch.output_file_id), lines(c, batch.error_file_id)
    ids = [x.custom_id for x in output + errors]
    assert len(ids) == n, (len(ids), n)
    assert len(set(ids)) == n, "duplicated custom_ids"
    assert set(ids) == {f"{prefix}-{i}" for i in range(n)}
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (n, len(output), len(errors))
    return batch


def kill_mid_batch(h: Harness, c: openai.OpenAI, victim: str, batch_id: str, at: int) -> None:
    wait_until_sync(lambda: done(c, batch_id) >= at, f"{at} lines done", retry_on=API_DOWN)
    if victim == "nats":
        h.kill_nats()
        time.sleep(1.0)
        h.restart_nats()
    else:
        h.kill(victim)
        time.sleep(0.5)
        h.restart(victim)
        if victim == "api":
            h.wait_api()


@pytest.mark.parametrize("victim", ["worker-1", "results_writer", "watchdog", "nats"])
def test_batches_finish_exactly_once_after_a_sigkill_of(harness: Harness, victim: str) -> None:
    c = client(harness)
    batches = [
        (create(c, 300, f"{victim}-a"), f"{victim}-a"),
        (create(c, 300, f"{victim}-b"), f"{victim}-b"),
    ]
    kill_mid_batch(harness, c, victim, batches[0][0], at=75)
    for batch_id, prefix in batches:
        batch = check_batch(harness, c, batch_id, 300, prefix, {"completed"})
        assert batch.request_counts.completed == 300


def test_a_batch_finishes_exactly_once_after_a_sigkill_of_the_api_while_publishing(
    harness: Harness,
) -> None:
    # Big enough that publishing takes a while (~1 s): the kill lands mid-publish.
    n = 20_000
    c = client(harness)
    batch_id = create(c, n, "api")
    nc_url = harness.nats.url  # type: ignore[union-attr]

    def published() -> int:
        import asyncio

        async def last_seq() -> int:
            nc = await nats.connect(nc_url)
            try:
                return (await nc.jetstream().stream_info(bus.REQUESTS.name)).state.last_seq
            finally:
                await nc.close()

        return asyncio.run(last_seq())

    wait_until_sync(lambda: published() >= 500, "publishing to start", interval_s=0.005)
    harness.kill("api")
    killed_at = published()
    assert killed_at < n, "the kill came after publishing finished"
    harness.restart("api")
    harness.wait_api()
    batch = check_batch(harness, c, batch_id, n, "api", {"completed"})
    print("COUNTS", batch.request_counts, "killed at", killed_at)
    assert batch.request_counts.completed == n
    assert "re-driven" in harness.log_tail("api", 400) or "re-driving" in harness.log_tail(
        "watchdog", 400
    )


def test_a_cancel_survives_a_sigkill_of_the_watchdog(harness: Harness) -> None:
    # No worker: the cancelled batch's lines can only be closed out at the watchdog's word, and
    # the watchdog is killed before it gives it.
    harness.kill("worker-1", signal.SIGTERM)
    harness.wait("worker-1", 30)
    c = client(harness)
    kept, dropped = create(c, 300, "kept"), create(c, 300, "dropped")
    wait_until_sync(
        lambda: c.batches.retrieve(dropped).status == "in_progress",
        "it to be published",
        retry_on=API_DOWN,
    )
    assert c.batches.cancel(dropped).status == "cancelling"
    harness.kill("watchdog")  # within its 2 s close-out grace
    time.sleep(1.0)
    assert c.batches.retrieve(dropped).status == "cancelling"
    harness.restart("watchdog")
    batch = check_batch(harness, c, dropped, 300, "dropped", {"cancelled"})
    errors = lines(c, batch.error_file_id)
    assert {x.error.code for x in errors if x.error} == {"batch_cancelled"}
    assert batch.request_counts.completed == 0
    harness.restart("worker-1")  # skips the cancelled batch's queued requests, runs the other
    check_batch(harness, c, kept, 300, "kept", {"completed"})


def test_sigterm_hands_a_workers_in_flight_requests_to_another(harness: Harness) -> None:
    # Each request takes 2 s and the drain waits 0.5 s: the stopped worker must hand back what it
    # holds, and the other worker (started now) must run it; nothing is lost or duplicated.
    harness.kill("worker-1", signal.SIGTERM)
    harness.wait("worker-1", 30)
    slow = {"JETBATCH_INSTANT_DELAY_S": "2", "JETBATCH_DRAIN_TIMEOUT_S": "0.5"}
    harness.restart("worker-1", **slow)
    c = client(harness)
    batch_id = create(c, 40, "term")
    wait_until_sync(lambda: "ready" in harness.log_tail("worker-1"), "worker-1 to be ready")
    time.sleep(3)  # worker-1 is now holding 8 requests, 2 s into them or less
    harness.start("worker-2", JETBATCH_INSTANT_DELAY_S="0.05")
    harness.kill("worker-1", signal.SIGTERM)
    # Its drain (0.5 s) is long over by 10 s: a worker still running then fails the wait.
    assert harness.wait("worker-1", 10) == 0
    assert "handed back" in harness.log_tail("worker-1")
    check_batch(harness, c, batch_id, 40, "term", {"completed"})
