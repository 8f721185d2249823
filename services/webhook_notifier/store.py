"""The webhook notifier's SQL: scheduling deliveries from events, claiming due ones, recording
attempts (tables in infra/migrations/003_webhooks.sql).

A claimed delivery is leased, not locked: its row lock lasts only the claiming transaction, and
`next_attempt_at` is pushed to the end of the lease. The HTTP attempt runs with no transaction
open; its outcome is written only if the lease is still ours (`attempts` unchanged). A notifier
killed mid-attempt leaves the row pending; once the lease is over any notifier claims it again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from schemas.projects import DEFAULT_PROJECT_ID

# The webhook_deliveries columns a new delivery is inserted with, in order.
NewDelivery = tuple[
    str,  # id
    str,  # event_id
    str,  # event_type
    str,  # batch_id
    str,  # destination
    str | None,  # endpoint_id
    str,  # url
    str,  # host
    str,  # payload
    str,  # status: pending, or dead when refused at once
    int,  # created_at
    int | None,  # dead_at
    str | None,  # last_error
    str,  # project_id: the batch's
]


@dataclass(frozen=True)
class EndpointRow:
    id: str
    url: str
    event_types: tuple[str, ...]
    project_id: str = DEFAULT_PROJECT_ID  # told only of its own project's batches


@dataclass(frozen=True)
class BatchInfo:
    """What scheduling an event needs to know of its batch."""

    project_id: str = DEFAULT_PROJECT_ID
    metadata_json: str | None = None
    # what signs its metadata.webhook_url deliveries; None on the default project until its
    # secret is rotated: the deployment's JETBATCH_WEBHOOK_SECRET then
    project_secret: str | None = None


@dataclass(frozen=True)
class Claimed:
    """A delivery leased for one attempt."""

    id: str
    event_id: str
    batch_id: str
    endpoint_id: str | None
    url: str
    host: str
    payload: str
    attempt: int  # this attempt's number (the lease token)
    cycle_attempt: int  # its number within the retry policy's cycle
    cycle_age_s: float  # seconds since the cycle started
    secrets: tuple[str, ...]  # a batch-URL delivery: its project's secret, if it has its own
    endpoint_deleted: bool
    project_id: str = DEFAULT_PROJECT_ID


async def live_endpoints(conn: asyncpg.Connection) -> list[EndpointRow]:
    rows = await conn.fetch(
        "SELECT id, url, event_types, project_id FROM webhook_endpoints WHERE deleted_at IS NULL"
    )
    return [EndpointRow(r["id"], r["url"], tuple(r["event_types"]), r["project_id"]) for r in rows]


async def batch_info(conn: asyncpg.Connection, batch_ids: Sequence[str]) -> dict[str, BatchInfo]:
    """batch id -> its project, metadata JSON and project's webhook secret."""
    rows = await conn.fetch(
        "SELECT b.id, b.project_id, b.metadata::text AS metadata, p.webhook_secret"
        " FROM batches b JOIN projects p ON p.id = b.project_id WHERE b.id = ANY($1::text[])",
        list(batch_ids),
    )
    return {r["id"]: BatchInfo(r["project_id"], r["metadata"], r["webhook_secret"]) for r in rows}


async def insert_deliveries(conn: asyncpg.Connection, rows: Sequence[NewDelivery]) -> list[str]:
    """Idempotent on (event_id, destination). Returns the batch id of each row inserted (rows
    that were there already are not)."""
    if not rows:
        return []
    columns = list(zip(*rows, strict=True))
    inserted = await conn.fetch(
        "INSERT INTO webhook_deliveries (id, event_id, event_type, batch_id, destination,"
        " endpoint_id, url, host, payload, status, created_at, updated_at, dead_at, last_error,"
        " project_id, cycle_started_at, next_attempt_at)"
        " SELECT id, event_id, event_type, batch_id, destination, endpoint_id, url, host, payload,"
        " status, created_at, created_at, dead_at, last_error, project_id, clock_timestamp(),"
        " clock_timestamp()"
        " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],"
        " $7::text[], $8::text[], $9::text[], $10::text[], $11::bigint[], $12::bigint[],"
        " $13::text[], $14::text[])"
        " AS t(id, event_id, event_type, batch_id, destination, endpoint_id, url, host, payload,"
        " status, created_at, dead_at, last_error, project_id)"
        " ON CONFLICT (event_id, destination) DO NOTHING RETURNING batch_id",
        *[list(c) for c in columns],
    )
    return [r["batch_id"] for r in inserted]


async def refresh_batches(conn: asyncpg.Connection, batch_ids: Sequence[str]) -> None:
    if batch_ids:
        await conn.execute("SELECT jetbatch_refresh_batch_webhooks($1::text[])", list(batch_ids))


async def due_candidates(
    conn: asyncpg.Connection, exclude_hosts: Sequence[str], limit: int
) -> list[asyncpg.Record]:
    """Due pending deliveries, oldest first, row-locked for this transaction; rows another
    notifier is claiming right now are skipped. Call inside a transaction."""
    return await conn.fetch(
        "SELECT d.id, d.event_id, d.batch_id, d.endpoint_id, d.url, d.host, d.payload,"
        " d.attempts, d.cycle_attempts,"
        " extract(epoch FROM clock_timestamp() - d.cycle_started_at)::float8 AS cycle_age_s,"
        " e.secret, e.deleted_at AS endpoint_deleted_at,"
        " CASE WHEN e.previous_secret_until > extract(epoch FROM now())"
        "      THEN e.previous_secret END AS previous_secret,"
        " d.project_id, p.webhook_secret AS project_secret"
        " FROM webhook_deliveries d LEFT JOIN webhook_endpoints e ON e.id = d.endpoint_id"
        " JOIN projects p ON p.id = d.project_id"
        " WHERE d.status = 'pending' AND d.next_attempt_at <= clock_timestamp()"
        " AND NOT (d.host = ANY($1::text[]))"
        " ORDER BY d.next_attempt_at LIMIT $2"
        " FOR UPDATE OF d SKIP LOCKED",
        list(exclude_hosts),
        limit,
    )


async def start_attempts(
    conn: asyncpg.Connection, rows: Sequence[asyncpg.Record], lease_s: float, now: int
) -> list[Claimed]:
    """Lease `rows` (locked by due_candidates in this transaction) for one attempt each: count
    the attempt, push next_attempt_at to the lease's end, and record the attempt as started. An
    earlier attempt still open was cut short by a notifier that died: it is closed as such."""
    if not rows:
        return []
    ids = [r["id"] for r in rows]
    await conn.execute(
        "UPDATE webhook_deliveries SET attempts = attempts + 1,"
        " cycle_attempts = cycle_attempts + 1,"
        " next_attempt_at = clock_timestamp() + make_interval(secs => $2), updated_at = $3"
        " WHERE id = ANY($1::text[])",
        ids, lease_s, now,
    )  # fmt: skip
    await conn.execute(
        "UPDATE webhook_attempts SET finished_at = clock_timestamp(),"
        " error = 'interrupted: the notifier stopped before it recorded an outcome'"
        " WHERE delivery_id = ANY($1::text[]) AND finished_at IS NULL",
        ids,
    )
    await conn.execute(
        "INSERT INTO webhook_attempts (delivery_id, attempt, started_at)"
        " SELECT id, attempt, clock_timestamp()"
        " FROM unnest($1::text[], $2::int[]) AS t(id, attempt)",
        ids, [r["attempts"] + 1 for r in rows],
    )  # fmt: skip
    await refresh_batches(conn, sorted({r["batch_id"] for r in rows}))
    claimed = []
    for r in rows:
        own = (r["secret"], r["previous_secret"]) if r["endpoint_id"] else (r["project_secret"],)
        secrets = [s for s in own if s]
        claimed.append(
            Claimed(
                id=r["id"],
                event_id=r["event_id"],
                batch_id=r["batch_id"],
                endpoint_id=r["endpoint_id"],
                url=r["url"],
                host=r["host"],
                payload=r["payload"],
                attempt=r["attempts"] + 1,
                cycle_attempt=r["cycle_attempts"] + 1,
                cycle_age_s=r["cycle_age_s"],
                secrets=tuple(secrets),
                endpoint_deleted=r["endpoint_deleted_at"] is not None,
                project_id=r["project_id"],
            )
        )
    return claimed


async def finish_attempt(
    conn: asyncpg.Connection,
    claimed: Claimed,
    *,
    status_code: int | None,
    error: str | None,
    latency_ms: int | None,
    new_status: str,
    last_error: str | None,
    retry_in_s: float,
    now: int,
) -> bool:
    """Record the attempt's outcome and the delivery's next state. Returns False when the lease
    was lost meanwhile (another notifier took the delivery over, or it was cancelled): the
    attempt is still recorded, the delivery is left to its new owner."""
    async with conn.transaction():
        await conn.execute(
            "UPDATE webhook_attempts SET finished_at = clock_timestamp(), status_code = $3,"
            " error = $4, latency_ms = $5 WHERE delivery_id = $1 AND attempt = $2",
            claimed.id, claimed.attempt, status_code, error, latency_ms,
        )  # fmt: skip
        updated = await conn.fetchval(
            "UPDATE webhook_deliveries SET status = $3::text,"
            " next_attempt_at = clock_timestamp() + make_interval(secs => $4),"
            " last_status_code = $5, last_error = $6, updated_at = $7::bigint,"
            " delivered_at = CASE WHEN $3::text = 'delivered' THEN $7::bigint END,"
            " dead_at = CASE WHEN $3::text = 'dead' THEN $7::bigint END"
            " WHERE id = $1 AND attempts = $2 AND status = 'pending' RETURNING 1",
            claimed.id, claimed.attempt, new_status, retry_in_s, status_code, last_error, now,
        )  # fmt: skip
        await refresh_batches(conn, [claimed.batch_id])
    return updated is not None


async def seconds_until_due(pool: asyncpg.Pool, exclude_hosts: Sequence[str]) -> float | None:
    """Seconds until the next pending delivery is due (<= 0: now); None when there is none."""
    value = await pool.fetchval(
        "SELECT extract(epoch FROM min(next_attempt_at) - clock_timestamp())::float8"
        " FROM webhook_deliveries WHERE status = 'pending' AND NOT (host = ANY($1::text[]))",
        list(exclude_hosts),
    )
    return None if value is None else float(value)
