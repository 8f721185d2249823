"""OpenAI's request and token rate limits of synchronous requests (README: Limits), per project
and model: set through the SDK's admin client, counted in PostgreSQL so that every api replica
counts against the same figures, refused with OpenAI's 429 `rate_limit_exceeded`, `retry-after`
and `x-ratelimit-*` headers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import openai
import pytest

from schemas.projects import DEFAULT_PROJECT_ID
from services.api.rate_limits import RateLimiter, estimate_tokens
from services.watchdog import store as watchdog_store
from shared.errors import RateLimited
from tests.helpers import API_KEY, CHAT_MODEL, admin_client, chat_body, project_with_key, wait_until
from tests.lifecycle_helpers import lifecycle_env, running_system

MINUTE = 1_800_000_000  # a minute's start, unix seconds


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    yield p
    await p.close()


async def limit(pool: asyncpg.Pool, project: str, **values: int) -> None:
    columns = ", ".join(values)
    marks = ", ".join(f"${i + 3}" for i in range(len(values)))
    await pool.execute(
        f"INSERT INTO project_rate_limits (project_id, model, {columns}) VALUES ($1, $2, {marks})",
        project, CHAT_MODEL, *values.values(),
    )  # fmt: skip


async def refused(limiter: RateLimiter, tokens: int, now: float) -> RateLimited:
    with pytest.raises(RateLimited) as raised:
        await limiter.admit(DEFAULT_PROJECT_ID, CHAT_MODEL, tokens, now)
    return raised.value


async def test_two_replicas_share_the_minute_and_a_refused_request_is_not_counted(
    pool: asyncpg.Pool,
) -> None:
    await limit(pool, DEFAULT_PROJECT_ID, max_requests_per_1_minute=3, max_tokens_per_1_minute=100)
    one, two = RateLimiter(pool), RateLimiter(pool)  # two api replicas
    headers = await one.admit(DEFAULT_PROJECT_ID, CHAT_MODEL, 40, MINUTE + 1)
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert headers["x-ratelimit-remaining-requests"] == "2"
    assert headers["x-ratelimit-remaining-tokens"] == "60"
    assert headers["x-ratelimit-reset-requests"] == "59s"
    await two.admit(DEFAULT_PROJECT_ID, CHAT_MODEL, 40, MINUTE + 2)
    tokens = await refused(one, 40, MINUTE + 3)  # 120 tokens > 100
    assert tokens.code == "rate_limit_exceeded" and "tokens per min (TPM)" in tokens.message
    assert "Limit 100, Used 80, Requested 40" in tokens.message
    assert tokens.headers["retry-after"] == "57"
    await two.admit(DEFAULT_PROJECT_ID, CHAT_MODEL, 20, MINUTE + 4)  # the refused one: uncounted
    requests = await refused(two, 0, MINUTE + 5)  # a 4th request
    assert "requests per min (RPM): Limit 3, Used 3" in requests.message
    assert requests.headers["x-ratelimit-remaining-requests"] == "0"
    # The next minute starts afresh.
    await one.admit(DEFAULT_PROJECT_ID, CHAT_MODEL, 100, MINUTE + 60)
    too_large = await refused(one, 101, MINUTE + 61)
    assert too_large.message.startswith(f"Request too large for {CHAT_MODEL}")


async def test_the_day_limit_and_projects_without_limits(pool: asyncpg.Pool) -> None:
    await limit(pool, DEFAULT_PROJECT_ID, max_requests_per_1_day=2)
    limiter = RateLimiter(pool)
    for minute in range(2):
        await limiter.admit(DEFAULT_PROJECT_ID, CHAT_MODEL, 10**9, MINUTE + 60 * minute)
    day = await refused(limiter, 1, MINUTE + 3600)
    assert "requests per day (RPD)" in day.message
    # Another model, another project: no limit, nothing written.
    assert await limiter.admit(DEFAULT_PROJECT_ID, "other-model", 10**9, MINUTE) == {}
    assert await limiter.admit("proj_other", CHAT_MODEL, 10**9, MINUTE) == {}
    assert await pool.fetchval("SELECT count(*) FROM rate_usage") == 1
    # The watchdog forgets windows that ended more than a day ago.
    async with pool.acquire() as conn:
        assert await watchdog_store.forget_old_rate_windows(conn, MINUTE + 3 * 86_400) == 1


def test_what_a_request_may_cost() -> None:
    assert estimate_tokens(b"x" * 41, None) == 11
    assert estimate_tokens(b"x" * 40, 100) == 110
    assert estimate_tokens(b"", True) == 0 and estimate_tokens(b"", "9") == 0


async def test_through_the_sdk_a_projects_limit_is_its_own(
    database_url: str, nats_url: str, scratch_dir: Path
) -> None:
    env = lifecycle_env(database_url, nats_url, scratch_dir)
    async with running_system(env, start=("worker:w1",)) as system:
        org = admin_client(system.base_url)
        project, key = await project_with_key(org, "limited")
        await org.admin.organization.projects.rate_limits.update_rate_limit(
            f"rl-{CHAT_MODEL}", project_id=project, max_requests_per_1_minute=2
        )
        async with (
            httpx.AsyncClient(
                base_url=system.base_url, headers={"Authorization": f"Bearer {key}"}
            ) as limited,
            httpx.AsyncClient(
                base_url=system.base_url, headers={"Authorization": f"Bearer {API_KEY}"}
            ) as other,
        ):

            async def answered() -> httpx.Response | None:  # once the worker is there
                response = await other.post("/chat/completions", json=chat_body("hi"))
                return response if response.status_code == 200 else None

            await wait_until(answered, "the worker to answer")
            for _ in range(2):
                ok = await limited.post("/chat/completions", json=chat_body("hi"))
                assert ok.status_code == 200, ok.text
            assert ok.headers["x-ratelimit-remaining-requests"] == "0"
            over = await limited.post("/chat/completions", json=chat_body("hi"))
            assert over.status_code == 429
            assert over.json()["error"]["code"] == "rate_limit_exceeded"
            assert 1 <= int(over.headers["retry-after"]) <= 60
            # The default project has no limit: its requests go on.
            assert (await other.post("/chat/completions", json=chat_body("hi"))).status_code == 200
            sdk = openai.AsyncOpenAI(base_url=system.base_url, api_key=key, max_retries=0)
            with pytest.raises(openai.RateLimitError):
                await sdk.chat.completions.create(
                    model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}]
                )
