"""PostgreSQL: connection pool and idempotent migrations from infra/migrations."""

from __future__ import annotations

import logging
from pathlib import Path

import asyncpg

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "infra" / "migrations"
# Serialises concurrent `migrate` runs (several services may start at once).
_MIGRATION_LOCK_KEY = 0x6A657462  # "jetb"
# A batch's claim (services/api/store.claim, services/api/dispatcher.py): the advisory lock
# (BATCH_CLAIM_NS, hashtext(batch_id)), held by the api process working on the batch.
BATCH_CLAIM_NS = 0x6A62636C  # "jbcl"


async def connect_pool(database_url: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        database_url, min_size=min_size, max_size=max_size, command_timeout=120
    )
    assert pool is not None
    return pool


async def migrate(database_url: str) -> list[str]:
    """Apply every migration not applied yet, in file-name order. Returns the ones applied."""
    conn = await asyncpg.connect(database_url)
    applied: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_KEY)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
            if path.stem in done:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", path.stem)
            applied.append(path.stem)
            log.info("applied migration %s", path.stem)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK_KEY)
        await conn.close()
    return applied
