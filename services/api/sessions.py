"""Admin page sessions (README: Admin page): a random token in an HttpOnly, SameSite=Strict cookie,
stored server-side as its SHA-256 with the admin key it was opened with and a CSRF token
(table `admin_sessions`, migration 011).

The session is only as alive as its key: every request looks the key up again (as auth.py does
for a bearer key), so a revoked, expired or deleted admin key, or a changed JETBATCH_API_KEY,
ends the session on its next request, on every api replica. A state-changing request made with
the cookie must carry the session's CSRF token in `X-CSRF-Token` (auth.py checks it)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

import asyncpg

COOKIE = "jetbatch_session"
CSRF_HEADER = "x-csrf-token"
TTL_S = 12 * 3600  # a session ends this long after login, whatever happens to its key
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Session:
    key_id: str | None  # None: JETBATCH_API_KEY
    csrf_token: str


def digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


async def create(
    pool: asyncpg.Pool, *, key_id: str | None, env_key: str | None, now: int
) -> tuple[str, Session]:
    """A new session for an admin key (`key_id`, or the JETBATCH_API_KEY `env_key`): (the
    cookie's token, the session). Sessions past their end are deleted on the way."""
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    env_hash = digest(env_key) if key_id is None and env_key is not None else None
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM admin_sessions WHERE expires_at <= $1", now)
        await conn.execute(
            "INSERT INTO admin_sessions (id, key_id, env_key_hash, csrf_token, created_at,"
            " expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
            digest(token), key_id, env_hash, csrf, now, now + TTL_S,
        )  # fmt: skip
    return token, Session(key_id=key_id, csrf_token=csrf)


async def lookup(pool: asyncpg.Pool, token: str, env_key: str | None, now: int) -> Session | None:
    """The live session of a cookie's token, or None. A session whose key no longer lets it in
    is deleted, so it stays dead even if the key came back."""
    if len(token) > 128:
        return None
    row = await pool.fetchrow(
        "SELECT s.key_id, s.env_key_hash, s.csrf_token, k.kind, k.revoked_at,"
        " k.expires_at AS key_expires_at FROM admin_sessions s"
        " LEFT JOIN api_keys k ON k.id = s.key_id WHERE s.id = $1 AND s.expires_at > $2",
        digest(token), now,
    )  # fmt: skip
    if row is None:
        return None
    if row["key_id"] is not None:
        alive = (
            row["kind"] == "admin"
            and row["revoked_at"] is None
            and (row["key_expires_at"] is None or row["key_expires_at"] > now)
        )
    else:
        alive = env_key is not None and hmac.compare_digest(
            bytes(row["env_key_hash"]), digest(env_key)
        )
    if not alive:
        await delete(pool, token)
        return None
    return Session(key_id=row["key_id"], csrf_token=row["csrf_token"])


async def delete(pool: asyncpg.Pool, token: str) -> bool:
    return bool(await pool.fetchval(
        "DELETE FROM admin_sessions WHERE id = $1 RETURNING true", digest(token)
    ))  # fmt: skip


def csrf_ok(session: Session, header: str | None) -> bool:
    return header is not None and hmac.compare_digest(
        header.encode("utf-8", "surrogatepass"), session.csrf_token.encode()
    )
