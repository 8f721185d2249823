"""Usage and costs in OpenAI's shape, through the official SDK's admin client
(`client.admin.organization.usage...`), `GET /ready` and `GET /v1/stats` (README: Usage and
costs, Operations); a batch's `gpu_seconds`; on a real nats-server and PostgreSQL."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import openai
import pytest
from openai.types.admin.organization.usage_completions_response import (
    DataResultOrganizationUsageCompletionsResult as CompletionsResult,
)

from shared.domain.retention import prune_results
from tests.helpers import API_KEY, CHAT, CHAT_MODEL, admin_client, chat_jsonl, project_with_key
from tests.lifecycle_helpers import lifecycle_env, running_system

IN_PRICE, OUT_PRICE, GPU_HOUR = 1000.0, 2000.0, 3600.0  # per million tokens; per GPU-hour


async def test_a_batch_shows_in_usage_costs_stats_and_gpu_seconds_through_the_sdk(
    database_url: str, nats_url: str, scratch_dir: Path
) -> None:
    env = lifecycle_env(
        database_url, nats_url, scratch_dir,
        JETBATCH_PRICES=f"{CHAT_MODEL}={IN_PRICE:g}/{OUT_PRICE:g},{CHAT_MODEL}={GPU_HOUR:g}/h",
        JETBATCH_INSTANT_DELAY_S="0.05",  # requests go through the engine and take time there
    )  # fmt: skip
    async with running_system(env) as system:
        org = admin_client(system.base_url)
        project_id, key = await project_with_key(org, "usage")
        _, other_key = await project_with_key(org, "other")
        user = openai.AsyncOpenAI(base_url=system.base_url, api_key=key, max_retries=0)
        start = int(time.time()) - 60
        f = await user.files.create(file=("in.jsonl", chat_jsonl(4)), purpose="batch")
        created = await user.batches.create(
            input_file_id=f.id, endpoint=CHAT, completion_window="24h"
        )
        batch = await system.wait_batch(created.id, {"completed", "failed"})
        assert batch.status == "completed" and batch.usage.input_tokens > 0
        gpu_seconds = (batch.model_extra or {})["gpu_seconds"]
        assert gpu_seconds > 0

        usage = await org.admin.organization.usage.completions(
            start_time=start, bucket_width="1m", group_by=["project_id", "model", "batch"],
            project_ids=[project_id], limit=10,
        )  # fmt: skip
        assert usage.object == "page" and usage.has_more is False
        results = [r for b in usage.data for r in b.results]
        assert all(isinstance(r, CompletionsResult) for r in results)
        assert {(r.project_id, r.model, r.batch) for r in results} == {
            (project_id, CHAT_MODEL, True)
        }
        assert sum(r.input_tokens for r in results) == batch.usage.input_tokens
        assert sum(r.output_tokens for r in results) == batch.usage.output_tokens
        assert sum(r.num_model_requests for r in results) == 4
        embeddings = await org.admin.organization.usage.embeddings(start_time=start)
        assert [r for b in embeddings.data for r in b.results] == []

        costs = await org.admin.organization.usage.costs(
            start_time=start, group_by=["line_item", "project_id"], project_ids=[project_id]
        )
        amounts = {r.line_item: r.amount.value for b in costs.data for r in b.results if r.amount}
        assert amounts == pytest.approx({
            f"{CHAT_MODEL}, input": batch.usage.input_tokens * IN_PRICE / 1e6,
            f"{CHAT_MODEL}, output": batch.usage.output_tokens * OUT_PRICE / 1e6,
            f"{CHAT_MODEL}, gpu hours": gpu_seconds,  # at 3,600 a GPU-hour: 1 a GPU-second
        })  # fmt: skip

        async with httpx.AsyncClient(base_url=system.base_url) as http:
            mine = (await http.get("/stats", headers={"Authorization": f"Bearer {key}"})).json()
            theirs = await http.get("/stats", headers={"Authorization": f"Bearer {other_key}"})
            every = await http.get("/stats", headers={"Authorization": f"Bearer {API_KEY}"})
            assert mine["totals"]["batches_completed"] == 1
            assert mine["totals"]["lines_completed"] == 4
            assert [p["key"] for p in mine["projects"]] == [project_id]
            assert theirs.json()["totals"]["batches_created"] == 0
            assert project_id in [p["key"] for p in every.json()["projects"]]

            root = system.base_url.removesuffix("/v1")
            ready = await http.get(f"{root}/ready")
            assert ready.status_code == 200, ready.text
            assert ready.json()["ready"] is True
            await system.stop("worker:w1")
            not_ready = await http.get(f"{root}/ready")
            assert not_ready.status_code == 503
            checks = {c["name"]: c for c in not_ready.json()["checks"]}
            assert checks["nats"]["ok"] and checks["postgres"]["ok"]
            assert not checks[f"worker:{CHAT_MODEL}"]["ok"]


async def _insert_batch(conn: asyncpg.Connection, batch_id: str, key_id: str, now: int) -> None:
    await conn.execute(
        "INSERT INTO batches (id, endpoint, model, input_file_id, completion_window, status,"
        " created_at, total, api_key_id, updated_at) VALUES ($1, $2, $3, 'file-x', '24h',"
        " 'in_progress', $4, 3, $5, $4)",
        batch_id, CHAT, CHAT_MODEL, now, key_id,
    )  # fmt: skip
    await conn.executemany(
        "INSERT INTO request_results (batch_id, custom_id, line, ok, status_code, request_id,"
        " input_tokens, output_tokens, finished_at, gpu_ms) VALUES ($1, $2, $3, $4, 200, 'r',"
        " 10, 5, $5, 1500)",
        [(batch_id, f"c{i}", i, i != 2, now) for i in range(3)],
    )


async def test_usage_is_the_same_before_and_after_a_batch_is_pruned(
    api: str, database_url: str
) -> None:
    now = int(time.time())
    conn = await asyncpg.connect(database_url)
    try:
        await _insert_batch(conn, "batch_usage_a", "key_a", now)
        await _insert_batch(conn, "batch_usage_b", "key_b", now)
        org = admin_client(api)

        async def figures() -> list[tuple[Any, ...]]:
            page = await org.admin.organization.usage.completions(
                start_time=now - 30, end_time=now + 30, bucket_width="1h",
                group_by=["api_key_id"], api_key_ids=["key_a"],
            )  # fmt: skip
            return [(r.api_key_id, r.input_tokens, r.output_tokens, r.num_model_requests)
                    for b in page.data for r in b.results]  # fmt: skip

        before = await figures()
        assert before == [("key_a", 30, 15, 2)]  # the failed line is no model request
        await conn.execute("UPDATE batches SET status = 'completed', completed_at = $1", now)
        assert await prune_results(conn, ["batch_usage_a", "batch_usage_b"]) != []
        assert await conn.fetchval("SELECT count(*) FROM request_results") == 0
        assert await figures() == before
        assert await conn.fetchval("SELECT sum(gpu_ms) FROM usage_minutes") == 9000
    finally:
        await conn.close()


async def test_usage_and_costs_refuse_project_keys_and_name_bad_parameters(api: str) -> None:
    org = admin_client(api)
    _, key = await project_with_key(org, "nosy")
    nosy = openai.AsyncOpenAI(base_url=api, admin_api_key=key, max_retries=0)
    start = int(time.time()) - 3600
    for call in (
        nosy.admin.organization.usage.completions(start_time=start),
        nosy.admin.organization.usage.embeddings(start_time=start),
        nosy.admin.organization.usage.costs(start_time=start),
    ):
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await call
        assert denied.value.code == "insufficient_permissions"

    usage = org.admin.organization.usage
    for call, param in [
        (usage.completions(start_time=start, end_time=start - 1), "end_time"),
        (usage.completions(start_time=start, bucket_width="2h"), "bucket_width"),  # type: ignore[arg-type]
        (usage.costs(start_time=start, bucket_width="1h"), "bucket_width"),  # type: ignore[arg-type]
        (usage.embeddings(start_time=start, group_by=["batch"]), "group_by"),  # type: ignore[list-item]
        (usage.completions(start_time=start, limit=2000, bucket_width="1m"), "limit"),
        (usage.completions(start_time=start, page="nonsense"), "page"),
        (usage.completions(start_time=-1), "start_time"),
    ]:
        with pytest.raises(openai.BadRequestError) as bad:
            await call
        body = bad.value.body
        assert isinstance(body, dict) and body["param"] == param, body
        assert set(body) == {"message", "type", "param", "code"}

    async with httpx.AsyncClient(base_url=api, headers={"Authorization": f"Bearer {API_KEY}"}) as h:
        missing = await h.get("/organization/usage/completions")
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "start_time"


async def test_ready_lists_each_check(api: str, api_env: dict[str, str]) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.get(api.removesuffix("/v1") + "/ready")
    assert response.status_code == 503  # no worker runs here
    assert response.json()["error"]["code"] == "not_ready"
    password = urlsplit(api_env["JETBATCH_NATS_URL"].split(",")[0]).password
    assert password and password not in response.text  # the NATS URL's secret stays inside
    checks = {c["name"]: c["ok"] for c in response.json()["checks"]}
    assert checks["nats"] is True and checks["postgres"] is True
    assert [name for name, ok in checks.items() if not ok] == [
        n for n in checks if n.startswith("worker:")
    ]


async def test_synchronous_requests_show_in_usage_as_batch_false(
    database_url: str, nats_url: str, scratch_dir: Path
) -> None:
    env = lifecycle_env(database_url, nats_url, scratch_dir)
    since = int(time.time()) - 60
    async with running_system(env, start=("worker:w1",)) as system:
        client = openai.AsyncOpenAI(base_url=system.base_url, api_key=API_KEY, max_retries=5)
        for _ in range(3):
            await client.chat.completions.create(
                model=CHAT_MODEL, messages=[{"role": "user", "content": "hello there"}]
            )
    # The api wrote its sums when it stopped; an api started afresh reads them back.
    async with running_system(env) as system:
        page = await admin_client(system.base_url).admin.organization.usage.completions(
            start_time=since, group_by=["batch", "model"], batch=False
        )
    [result] = [r for bucket in page.data for r in bucket.results]
    assert (result.batch, result.model, result.num_model_requests) == (False, CHAT_MODEL, 3)
    assert result.input_tokens > 0 and result.output_tokens > 0
