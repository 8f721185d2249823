"""The backend the admin page and the CLI share: a batch's progress stream (server-sent events),
drain/resume/restart of workers through KV `jetbatch_worker_control`, the LOGS stream behind
GET /v1/logs, and idempotent uploads and batch creation. Real servers, real processes."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import openai
import pytest

from schemas.openai import Batch
from shared.embedded import EmbeddedNats
from tests.harness import REPO
from tests.helpers import API_KEY, CHAT, CHAT_MODEL, chat_jsonl, wait_until
from tests.lifecycle_helpers import lifecycle_env, running_system

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def env(database_url: str, nats_url: str, scratch_dir: Path) -> dict[str, str]:
    return lifecycle_env(database_url, nats_url, scratch_dir, JETBATCH_HEARTBEAT_INTERVAL_S="0.2")


async def sse(response: httpx.Response) -> AsyncIterator[dict[str, str]]:
    """The events of a text/event-stream response, each as its fields."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if not line:
            if fields:
                yield fields
            fields = {}
            continue
        name, _, value = line.partition(":")
        fields[name or "comment"] = value.removeprefix(" ")


async def worker(http: httpx.AsyncClient, worker_id: str) -> dict[str, Any]:
    data = (await http.get("/workers")).json()["data"]
    return next((w for w in data if worker_id in (w["worker_id"], w["control_id"])), {})


# Progress stream -----------------------------------------------------------------------------


async def test_progress_stream_follows_a_batch_to_completed_and_resumes(
    env: dict[str, str],
) -> None:
    env = {**env, "JETBATCH_INSTANT_DELAY_S": "0.05"}
    async with running_system(env) as system:
        batch_id = await system.create(chat_jsonl(20))
        events = []
        async with (
            httpx.AsyncClient(base_url=system.base_url, headers=HEADERS, timeout=30) as http,
            http.stream("GET", f"/batches/{batch_id}/events") as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            async for event in sse(response):
                events.append(event)
        assert events[0]["event"] == "progress" and events[-1]["event"] == "done"
        ids = [int(e["id"]) for e in events]
        assert ids == sorted(set(ids)), "event ids strictly increase"
        final = msgspec.json.decode(events[-1]["data"], type=Batch)
        assert final.status == "completed" and final.request_counts.completed == 20
        retrieved = (await system.client.batches.retrieve(batch_id)).model_dump(mode="json")
        assert msgspec.json.decode(events[-1]["data"]) == retrieved
        # Resumed from the last id: the batch is over, so only the final `done` comes.
        async with (
            httpx.AsyncClient(base_url=system.base_url, headers=HEADERS, timeout=30) as http,
            http.stream(
                "GET", f"/batches/{batch_id}/events", headers={"Last-Event-ID": str(ids[-1])}
            ) as response,
        ):
            again = [e async for e in sse(response)]
        assert [e["event"] for e in again] == ["done"]


async def test_progress_stream_sends_current_state_only_when_newer_than_last_event_id(
    env: dict[str, str],
) -> None:
    async with running_system(env, start=("watchdog",)) as system:  # no worker: it stays queued
        batch_id = await system.create(chat_jsonl(3))
        await system.wait_batch(batch_id, {"in_progress"})
        async with httpx.AsyncClient(base_url=system.base_url, headers=HEADERS, timeout=30) as http:

            async def settled() -> dict[str, str] | None:
                """The first event, once two connections a poll apart agree (publishing done)."""
                seen = []
                for _ in range(2):
                    async with http.stream("GET", f"/batches/{batch_id}/events") as response:
                        seen.append(await anext(sse(response)))
                    await asyncio.sleep(0.6)
                return seen[0] if seen[0]["id"] == seen[1]["id"] else None

            first = await wait_until(settled, "the queued batch to stop changing")
            assert first["event"] == "progress"
            resumed: list[dict[str, str]] = []

            async def read() -> None:
                async with http.stream(
                    "GET", f"/batches/{batch_id}/events", headers={"Last-Event-ID": first["id"]}
                ) as response:
                    async for event in sse(response):
                        resumed.append(event)

            reader = asyncio.create_task(read())
            await asyncio.sleep(1.5)  # three polls: the state did not change, nothing is sent
            assert resumed == []
            await system.client.batches.cancel(batch_id)
            await wait_until(lambda: resumed, "the cancel to reach the stream")
            reader.cancel()
        assert int(resumed[0]["id"]) > int(first["id"])
        assert msgspec.json.decode(resumed[0]["data"])["status"] in ("cancelling", "cancelled")


async def test_progress_stream_of_unknown_or_other_project_batch_is_404_before_any_event(
    env: dict[str, str],
) -> None:
    async with (
        running_system(env, start=()) as system,
        httpx.AsyncClient(base_url=system.base_url, headers=HEADERS, timeout=10) as http,
    ):
        response = await http.get("/batches/batch_nope/events")
        assert response.status_code == 404
        assert response.headers["content-type"].startswith("application/json")
        assert response.json()["error"]["code"] == "not_found"


# Worker control ------------------------------------------------------------------------------


async def test_drain_stops_a_worker_taking_work_and_resume_starts_it_again(
    env: dict[str, str],
) -> None:
    env = {**env, "JETBATCH_INSTANT_DELAY_S": "0.02"}
    async with (
        running_system(env, start=("results_writer", "watchdog", "worker:w1")) as system,
        httpx.AsyncClient(base_url=system.base_url, headers=HEADERS, timeout=30) as http,
    ):
        await wait_until(lambda: worker(http, "w1"), "worker w1 to beat")
        drained = await http.post("/workers/w1/drain")
        assert drained.status_code == 200, drained.text
        assert drained.json()["command"] == "drain" and drained.json()["control_id"] == "w1"

        async def state_is(state: str) -> bool:
            return (await worker(http, "w1")).get("state") == state

        await wait_until(lambda: state_is("drained"), "w1 to say drained")
        batch_id = await system.create(chat_jsonl(5))
        await system.wait_batch(batch_id, {"in_progress"})
        await asyncio.sleep(2.0)  # a running worker finishes 5 lines in well under this
        batch = await system.client.batches.retrieve(batch_id)
        assert batch.request_counts and batch.request_counts.completed == 0
        assert (await http.post("/workers/w1/resume")).json()["command"] == "resume"
        await wait_until(lambda: state_is("running"), "w1 to say running")
        done = await system.wait_batch(batch_id, {"completed"})
        assert done.request_counts.completed == 5


async def test_worker_commands_are_for_admins_and_known_workers(
    env: dict[str, str], database_url: str
) -> None:
    async with (
        running_system(env, start=()) as system,
        httpx.AsyncClient(base_url=system.base_url, headers=HEADERS, timeout=30) as http,
    ):
        missing = await http.post("/workers/no-such-worker/drain")
        assert missing.status_code == 404
        assert missing.json()["error"]["message"] == "no worker no-such-worker"
        project = (await http.post("/organization/projects", json={"name": "p"})).json()["id"]
        account = await http.post(
            f"/organization/projects/{project}/service_accounts", json={"name": "bot"}
        )
        key = account.json()["api_key"]["value"]
        for path in ("/workers/w1/drain", "/logs"):
            method = http.post if path.endswith("drain") else http.get
            refused = await method(path, headers={"Authorization": f"Bearer {key}"})
            assert refused.status_code == 403
            assert refused.json()["error"]["code"] == "insufficient_permissions"


async def test_restart_makes_a_worker_process_exit_0_and_the_restarted_one_runs(
    env: dict[str, str], nats_server: EmbeddedNats, scratch_dir: Path
) -> None:
    worker_env = {
        **os.environ,
        **env,
        "JETBATCH_NATS_URL": nats_server.url_for("inference"),
        "JETBATCH_METRICS_PORT": "0",
    }
    command = [sys.executable, "-m", "services.inference", "--model", CHAT_MODEL]
    command += ["--worker-id", "wr"]
    log_path = scratch_dir / f"worker-wr-{time.time_ns()}.log"

    def start() -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as out:
            return subprocess.Popen(command, cwd=REPO, env=worker_env, stdout=out, stderr=out)

    async with (
        running_system(env, start=("results_writer",)) as system,
        httpx.AsyncClient(base_url=system.base_url, headers=HEADERS, timeout=30) as http,
    ):
        proc = start()
        try:
            first = await wait_until(lambda: worker(http, "wr"), "worker wr to beat")
            restart = await http.post("/workers/wr/restart")
            assert restart.status_code == 200 and restart.json()["command"] == "restart"
            code = await asyncio.to_thread(proc.wait, 60)
            assert code == 0, log_path.read_text()[-3000:]
            proc = start()  # what systemd or `jetbatch up` does

            async def new_process() -> dict[str, Any] | None:
                w = await worker(http, "wr")
                return w if w and w["pid"] == proc.pid else None

            again = await wait_until(new_process, "the restarted worker to beat")
            assert again["state"] == "running" and again["pid"] != first["pid"]
            batch_id = await system.create(chat_jsonl(3))
            done = await system.wait_batch(batch_id, {"completed"}, timeout_s=60)
            assert done.request_counts.completed == 3
        finally:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 30)


# Logs ----------------------------------------------------------------------------------------


async def test_warnings_of_a_service_reach_get_logs(env: dict[str, str]) -> None:
    async with (
        running_system(env, start=("results_writer",)) as system,
        httpx.AsyncClient(base_url=system.base_url, headers=HEADERS, timeout=30) as http,
    ):
        logger = logging.getLogger("services.results_writer.probe")
        logger.warning("probe warning %d", 7, extra={"batch_id": "batch_probe"})
        logger.error("probe error")
        logger.info("probe info, not shipped")

        async def shipped() -> dict[str, Any] | None:
            body = (await http.get("/logs", params={"limit": 1000})).json()
            mine = [r for r in body["data"] if r["message"].startswith("probe")]
            return body if len(mine) == 2 else None

        body = await wait_until(shipped, "the probe records in GET /v1/logs")
        mine = [r for r in body["data"] if r["message"].startswith("probe")]
        assert [r["message"] for r in mine] == ["probe error", "probe warning 7"]  # newest first
        assert mine[1]["batch_id"] == "batch_probe" and mine[1]["level"] == "WARNING"
        assert body["counts"]["error"] >= 1 and body["counts"]["warning"] >= 1
        errors = (await http.get("/logs", params={"level": "error", "limit": 1000})).json()
        assert all(r["level"] in ("ERROR", "CRITICAL") for r in errors["data"])
        page = (await http.get("/logs", params={"limit": 1, "before": mine[0]["id"]})).json()
        assert all(r["id"] < mine[0]["id"] for r in page["data"])


# Idempotency ---------------------------------------------------------------------------------


async def test_idempotent_upload_and_batch_create_return_the_first_response(
    env: dict[str, str], database_url: str
) -> None:
    async with running_system(env, start=()) as system:
        client = system.client
        content = chat_jsonl(2)
        f1 = await client.files.create(
            file=("in.jsonl", content), purpose="batch", extra_headers={"Idempotency-Key": "up-1"}
        )
        f2 = await client.files.create(
            file=("in.jsonl", content), purpose="batch", extra_headers={"Idempotency-Key": "up-1"}
        )
        assert f1.id == f2.id
        with pytest.raises(openai.BadRequestError) as reused:
            await client.files.create(
                file=("in.jsonl", chat_jsonl(3)),
                purpose="batch",
                extra_headers={"Idempotency-Key": "up-1"},
            )
        assert reused.value.code == "idempotency_key_reused"
        b1 = await client.batches.create(
            input_file_id=f1.id,
            endpoint=CHAT,
            completion_window="24h",
            extra_headers={"Idempotency-Key": "b-1"},
        )
        b2 = await client.batches.create(
            input_file_id=f1.id,
            endpoint=CHAT,
            completion_window="24h",
            extra_headers={"Idempotency-Key": "b-1"},
        )
        assert b1.id == b2.id
        with pytest.raises(openai.BadRequestError) as reused:
            await client.batches.create(
                input_file_id=f1.id,
                endpoint=CHAT,
                completion_window="24h",
                metadata={"x": "y"},
                extra_headers={"Idempotency-Key": "b-1"},
            )
        assert reused.value.code == "idempotency_key_reused"
        # Concurrent repeats (as from two api replicas): one batch.
        made = await asyncio.gather(
            *(
                client.batches.create(
                    input_file_id=f1.id,
                    endpoint=CHAT,
                    completion_window="24h",
                    extra_headers={"Idempotency-Key": "b-2"},
                )
                for _ in range(4)
            )
        )
        assert len({b.id for b in made}) == 1
        listed = [b.id async for b in client.batches.list(limit=100)]
        assert len(listed) == 2
