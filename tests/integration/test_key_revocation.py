"""API keys are read from PostgreSQL once and served from the api's cache after that, and a
key's end is heard at once, however it is made (services/api/key_cache.py, migration 015); on a
real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from services.api import tenants
from services.api.key_cache import KeyCache

NOW = int(time.time())


@contextlib.asynccontextmanager
async def listening(database_url: str) -> AsyncIterator[KeyCache]:
    cache, stop = KeyCache(), asyncio.Event()
    task = asyncio.create_task(cache.listen(database_url, stop))
    deadline = time.monotonic() + 10
    while not cache.live:
        assert time.monotonic() < deadline, "the key cache never listened"
        await asyncio.sleep(0.01)
    try:
        yield cache
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert not cache.live


@contextlib.asynccontextmanager
async def project_key(database_url: str, name: str) -> AsyncIterator[tuple[asyncpg.Pool, Any, str]]:
    """A pool, and a new project's key: (pool, the key's row, its value)."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    assert pool is not None
    try:
        project = await tenants.create_project(pool, name, NOW)
        key, value = await tenants.insert_key(
            pool, kind="project", name="k", now=NOW, expires_at=None, project_id=project["id"]
        )
        yield pool, key, value
    finally:
        await pool.close()


async def eventually_refused(pool: asyncpg.Pool, value: str, cache: KeyCache) -> float:
    """Seconds until the key is no longer served (the notification, not the cache's age)."""
    started = time.monotonic()
    while await tenants.lookup_key(pool, value, NOW, cache) is not None:
        assert time.monotonic() - started < 3, "the key's end was not heard"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_a_cached_key_costs_no_query_and_its_revocation_ends_it_at_once(
    database_url: str,
) -> None:
    async with (
        project_key(database_url, "cached") as (pool, key, value),
        listening(database_url) as cache,
    ):
        assert (await tenants.lookup_key(pool, value, NOW, cache))["id"] == key["id"]
        assert len(cache) == 1
        # Revoked unseen (triggers off for this session): the cache still serves the key,
        # so it was not read again; PostgreSQL alone refuses it.
        async with pool.acquire() as conn:
            await conn.execute("SET session_replication_role = replica")
            await conn.execute("UPDATE api_keys SET revoked_at = $2 WHERE id = $1", key["id"], NOW)
            await conn.execute("RESET session_replication_role")
        assert (await tenants.lookup_key(pool, value, NOW, cache))["id"] == key["id"]
        assert await tenants.lookup_key(pool, value, NOW) is None
        # Any change that ends a key is heard, whoever makes it: plain SQL here.
        await pool.execute("UPDATE api_keys SET revoked_at = NULL WHERE id = $1", key["id"])
        await eventually_refused(pool, "not-a-key", cache)  # (a miss is never cached)
        assert await tenants.lookup_key(pool, value, NOW, cache) is not None
        await pool.execute("UPDATE api_keys SET revoked_at = $2 WHERE id = $1", key["id"], NOW)
        assert await eventually_refused(pool, value, cache) < 1


@pytest.mark.parametrize("end", ["archive", "expire"])
async def test_archiving_its_project_or_expiring_it_ends_a_cached_key(
    database_url: str, end: str
) -> None:
    async with (
        project_key(database_url, end) as (pool, key, value),
        listening(database_url) as cache,
    ):
        assert await tenants.lookup_key(pool, value, NOW, cache) is not None
        if end == "archive":
            await tenants.archive_project(pool, key["project_id"], NOW)
        else:
            await pool.execute(
                "UPDATE api_keys SET expires_at = $2 WHERE id = $1", key["id"], NOW - 1
            )
        assert await eventually_refused(pool, value, cache) < 1


async def test_recording_a_key_as_used_is_no_change_and_drops_nothing(database_url: str) -> None:
    async with (
        project_key(database_url, "used") as (pool, key, value),
        listening(database_url) as cache,
    ):
        await tenants.lookup_key(pool, value, NOW, cache)  # records last_used_at
        generation = cache.generation
        await asyncio.sleep(0.3)  # a notification would have come by now
        assert cache.generation == generation and len(cache) == 1
        used = await pool.fetchval("SELECT last_used_at FROM api_keys WHERE id = $1", key["id"])
        assert used == NOW
