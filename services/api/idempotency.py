"""`Idempotency-Key` on `POST /v1/files` and `POST /v1/batches` (README: Idempotency).

The same key from the same project within KEEP_S gets the first request's response again
(status and body), nothing created twice, whichever api replica answers: the key is claimed in
PostgreSQL (table `idempotency_keys`) before the work starts, and the response stored when it
ends. A request that finds its key claimed by one still running waits for it up to WAIT_S, then
gets a 409 `idempotency_in_progress`. A request whose body differs from the first one's
(a different hash) gets a 400 `idempotency_key_reused`. A first request that fails (any error)
gives its key back, so its retry runs again; one whose api died mid-way holds it for
ABANDONED_S. The watchdog deletes keys older than KEEP_S.

A batch request is hashed from its decoded body. An upload streams, so its hash (file name,
purpose, size and the content's SHA-256, computed as it streams) is known only at its end: a
retried upload is read (hashed, not stored) and compared before the first response is given."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import msgspec
from litestar import Request, Response

from shared.errors import Conflict, InvalidRequest

log = logging.getLogger(__name__)

HEADER = "idempotency-key"
KEEP_S = 86_400
WAIT_S = 30.0
POLL_S = 0.2
ABANDONED_S = 900
MAX_KEY_CHARS = 255

_encoder = msgspec.json.Encoder()


def key_of(request: Request[Any, Any, Any]) -> str | None:
    key = request.headers.get(HEADER)
    if key is None:
        return None
    if not key or len(key) > MAX_KEY_CHARS or not key.isprintable():
        raise InvalidRequest(
            f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} printable characters",
            param="Idempotency-Key",
            code="invalid_idempotency_key",
        )
    return key


def hash_of(*parts: object) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else str(part).encode())
        digest.update(b"\x00")
    return digest.hexdigest()


def _reused(key: str) -> InvalidRequest:
    return InvalidRequest(
        f"Idempotency-Key {key!r} was used for a different request; use a new key",
        param="Idempotency-Key",
        code="idempotency_key_reused",
    )


def _replay(row: asyncpg.Record) -> Response[bytes]:
    return Response(
        content=bytes(row["response_body"]),
        status_code=row["response_status"],
        media_type="application/json",
        headers={"Idempotent-Replayed": "true"},
    )


async def _claim(
    pool: asyncpg.Pool, project: str, key: str, route: str, req_hash: str | None
) -> bool:
    now = int(time.time())
    claimed = await pool.fetchval(
        """INSERT INTO idempotency_keys (project_id, key, route, request_hash, created_at)
           VALUES ($1, $2, $3, $4, $5) ON CONFLICT (project_id, key) DO UPDATE
             SET route = EXCLUDED.route, request_hash = EXCLUDED.request_hash,
                 created_at = EXCLUDED.created_at
             WHERE idempotency_keys.response_status IS NULL
               AND idempotency_keys.created_at < $6
                OR idempotency_keys.created_at < $7
           RETURNING true""",
        project, key, route, req_hash, now, now - ABANDONED_S, now - KEEP_S,
    )  # fmt: skip
    return bool(claimed)


async def _existing(
    pool: asyncpg.Pool, project: str, key: str, route: str, req_hash: str | None
) -> asyncpg.Record:
    """The first request's row once it has a response (waiting for it up to WAIT_S)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        row = await pool.fetchrow(
            "SELECT * FROM idempotency_keys WHERE project_id = $1 AND key = $2", project, key
        )
        if row is None:  # the first request failed and gave the key back
            raise Conflict(
                f"the request with Idempotency-Key {key!r} failed; retry it",
                param="Idempotency-Key",
                code="idempotency_in_progress",
            )
        if row["route"] != route:
            raise _reused(key)
        if req_hash is not None and row["request_hash"] not in (None, req_hash):
            raise _reused(key)
        if row["response_status"] is not None:
            return row
        if time.monotonic() >= deadline:
            raise Conflict(
                f"a request with Idempotency-Key {key!r} is still being processed; retry later",
                param="Idempotency-Key",
                code="idempotency_in_progress",
            )
        await asyncio.sleep(POLL_S)


async def once(
    pool: asyncpg.Pool,
    project: str,
    key: str | None,
    route: str,
    req_hash: str | None,
    run: Callable[[], Awaitable[tuple[Any, str | None]]],
    rehash: Callable[[], Awaitable[str]] | None = None,
) -> Any:
    """`run()` (-> (response struct, its request's hash when only known at the end)) once per
    (project, key). A repeat gets the stored response; `rehash()` reads a repeated request
    whose hash is known only from its body (an upload) to compare it."""
    if key is None:
        return (await run())[0]
    if not await _claim(pool, project, key, route, req_hash):
        if req_hash is None and rehash is not None:
            req_hash = await rehash()
        row = await _existing(pool, project, key, route, req_hash)
        log.info("idempotent repeat of %s (key %r): first response given", route, key)
        return _replay(row)
    try:
        result, late_hash = await run()
    except BaseException:  # nothing was created: the key is free for the retry
        await _give_back(pool, project, key)
        raise
    await pool.execute(
        """UPDATE idempotency_keys SET response_status = 200, response_body = $3,
             request_hash = COALESCE(request_hash, $4)
           WHERE project_id = $1 AND key = $2""",
        project, key, _encoder.encode(result), late_hash,
    )  # fmt: skip
    return result


async def _give_back(pool: asyncpg.Pool, project: str, key: str) -> None:
    try:
        await asyncio.shield(
            pool.execute(
                "DELETE FROM idempotency_keys WHERE project_id = $1 AND key = $2 "
                "AND response_status IS NULL",
                project,
                key,
            )  # fmt: skip
        )
    except Exception as e:  # held until ABANDONED_S
        log.warning("idempotency key %r not given back: %r", key, e)
