"""Dispatch in scheduling order (README: Scheduling), through the official openai SDK against the
whole system on a slow instant engine: a small batch of another project, or a high-priority one
of the same project, finishes while a big batch is still running; REQUESTS holds a window, not
the big batch; a waiting batch shows its queue place; lines published straight to JetStream are
a class of their own, so a flood of them does not hold a batch back; every line comes back
exactly once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import nats
import openai
import pytest

from schemas.messages import DIRECT, RequestMessage, ResultMessage
from services.api import dispatch_store, store
from services.api.dispatcher import TURN_NS
from services.api.schedule import allocate
from services.watchdog.store import redrive_due
from shared import bus
from shared.db import MIGRATIONS_DIR
from tests.helpers import CHAT, CHAT_MODEL, admin_client, chat_jsonl, project_with_key, wait_until
from tests.lifecycle_helpers import System, check_exactly_once, lifecycle_env, running_system

BIG = 1_500  # lines: 4 in flight x 0.05 s = 80 lines/s, so about 19 s alone


async def project_client(system: System, name: str, **update: Any) -> openai.AsyncOpenAI:
    org = admin_client(system.base_url)
    project_id, key = await project_with_key(org, name)
    if update:
        await org.admin.organization.projects.update(project_id, extra_body=update)
    return openai.AsyncOpenAI(base_url=system.base_url, api_key=key, max_retries=0)


async def submit(client: openai.AsyncOpenAI, lines: int, prefix: str, **extra: Any) -> str:
    f = await client.files.create(file=("in.jsonl", chat_jsonl(lines, prefix)), purpose="batch")
    batch = await client.batches.create(
        input_file_id=f.id, endpoint=CHAT, completion_window="24h", extra_body=extra or None
    )
    return batch.id


async def reaches(client: openai.AsyncOpenAI, batch_id: str, check: Any, what: str) -> Any:
    last: list[Any] = []

    async def reached() -> Any:
        batch = await client.batches.retrieve(batch_id)
        last[:] = [batch]
        return batch if check(batch) else None

    try:
        return await wait_until(reached, f"{batch_id}: {what}", timeout_s=30, interval_s=0.1)
    except AssertionError as e:
        raise AssertionError(f"{e}; last seen: {last}") from None


async def finished(
    system: System, client: openai.AsyncOpenAI, batch_id: str, prefix: str, lines: int
) -> None:
    batch = await reaches(client, batch_id, lambda b: b.status == "completed", "completed")
    ids = [line.custom_id for line in await system.lines(batch.output_file_id)]
    check_exactly_once(ids, {f"{prefix}-{i}" for i in range(lines)})


def progressed(batch: Any) -> bool:
    return bool(batch.request_counts and batch.request_counts.completed)


@pytest.fixture
def env(database_url: str, nats_url: str, scratch_dir: Path) -> dict[str, str]:
    return lifecycle_env(
        database_url, nats_url, scratch_dir,
        JETBATCH_INSTANT_DELAY_S="0.05",
        JETBATCH_MAX_IN_FLIGHT="4",
        JETBATCH_DISPATCH_MIN_WINDOW="16",
        JETBATCH_DISPATCH_AHEAD_S="0.5",
        JETBATCH_MAX_ACTIVE_BATCHES="20",
    )  # fmt: skip


async def requests_in_stream(nats_url: str) -> int:
    nc = await nats.connect(nats_url)
    try:
        return (await nc.jetstream().stream_info(bus.REQUESTS.name)).state.messages
    finally:
        await nc.close()


async def test_a_small_batch_of_another_project_runs_beside_a_big_one(
    env: dict[str, str], nats_url: str
) -> None:
    async with running_system(env) as system:
        team_a = await project_client(system, "team-a")
        team_b = await project_client(system, "team-b")
        big = await submit(team_a, BIG, "a")
        await reaches(team_a, big, progressed, "progress")
        # REQUESTS holds a window of the big batch's lines, not all of them.
        assert await requests_in_stream(nats_url) < BIG // 2
        # Creation order is kept to the second (`created_at`), ties broken by id: the queued
        # batch is created in a later second than the big one, so it is served after it.
        created = (await team_a.batches.retrieve(big)).created_at
        await asyncio.sleep(max(0.0, created + 1.05 - time.time()))
        queued = await submit(team_a, 20, "q")  # behind the big one in its own project
        waiting = await reaches(
            team_a,
            queued,
            lambda b: (b.model_extra or {}).get("queue_position") is not None,
            "its place",
        )
        assert (waiting.model_extra or {})["queue_position"] == 1
        assert (waiting.model_extra or {})["estimated_start_at"] >= waiting.created_at
        small = await submit(team_b, 20, "b")
        await finished(system, team_b, small, "b", 20)
        big_now = await team_a.batches.retrieve(big)
        assert big_now.status == "in_progress"
        assert big_now.request_counts is not None and big_now.request_counts.completed < BIG // 2
        queued_now = await team_a.batches.retrieve(queued)
        assert queued_now.request_counts is not None and queued_now.request_counts.completed == 0
        await team_a.batches.cancel(big)
        await finished(system, team_a, queued, "q", 20)


async def test_with_another_replicas_batch_of_the_model_lines_are_granted_only_in_its_turn(
    env: dict[str, str], nats_url: str, database_url: str
) -> None:
    """Where another replica may dispatch some of a model's batches, a dispatcher grants only
    holding the model's turn, reading the backlog again then, so the window is not overshot by
    two replicas granting the same room at once."""
    conn = await asyncpg.connect(database_url)
    turn = "SELECT pg_advisory_{}($1, hashtext($2))"
    try:
        # Another replica's batch of the model: claimed (by this test), in progress, unpublished.
        await conn.execute(
            "INSERT INTO batches (id, endpoint, model, input_file_id, completion_window, status,"
            " created_at, in_progress_at, total) VALUES"
            " ('batch_elsewhere', $1, $2, 'file-x', '24h', 'in_progress', 1, 1, 10)",
            CHAT,
            CHAT_MODEL,
        )
        async with (
            store.claim(database_url, "batch_elsewhere") as claimed,
            running_system(env) as system,
        ):
            assert claimed
            team_a = await project_client(system, "team-a")
            await conn.execute(turn.format("lock"), TURN_NS, CHAT_MODEL)  # that replica grants
            big = await submit(team_a, 100, "a")
            await reaches(team_a, big, lambda b: b.status == "in_progress", "in progress")
            await asyncio.sleep(1.0)  # 40 ticks
            assert await conn.fetchval("SELECT dispatched FROM batches WHERE id = $1", big) == 0
            assert await requests_in_stream(nats_url) == 0
            await conn.execute(turn.format("unlock"), TURN_NS, CHAT_MODEL)
            await finished(system, team_a, big, "a", 100)
    finally:
        await conn.execute("DELETE FROM batches WHERE id = 'batch_elsewhere'")
        await conn.close()


async def direct_results(js: nats.js.JetStreamContext, batch_id: str) -> list[ResultMessage]:
    subject = ResultMessage.subject_for(batch_id)
    info = await js.stream_info(bus.RESULTS.name, subjects_filter=subject)
    if not (info.state.subjects or {}).get(subject):
        return []
    sub = await js.subscribe(subject, ordered_consumer=True)
    try:
        count = info.state.subjects[subject]
        return [
            msgspec.json.decode((await sub.next_msg(timeout=5)).data, type=ResultMessage)
            for _ in range(count)
        ]
    finally:
        await sub.unsubscribe()


async def test_a_flood_published_straight_to_jetstream_does_not_hold_a_batch_back(
    env: dict[str, str], nats_url: str
) -> None:
    """Direct lines are their own class on the worker: with both classes waiting, each holds
    half the engine. Before, a batch's lines waited behind the whole flood."""
    flood = 800  # 80 lines/s alone: about 10 s
    async with running_system(env) as system:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        try:
            for line in range(flood):
                req = RequestMessage(
                    batch_id="ext-flood", line=line, custom_id=f"f-{line}", endpoint=CHAT,
                    model=CHAT_MODEL, body=msgspec.Raw(b'{"model":"m","messages":[]}'),
                )  # fmt: skip
                await js.publish(
                    RequestMessage.subject_for(CHAT_MODEL, DIRECT),
                    msgspec.json.encode(req),
                    headers={bus.MSG_ID: req.msg_id},
                )
            await wait_until(
                lambda: direct_results(js, "ext-flood"), "the flood to start", interval_s=0.1
            )
            small = await submit(system.client, 20, "s")
            await finished(system, system.client, small, "s", 20)
            done = len(await direct_results(js, "ext-flood"))
            assert done < flood * 3 // 4, f"{done} of the flood's {flood} lines ran first"

            async def all_back() -> bool:
                return len(await direct_results(js, "ext-flood")) >= flood

            await wait_until(all_back, "the whole flood", timeout_s=60, interval_s=0.5)
            results = await direct_results(js, "ext-flood")
            check_exactly_once([r.custom_id for r in results], {f"f-{i}" for i in range(flood)})
        finally:
            await nc.close()


async def test_a_high_priority_batch_of_the_same_project_goes_first(
    env: dict[str, str],
) -> None:
    async with running_system(env) as system:
        team = await project_client(system, "team", max_batch_priority=10)
        big = await submit(team, BIG, "a")
        await reaches(team, big, progressed, "progress")
        urgent = await submit(team, 20, "u", priority=10)
        await finished(system, team, urgent, "u", 20)
        big_now = await team.batches.retrieve(big)
        assert big_now.status == "in_progress"
        assert big_now.request_counts is not None and big_now.request_counts.completed < BIG // 2
        await team.batches.cancel(big)
        await reaches(team, big, lambda b: b.status == "cancelled", "cancelled")


async def test_a_batch_waiting_for_dispatch_is_re_driven_only_when_no_api_claims_it(
    database_url: str,
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        # Ids whose lock keys (hashtext) are positive and negative: pg_locks shows them unsigned.
        ids = [f"batch_wait{i}" for i in range(40)]
        signs = {await conn.fetchval("SELECT hashtext($1) < 0", i): i for i in ids}
        for batch_id in signs.values():
            await conn.execute(
                "INSERT INTO batches (id, endpoint, model, input_file_id, completion_window,"
                " status, created_at, in_progress_at, total) VALUES"
                " ($1, $2, 'm', 'file-x', '24h', 'in_progress', 1, 1, 10)",
                batch_id,
                CHAT,
            )
            async with store.claim(database_url, batch_id) as claimed:
                assert claimed
                assert batch_id not in await redrive_due(conn, 100)  # its api dispatches it
            assert batch_id in await redrive_due(conn, 100)  # that api is gone
        assert len(signs) == 2
    finally:
        await conn.close()


async def test_batches_are_numbered_in_the_order_they_are_created(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        for batch_id in ("batch_zz", "batch_mm", "batch_aa"):  # one second, ids out of order
            await conn.execute(
                "INSERT INTO batches (id, endpoint, model, input_file_id, completion_window,"
                " status, created_at, in_progress_at, total) VALUES"
                " ($1, $2, 'm', 'file-x', '24h', 'in_progress', 7, 7, 10)",
                batch_id,
                CHAT,
            )
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    assert pool is not None
    try:
        found, _ = await dispatch_store.candidates(pool, "m")
    finally:
        await pool.close()
    assert [c.batch_id for c in sorted(found, key=lambda c: c.seq)] == [
        "batch_zz", "batch_mm", "batch_aa"
    ]  # fmt: skip
    assert allocate(found, 10, 8) == {"batch_zz": 10}


async def test_migration_016_numbers_the_batches_a_deployment_already_has(
    database_url: str,
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("ALTER TABLE batches DROP COLUMN seq")  # as before the migration
        for i in range(3):
            await conn.execute(
                "INSERT INTO batches (id, endpoint, model, input_file_id, completion_window,"
                " status, created_at, total) VALUES ($1, $2, 'm', 'file-x', '24h', 'completed',"
                " 1, 10)",
                f"batch_old{i}",
                CHAT,
            )
        await conn.execute((MIGRATIONS_DIR / "016_batch_order.sql").read_text())
        seqs = [r["seq"] for r in await conn.fetch("SELECT seq FROM batches ORDER BY seq")]
        assert len(seqs) == 3 and None not in seqs and len(set(seqs)) == 3
        await conn.execute(
            "INSERT INTO batches (id, endpoint, model, input_file_id, completion_window, status,"
            " created_at, total) VALUES ('batch_new', $1, 'm', 'file-x', '24h', 'validating', 2, 1)",
            CHAT,
        )
        assert await conn.fetchval("SELECT seq FROM batches WHERE id = 'batch_new'") > max(seqs)
    finally:
        await conn.close()
