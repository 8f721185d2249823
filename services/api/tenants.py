"""The api's SQL for tenants: projects, service accounts, API keys (stored as hashes), rate
limits and projects' webhook secrets (infra/migrations/005_projects.sql).

A key is 256 random bits, shown once; only its SHA-256 is stored, looked up by that hash (an
index) on every request, so a revoked key is refused on the next call by every api replica.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Literal, TypeAlias

import asyncpg

from schemas.projects import DEFAULT_PROJECT_ID
from services.api.key_cache import KeyCache
from shared.domain.webhooks import new_secret
from shared.ids import new_id

Row: TypeAlias = asyncpg.Record
KeyKind = Literal["admin", "project"]
ADMIN_KEY_PREFIX = "sk-admin-"
PROJECT_KEY_PREFIX = "sk-svcacct-"
# last_used_at is written at most this often per key: not one write per request.
LAST_USED_EVERY_S = 60


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def new_key(kind: KeyKind) -> str:
    return (ADMIN_KEY_PREFIX if kind == "admin" else PROJECT_KEY_PREFIX) + secrets.token_urlsafe(32)


def redact(key: str) -> str:
    prefix = ADMIN_KEY_PREFIX if key.startswith(ADMIN_KEY_PREFIX) else PROJECT_KEY_PREFIX
    return f"{prefix}...{key[-4:]}"


def expiry(now: int, expires_in_s: int | None) -> int | None:
    return None if expires_in_s is None else now + expires_in_s


async def _page(
    conn: asyncpg.Pool | asyncpg.Connection,
    table: str,
    where: str,
    args: list[object],
    *,
    limit: int,
    after: str | None,
    order: Literal["asc", "desc"] = "desc",
) -> tuple[list[Row], bool] | None:
    """One page of `table` (keyset on seq) whose rows match `where` ($1.. = args). None when
    `after` names no row of that set."""
    n = len(args)
    cursor = None
    if after is not None:
        cursor = await conn.fetchval(
            f"SELECT seq FROM {table} WHERE id = ${n + 1} AND {where}", *args, after
        )
        if cursor is None:
            return None
    cmp, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
    rows = await conn.fetch(
        f"SELECT * FROM {table} WHERE {where}"
        f" AND (${n + 1}::bigint IS NULL OR seq {cmp} ${n + 1}) ORDER BY seq {direction}"
        f" LIMIT ${n + 2}",
        *args, cursor, limit + 1,
    )  # fmt: skip
    return rows[:limit], len(rows) > limit


# Authentication ------------------------------------------------------------------------------


async def lookup_key(
    pool: asyncpg.Pool, key: str, now: int, cache: KeyCache | None = None
) -> Row | None:
    """The live key (not revoked, not expired, its project not archived) whose hash is `key`'s,
    from `cache` when it has it; its last_used_at is brought up to date (at most once a minute)."""
    digest = hash_key(key)
    row = None if cache is None else cache.get(digest, now)
    if row is None:
        generation = 0 if cache is None else cache.generation
        row = await pool.fetchrow(
            "SELECT k.id, k.kind, k.project_id, k.hash, k.last_used_at, k.expires_at"
            " FROM api_keys k LEFT JOIN projects p ON p.id = k.project_id"
            " WHERE k.hash = $1 AND k.revoked_at IS NULL"
            " AND (k.expires_at IS NULL OR k.expires_at > $2) AND p.archived_at IS NULL",
            digest, now,
        )  # fmt: skip
        if row is None or not hmac.compare_digest(bytes(row["hash"]), digest):
            return None
        if cache is not None:
            cache.put(digest, row, generation)
    last = row["last_used_at"] if cache is None else cache.last_used(digest, row["last_used_at"])
    if last is None or last < now - LAST_USED_EVERY_S:
        await pool.execute("UPDATE api_keys SET last_used_at = $2 WHERE id = $1", row["id"], now)
        if cache is not None:
            cache.used(digest, now)
    return row


async def any_keys(pool: asyncpg.Pool) -> bool:
    """Whether a key was ever created (a revoked one too: revoking every key must not open the
    api to everyone)."""
    return bool(await pool.fetchval("SELECT EXISTS (SELECT 1 FROM api_keys)"))


async def insert_key(
    conn: asyncpg.Pool | asyncpg.Connection,
    *,
    kind: KeyKind,
    name: str,
    now: int,
    expires_at: int | None,
    project_id: str | None = None,
    service_account_id: str | None = None,
) -> tuple[Row, str]:
    """A new key: (its row, its value, which is never stored)."""
    value = new_key(kind)
    row = await conn.fetchrow(
        "INSERT INTO api_keys (id, kind, project_id, service_account_id, name, hash,"
        " redacted_value, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        " RETURNING *",
        new_id("key_"), kind, project_id, service_account_id, name, hash_key(value),
        redact(value), now, expires_at,
    )  # fmt: skip
    assert row is not None
    return row, value


# Admin keys ----------------------------------------------------------------------------------

_LIVE_ADMIN = "kind = 'admin' AND revoked_at IS NULL"


async def list_admin_keys(
    pool: asyncpg.Pool, *, limit: int, after: str | None, order: Literal["asc", "desc"]
) -> tuple[list[Row], bool] | None:
    return await _page(pool, "api_keys", _LIVE_ADMIN, [], limit=limit, after=after, order=order)


async def get_admin_key(pool: asyncpg.Pool, key_id: str) -> Row | None:
    return await pool.fetchrow(f"SELECT * FROM api_keys WHERE id = $1 AND {_LIVE_ADMIN}", key_id)


async def revoke_key(
    pool: asyncpg.Pool, key_id: str, now: int, *, kind: KeyKind, project_id: str | None = None
) -> bool:
    revoked = await pool.fetchval(
        "UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND kind = $3"
        " AND ($4::text IS NULL OR project_id = $4) AND revoked_at IS NULL RETURNING id",
        key_id, now, kind, project_id,
    )  # fmt: skip
    return revoked is not None


# Projects ------------------------------------------------------------------------------------


async def create_project(pool: asyncpg.Pool, name: str, now: int) -> Row:
    row = await pool.fetchrow(
        "INSERT INTO projects (id, name, created_at, webhook_secret, webhook_secret_updated_at)"
        " VALUES ($1, $2, $3, $4, $3) RETURNING *",
        new_id("proj_"), name, now, new_secret(),
    )  # fmt: skip
    assert row is not None
    return row


async def get_project(pool: asyncpg.Pool | asyncpg.Connection, project_id: str) -> Row | None:
    return await pool.fetchrow("SELECT * FROM projects WHERE id = $1", project_id)


async def list_projects(
    pool: asyncpg.Pool, *, limit: int, after: str | None, include_archived: bool
) -> tuple[list[Row], bool] | None:
    where = "TRUE" if include_archived else "archived_at IS NULL"
    return await _page(pool, "projects", where, [], limit=limit, after=after, order="asc")


async def rename_project(pool: asyncpg.Pool, project_id: str, name: str) -> Row | None:
    return await pool.fetchrow(
        "UPDATE projects SET name = $2 WHERE id = $1 RETURNING *", project_id, name
    )


async def set_max_batch_priority(pool: asyncpg.Pool, project_id: str, value: int) -> Row | None:
    return await pool.fetchrow(
        "UPDATE projects SET max_batch_priority = $2 WHERE id = $1 RETURNING *", project_id, value
    )


async def set_share(pool: asyncpg.Pool, project_id: str, share: float) -> Row | None:
    return await pool.fetchrow(
        "UPDATE projects SET share = $2 WHERE id = $1 RETURNING *", project_id, share
    )


async def archive_project(pool: asyncpg.Pool, project_id: str, now: int) -> Row | None:
    """Archived: its keys are revoked at once; its open batches run to their end."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "UPDATE projects SET archived_at = coalesce(archived_at, $2) WHERE id = $1"
            " RETURNING *",
            project_id, now,
        )  # fmt: skip
        if row is not None:
            await conn.execute(
                "UPDATE api_keys SET revoked_at = $2 WHERE project_id = $1 AND revoked_at IS NULL",
                project_id, now,
            )  # fmt: skip
    return row


async def rotate_webhook_secret(pool: asyncpg.Pool, project_id: str, now: int) -> Row | None:
    return await pool.fetchrow(
        "UPDATE projects SET webhook_secret = $2, webhook_secret_updated_at = $3 WHERE id = $1"
        " RETURNING *",
        project_id, new_secret(), now,
    )  # fmt: skip


# Service accounts and project keys ----------------------------------------------------------


async def create_service_account(
    pool: asyncpg.Pool,
    project_id: str,
    name: str,
    now: int,
    *,
    with_key: bool,
    expires_at: int | None,
) -> tuple[Row, Row | None, str | None]:
    """(the account, its first key's row and value, or None twice without a key)."""
    async with pool.acquire() as conn, conn.transaction():
        account = await conn.fetchrow(
            "INSERT INTO service_accounts (id, project_id, name, role, created_at)"
            " VALUES ($1, $2, $3, $4, $5) RETURNING *",
            new_id("svc_acct_"), project_id, name, "member" if with_key else "none", now,
        )  # fmt: skip
        assert account is not None
        if not with_key:
            return account, None, None
        key, value = await insert_key(
            conn, kind="project", name="Secret key", now=now, expires_at=expires_at,
            project_id=project_id, service_account_id=account["id"],
        )  # fmt: skip
    return account, key, value


_LIVE_ACCOUNT = "project_id = $1 AND deleted_at IS NULL"


async def list_service_accounts(
    pool: asyncpg.Pool, project_id: str, *, limit: int, after: str | None
) -> tuple[list[Row], bool] | None:
    return await _page(
        pool, "service_accounts", _LIVE_ACCOUNT, [project_id], limit=limit, after=after
    )


async def get_service_account(pool: asyncpg.Pool, project_id: str, account_id: str) -> Row | None:
    return await pool.fetchrow(
        f"SELECT * FROM service_accounts WHERE {_LIVE_ACCOUNT} AND id = $2", project_id, account_id
    )


async def update_service_account(
    pool: asyncpg.Pool, project_id: str, account_id: str, name: str | None, role: str | None
) -> Row | None:
    return await pool.fetchrow(
        "UPDATE service_accounts SET name = coalesce($3, name), role = coalesce($4, role)"
        f" WHERE {_LIVE_ACCOUNT} AND id = $2 RETURNING *",
        project_id, account_id, name, role,
    )  # fmt: skip


async def delete_service_account(
    pool: asyncpg.Pool, project_id: str, account_id: str, now: int
) -> bool:
    """The account goes, and its keys are revoked with it."""
    async with pool.acquire() as conn, conn.transaction():
        deleted = await conn.fetchval(
            f"UPDATE service_accounts SET deleted_at = $3 WHERE {_LIVE_ACCOUNT} AND id = $2"
            " RETURNING id",
            project_id, account_id, now,
        )  # fmt: skip
        if deleted is not None:
            await conn.execute(
                "UPDATE api_keys SET revoked_at = $2"
                " WHERE service_account_id = $1 AND revoked_at IS NULL",
                account_id, now,
            )  # fmt: skip
    return deleted is not None


_PROJECT_KEY_COLUMNS = (
    "k.*, a.name AS owner_name, a.created_at AS owner_created_at, a.role AS owner_role"
)


async def list_project_keys(
    pool: asyncpg.Pool, project_id: str, *, limit: int, after: str | None
) -> tuple[list[Row], bool] | None:
    cursor = None
    if after is not None:
        cursor = await pool.fetchval(
            "SELECT seq FROM api_keys WHERE id = $1 AND project_id = $2", after, project_id
        )
        if cursor is None:
            return None
    rows = await pool.fetch(
        f"SELECT {_PROJECT_KEY_COLUMNS} FROM api_keys k"
        " JOIN service_accounts a ON a.id = k.service_account_id"
        " WHERE k.project_id = $1 AND k.revoked_at IS NULL"
        " AND ($2::bigint IS NULL OR k.seq < $2) ORDER BY k.seq DESC LIMIT $3",
        project_id, cursor, limit + 1,
    )  # fmt: skip
    return rows[:limit], len(rows) > limit


async def get_project_key(pool: asyncpg.Pool, project_id: str, key_id: str) -> Row | None:
    return await pool.fetchrow(
        f"SELECT {_PROJECT_KEY_COLUMNS} FROM api_keys k"
        " JOIN service_accounts a ON a.id = k.service_account_id"
        " WHERE k.project_id = $1 AND k.id = $2 AND k.revoked_at IS NULL",
        project_id, key_id,
    )  # fmt: skip


# Rate limits ---------------------------------------------------------------------------------


async def rate_limits(pool: asyncpg.Pool, project_id: str) -> dict[str, Row]:
    rows = await pool.fetch("SELECT * FROM project_rate_limits WHERE project_id = $1", project_id)
    return {r["model"]: r for r in rows}


async def update_rate_limit(
    pool: asyncpg.Pool, project_id: str, model: str, values: dict[str, int]
) -> None:
    """Set the given fields of the project's limits for `model` (the others are kept)."""
    columns = list(values)
    marks = ", ".join(f"${i + 3}" for i in range(len(columns)))
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns) or "model = EXCLUDED.model"
    names = "".join(f", {c}" for c in columns)
    await pool.execute(
        f"INSERT INTO project_rate_limits (project_id, model{names})"
        f" VALUES ($1, $2{', ' + marks if marks else ''})"
        f" ON CONFLICT (project_id, model) DO UPDATE SET {updates}",
        project_id, model, *values.values(),
    )  # fmt: skip


def is_default(project_id: str) -> bool:
    return project_id == DEFAULT_PROJECT_ID
