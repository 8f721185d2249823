"""Dead letters, for real: a request that does not decode (the worker rejects it), a request whose
worker dies on every delivery (JetStream's max-deliveries advisory, consumed by the watchdog), a
result the results writer cannot use; each is recorded with its payload, error and delivery
count, becomes an error line so its batch still finishes, and can be listed and replayed
through the API and `jetbatch dlq`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import pytest
from nats.js import JetStreamContext

from schemas.messages import RequestMessage, ResultMessage
from shared import bus
from tests.helpers import API_KEY, CHAT_MODEL, chat_jsonl, wait_until
from tests.lifecycle_helpers import fetchrow, lifecycle_env, running_system

REPO = Path(__file__).resolve().parents[2]
INFERENCE_DURABLE = f"inference-{CHAT_MODEL}"


@pytest.fixture
def env(database_url: str, nats_url: str, scratch_dir: Path) -> dict[str, str]:
    return lifecycle_env(
        database_url,
        nats_url,
        scratch_dir,
        JETBATCH_REQUEST_MAX_DELIVER="2",
        JETBATCH_REQUEST_ACK_WAIT_S="1",
    )


@pytest.fixture
async def js(nats_url: str):  # type: ignore[no-untyped-def]
    nc = await nats.connect(nats_url)
    ctx = nc.jetstream()
    await bus.ensure_streams(ctx)
    yield ctx
    await nc.close()


async def dead_letters(system, **query: str) -> list[dict]:  # type: ignore[no-untyped-def]
    response = await system.client.get("/dead_letters", cast_to=object, options={"params": query})
    return response["data"]  # type: ignore[no-any-return, index]


async def test_an_undecodable_request_is_dead_lettered_with_an_error_line(
    env: dict[str, str], js: JetStreamContext
) -> None:
    async with running_system(env) as system:
        # Names its batch line, but is not a RequestMessage (no endpoint, model or body).
        payload = b'{"batch_id": "ext-orders", "line": 3, "custom_id": "order-3", "oops": 1}'
        await js.publish(RequestMessage.subject_for(CHAT_MODEL), payload)
        await js.publish(RequestMessage.subject_for(CHAT_MODEL), b"\xff not json")
        letters = await wait_until(lambda: _at_least(dead_letters(system), 2), "two dead letters")
        # A publisher of its own batch gets an error result for the line it named.
        sub = await js.subscribe(ResultMessage.subject_for("ext-orders"), ordered_consumer=True)
        result = msgspec.json.decode((await sub.next_msg(timeout=10)).data, type=ResultMessage)
        await sub.unsubscribe()
    by_custom_id = {d["custom_id"]: d for d in letters}
    named = by_custom_id["order-3"]
    assert named["source"] == "REQUESTS" and named["batch_id"] == "ext-orders"
    assert named["line"] == 3 and named["deliveries"] == 1
    assert "undecodable request" in named["error"]
    assert named["subject"] == RequestMessage.subject_for(CHAT_MODEL)
    assert by_custom_id[None]["payload_bytes"] == len(b"\xff not json")
    assert result.custom_id == "order-3" and result.line == 3 and not result.ok
    assert result.error_code == "dead_lettered" and str(named["id"]) in (result.error_message or "")

    async def drained() -> bool:  # termed: not redelivered
        return (await js.stream_info(bus.REQUESTS.name)).state.messages == 0

    await wait_until(drained, "the terminated request to leave the work queue", timeout_s=10)


async def test_a_request_that_kills_its_worker_every_time_is_dead_lettered_and_replayable(
    env: dict[str, str], js: JetStreamContext, database_url: str
) -> None:
    # No real worker at first: a "crashing" one takes line 0 and never answers (as a process
    # killed by it would), answers line 1, and holds line 2 back for a minute.
    async with running_system(env, start=("results_writer", "watchdog")) as system:
        batch_id = await system.create(chat_jsonl(3))
        sub = await bus.durable_fast_pull(
            js,
            bus.REQUESTS,
            INFERENCE_DURABLE,
            f"jetbatch.requests.{CHAT_MODEL}.>",
            ack_wait_s=1,
            max_deliver=2,
            max_ack_pending=100,
        )

        async def crash_on_line_0() -> list[dict]:
            for msg in await sub.fetch(10, 0.5):
                req = msgspec.json.decode(msg.data, type=RequestMessage)
                if req.line == 1:
                    answer = ResultMessage(
                        batch_id=req.batch_id, line=1, custom_id=req.custom_id,
                        request_id="r1", status_code=200,
                        response_body=msgspec.Raw(b'{"object": "chat.completion"}'),
                    )  # fmt: skip
                    await js.publish(
                        ResultMessage.subject_for(batch_id),
                        msgspec.json.encode(answer),
                        headers={bus.MSG_ID: answer.msg_id},
                    )
                    await msg.ack()
                elif req.line == 2:
                    await msg.nak(delay=60)
            return await dead_letters(system, batch_id=batch_id)

        [letter] = await wait_until(crash_on_line_0, "line 0 to be dead-lettered")
        await sub.unsubscribe()
        assert letter["custom_id"] == "req-0" and letter["deliveries"] == 2
        assert "max deliveries" in letter["error"]

        async def error_line_written() -> bool:
            batch = await system.client.batches.retrieve(batch_id)
            return batch.request_counts.failed == 1  # type: ignore[union-attr]

        await wait_until(error_line_written, "the dead letter's error line")
        row = await fetchrow(
            database_url,
            "SELECT error_code FROM request_results WHERE batch_id = $1 AND custom_id = 'req-0'",
            batch_id,
        )
        assert row is not None and row["error_code"] == "dead_lettered"
        info = await js.stream_info(bus.REQUESTS.name)
        assert info.state.messages == 1  # line 2 (held back); line 0 was removed once recorded

        # The batch is still in progress: a replay withdraws the error line, and a healthy
        # worker runs the request again.
        replayed = await system.client.post(f"/dead_letters/{letter['id']}/replay", cast_to=object)
        assert replayed["replay_count"] == 1 and replayed["replayed_at"] is not None  # type: ignore[index]
        batch = await system.client.batches.retrieve(batch_id)
        assert batch.request_counts.failed == 0  # type: ignore[union-attr]
        system.start("worker:healthy")

        async def rerun() -> bool:
            row = await fetchrow(
                database_url,
                "SELECT ok FROM request_results WHERE batch_id = $1 AND custom_id = 'req-0'",
                batch_id,
            )
            return row is not None and row["ok"]

        await wait_until(rerun, "the replayed request to succeed")
        # The dead letter stays listed, with its replay recorded.
        [again] = await dead_letters(system, batch_id=batch_id)
        assert again["replay_count"] == 1


async def test_a_result_the_writer_cannot_use_is_a_dead_letter(
    env: dict[str, str], js: JetStreamContext
) -> None:
    async with running_system(env, start=("results_writer",)) as system:
        await js.publish(ResultMessage.subject_for("batch_x"), b"not a result")
        [letter] = await wait_until(lambda: dead_letters(system), "the dead letter")
        detail = await system.client.get(f"/dead_letters/{letter['id']}", cast_to=object)
    assert letter["source"] == "RESULTS" and letter["subject"] == ResultMessage.subject_for(
        "batch_x"
    )
    assert "undecodable" in letter["error"]
    assert detail["payload"] == "not a result"  # type: ignore[index]


async def test_a_result_is_replayed_by_the_watchdog_and_without_one_it_says_so(
    env: dict[str, str], js: JetStreamContext
) -> None:
    """Only the watchdog may publish results (the api may not: shared/nats_auth.py), so the
    api has it replay them."""
    async with running_system(env, start=("results_writer",)) as system:
        await js.publish(ResultMessage.subject_for("batch_nowd"), b"{broken")
        [letter] = await wait_until(lambda: dead_letters(system), "the dead letter")
        async with httpx.AsyncClient(
            base_url=system.base_url, headers={"Authorization": f"Bearer {API_KEY}"}
        ) as http:
            refused = await http.post(f"/dead_letters/{letter['id']}/replay")
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "watchdog_unavailable"
            system.start("watchdog")
            replayed = await wait_until(
                lambda: _replayed(http, letter["id"]), "the watchdog to replay it"
            )
    assert replayed["replay_count"] == 1


async def _replayed(http: httpx.AsyncClient, letter_id: int) -> dict[str, Any] | None:
    response = await http.post(f"/dead_letters/{letter_id}/replay")
    return response.json() if response.status_code == 200 else None  # type: ignore[no-any-return]


async def test_dlq_cli_lists_shows_and_replays(env: dict[str, str], js: JetStreamContext) -> None:
    async with running_system(env, start=("results_writer", "watchdog")) as system:
        await js.publish(ResultMessage.subject_for("batch_cli"), b"{broken")
        [letter] = await wait_until(lambda: dead_letters(system), "the dead letter")
        cli_env = {**os.environ, "JETBATCH_API_URL": system.base_url, "JETBATCH_API_KEY": API_KEY}

        async def jetbatch(*args: str) -> str:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.cli", *args, cwd=REPO, env=cli_env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await proc.communicate()
            assert proc.returncode == 0, out.decode()
            return out.decode()

        listed = await jetbatch("dlq", "list")
        assert str(letter["id"]) in listed and "RESULTS" in listed
        shown = await jetbatch("dlq", "show", str(letter["id"]))
        assert "{broken" in shown
        replayed = await jetbatch("dlq", "replay", str(letter["id"]))
        assert ResultMessage.subject_for("batch_cli") in replayed
        # Replayed as it was, so rejected again: the same stored message is a new dead letter
        # only because replay published a new message.
        await wait_until(lambda: _at_least(dead_letters(system), 2), "the replay's dead letter")
        workers = await jetbatch("workers")
        assert "no workers" in workers


async def _at_least(rows, n: int):  # type: ignore[no-untyped-def]
    got = await rows
    return got if len(got) >= n else None
