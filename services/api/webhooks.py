"""Webhook administration (README: Webhooks), behind the same keys as the rest of `/v1`.

Endpoints and deliveries belong to a project: a project key sees and changes only its own
project's, an endpoint is told only of its project's batches (services/webhook_notifier).

`/v1/webhook_endpoints`: OpenAI's own webhook-endpoint API (create, list, retrieve, update,
delete, rotate_secret), so the official SDK's `client.webhooks.create(url=..., event_types=[...],
name=...)` registers a destination. jetbatch additions: `secret` on create (bring your own
`whsec_...`), and `event_types` defaults to every batch event.

`/v1/webhook_deliveries` (jetbatch extension): the delivery log, one delivery per (event,
destination) with its attempts; `?status=dead` lists the dead letters, and
`POST /v1/webhook_deliveries/{id}/resend` gives one a new round of attempts.

The webhook notifier does the sending; these routes only read and write the tables it works from
(infra/migrations/003_webhooks.sql).
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

import asyncpg
from litestar import delete, get, post
from litestar.params import Parameter

from schemas.webhooks import (
    WEBHOOK_EVENT_TYPES,
    CreateWebhookEndpointRequest,
    DeletedWebhookEndpoint,
    RotateSecretRequest,
    UpdateWebhookEndpointRequest,
    WebhookAttempt,
    WebhookDelivery,
    WebhookDeliveryList,
    WebhookEndpoint,
    WebhookEndpointList,
    WebhookEndpointWithSecret,
)
from services.api.auth import CallerParam
from services.api.deps import DepsParam
from services.api.pages import list_page
from services.api.store import now_s
from shared.config import ConfigError
from shared.config_sections import check_webhook_secret
from shared.domain.webhooks import UnsafeUrl, check_url, host_key, new_secret, secret_hint
from shared.errors import Conflict, InvalidRequest, NotFound
from shared.ids import new_id

log = logging.getLogger(__name__)

OLD_SECRET_GRACE_S = 24 * 3600
# Every row belongs to a project; $2 is the caller's scope (None: an admin sees every project's).
_IN_PROJECT = "($2::text IS NULL OR project_id = $2)"
DeliveryFilter = Literal["pending", "delivered", "dead", "cancelled"]


# Checks --------------------------------------------------------------------------------------


async def check_destination(url: str, allowed: tuple[str, ...]) -> str:
    """The URL the notifier will be allowed to send to, or a 400 that says why not."""
    try:
        await check_url(url, allowed)
    except UnsafeUrl as e:
        raise InvalidRequest(str(e), param="url", code="invalid_url") from None
    except (OSError, TimeoutError) as e:
        raise InvalidRequest(
            f"could not resolve the host of {url!r}: {e}", param="url", code="invalid_url"
        ) from None
    return url


def check_event_types(event_types: list[str]) -> list[str]:
    if not event_types:
        raise InvalidRequest("event_types must name at least one event type", param="event_types")
    unknown = [t for t in event_types if t not in WEBHOOK_EVENT_TYPES]
    if unknown:
        raise InvalidRequest(
            f"unsupported event type(s) {', '.join(map(repr, unknown))}; jetbatch sends "
            f"{', '.join(WEBHOOK_EVENT_TYPES)}",
            param="event_types",
        )
    return list(dict.fromkeys(event_types))


def endpoint_not_found(endpoint_id: str) -> NotFound:
    return NotFound(f"No such webhook endpoint: {endpoint_id}", param="webhook_endpoint_id")


def delivery_not_found(delivery_id: str) -> NotFound:
    return NotFound(f"No such webhook delivery: {delivery_id}", param="delivery_id")


# Rows -> objects -----------------------------------------------------------------------------


def endpoint_from_row(row: asyncpg.Record) -> WebhookEndpoint:
    return WebhookEndpoint(
        id=row["id"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        event_types=list(row["event_types"]),
        name=row["name"],
        url=row["url"],
        signing_secret_hint=secret_hint(row["secret"]),
    )


def with_secret(row: asyncpg.Record) -> WebhookEndpointWithSecret:
    endpoint = endpoint_from_row(row)
    return WebhookEndpointWithSecret(
        id=endpoint.id,
        created_at=endpoint.created_at,
        updated_at=endpoint.updated_at,
        event_types=endpoint.event_types,
        name=endpoint.name,
        url=endpoint.url,
        signing_secret_hint=endpoint.signing_secret_hint,
        signing_secret=row["secret"],
    )


_DELIVERY_COLUMNS = (
    "id, event_id, event_type, batch_id, endpoint_id, url, status, attempts, created_at,"
    " CASE WHEN status = 'pending' THEN extract(epoch FROM next_attempt_at)::float8 END"
    " AS next_attempt_at, delivered_at, dead_at, last_status_code, last_error"
)


def delivery_from_row(
    row: asyncpg.Record, attempts: list[asyncpg.Record] | None = None
) -> WebhookDelivery:
    return WebhookDelivery(
        id=row["id"],
        event_id=row["event_id"],
        event_type=row["event_type"],
        batch_id=row["batch_id"],
        endpoint_id=row["endpoint_id"],
        url=row["url"],
        status=row["status"],
        attempts=row["attempts"],
        created_at=row["created_at"],
        next_attempt_at=row["next_attempt_at"],
        delivered_at=row["delivered_at"],
        dead_at=row["dead_at"],
        last_status_code=row["last_status_code"],
        last_error=row["last_error"],
        attempt_log=None
        if attempts is None
        else [
            WebhookAttempt(
                attempt=a["attempt"],
                started_at=a["started_at"],
                status_code=a["status_code"],
                error=a["error"],
                latency_ms=a["latency_ms"],
            )
            for a in attempts
        ],
    )


# Endpoints -----------------------------------------------------------------------------------


@post("/webhook_endpoints", status_code=200)
async def create_endpoint(
    data: CreateWebhookEndpointRequest, deps: DepsParam, caller: CallerParam
) -> WebhookEndpointWithSecret:
    url = await check_destination(data.url, deps.settings.webhooks.allowed_networks)
    event_types = check_event_types(data.event_types)
    if data.secret is None:
        secret = new_secret()
    else:
        try:
            secret = check_webhook_secret("secret", data.secret)
        except ConfigError as e:
            raise InvalidRequest(str(e), param="secret") from None
    now = now_s()
    row = await deps.pool.fetchrow(
        "INSERT INTO webhook_endpoints (id, name, url, secret, event_types, created_at,"
        " updated_at, project_id) VALUES ($1, $2, $3, $4, $5, $6, $6, $7) RETURNING *",
        new_id("we_"), data.name, url, secret, event_types, now, caller.project_id,
    )  # fmt: skip
    assert row is not None
    log.info("webhook endpoint %s registered: %s for %s", row["id"], url, ", ".join(event_types))
    return with_secret(row)


@get("/webhook_endpoints")
async def list_endpoints(
    deps: DepsParam,
    caller: CallerParam,
    limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
    after: str | None = None,
) -> WebhookEndpointList:
    cursor: int | None = None
    if after:
        cursor = await deps.pool.fetchval(
            f"SELECT seq FROM webhook_endpoints WHERE id = $1 AND {_IN_PROJECT}",
            after, caller.scope,
        )  # fmt: skip
        if cursor is None:
            raise NotFound(f"No such webhook endpoint: {after}", param="after")
    rows = await deps.pool.fetch(
        "SELECT * FROM webhook_endpoints WHERE deleted_at IS NULL"
        " AND ($1::bigint IS NULL OR seq < $1) AND ($3::text IS NULL OR project_id = $3)"
        " ORDER BY seq DESC LIMIT $2",
        cursor, limit + 1, caller.scope,
    )  # fmt: skip
    data = [endpoint_from_row(r) for r in rows[:limit]]
    return list_page(WebhookEndpointList, data, len(rows) > limit)


async def _live_endpoint(deps: DepsParam, endpoint_id: str, scope: str | None) -> asyncpg.Record:
    row = await deps.pool.fetchrow(
        f"SELECT * FROM webhook_endpoints WHERE id = $1 AND deleted_at IS NULL AND {_IN_PROJECT}",
        endpoint_id, scope,
    )  # fmt: skip
    if row is None:
        raise endpoint_not_found(endpoint_id)
    return row


@get("/webhook_endpoints/{webhook_endpoint_id:str}")
async def retrieve_endpoint(
    webhook_endpoint_id: str, deps: DepsParam, caller: CallerParam
) -> WebhookEndpoint:
    return endpoint_from_row(await _live_endpoint(deps, webhook_endpoint_id, caller.scope))


@post("/webhook_endpoints/{webhook_endpoint_id:str}", status_code=200)
async def update_endpoint(
    webhook_endpoint_id: str,
    data: UpdateWebhookEndpointRequest,
    deps: DepsParam,
    caller: CallerParam,
) -> WebhookEndpoint:
    current = await _live_endpoint(deps, webhook_endpoint_id, caller.scope)
    url = current["url"]
    if data.url is not None and data.url != url:
        url = await check_destination(data.url, deps.settings.webhooks.allowed_networks)
    event_types = (
        check_event_types(data.event_types)
        if data.event_types is not None
        else list(current["event_types"])
    )
    name = data.name if data.name is not None else current["name"]
    unchanged = (url, event_types, name) == (
        current["url"],
        list(current["event_types"]),
        current["name"],
    )
    if unchanged:
        return endpoint_from_row(current)
    async with deps.pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "UPDATE webhook_endpoints SET url = $2, event_types = $3, name = $4, updated_at = $5"
            " WHERE id = $1 AND deleted_at IS NULL RETURNING *",
            webhook_endpoint_id, url, event_types, name, now_s(),
        )  # fmt: skip
        if row is None:
            raise endpoint_not_found(webhook_endpoint_id)
        # Deliveries not made yet go to where the endpoint is now.
        await conn.execute(
            "UPDATE webhook_deliveries SET url = $2, host = $3"
            " WHERE endpoint_id = $1 AND status = 'pending'",
            webhook_endpoint_id, url, host_key(url),
        )  # fmt: skip
    return endpoint_from_row(row)


@post("/webhook_endpoints/{webhook_endpoint_id:str}/rotate_secret", status_code=200)
async def rotate_secret(
    webhook_endpoint_id: str,
    deps: DepsParam,
    caller: CallerParam,
    data: RotateSecretRequest | None = None,
) -> WebhookEndpointWithSecret:
    keep_old = data.keep_old_secret_active_for_24_hours if data is not None else False
    now = now_s()
    row = await deps.pool.fetchrow(
        "UPDATE webhook_endpoints SET secret = $3,"
        " previous_secret = CASE WHEN $4 THEN secret END,"
        " previous_secret_until = CASE WHEN $4 THEN $5::bigint END, updated_at = $6"
        f" WHERE id = $1 AND deleted_at IS NULL AND {_IN_PROJECT} RETURNING *",
        webhook_endpoint_id, caller.scope, new_secret(), keep_old, now + OLD_SECRET_GRACE_S, now,
    )  # fmt: skip
    if row is None:
        raise endpoint_not_found(webhook_endpoint_id)
    log.info("webhook endpoint %s: secret rotated (old one kept: %s)", row["id"], keep_old)
    return with_secret(row)


@delete("/webhook_endpoints/{webhook_endpoint_id:str}", status_code=200)
async def delete_endpoint(
    webhook_endpoint_id: str, deps: DepsParam, caller: CallerParam
) -> DeletedWebhookEndpoint:
    now = now_s()
    async with deps.pool.acquire() as conn, conn.transaction():
        deleted = await conn.fetchval(
            "UPDATE webhook_endpoints SET deleted_at = $3, updated_at = $3"
            f" WHERE id = $1 AND deleted_at IS NULL AND {_IN_PROJECT} RETURNING id",
            webhook_endpoint_id, caller.scope, now,
        )  # fmt: skip
        if deleted is None:
            raise endpoint_not_found(webhook_endpoint_id)
        cancelled = await conn.fetch(
            "UPDATE webhook_deliveries SET status = 'cancelled', last_error = 'endpoint removed',"
            " updated_at = $2 WHERE endpoint_id = $1 AND status = 'pending' RETURNING batch_id",
            webhook_endpoint_id, now,
        )  # fmt: skip
        batch_ids = sorted({r["batch_id"] for r in cancelled})
        if batch_ids:
            await conn.execute("SELECT jetbatch_refresh_batch_webhooks($1::text[])", batch_ids)
    log.info(
        "webhook endpoint %s removed (%d pending deliveries cancelled)",
        webhook_endpoint_id,
        len(cancelled),
    )
    return DeletedWebhookEndpoint(id=webhook_endpoint_id)


# Deliveries (jetbatch extension) -------------------------------------------------------------


@get("/webhook_deliveries")
async def list_deliveries(
    deps: DepsParam,
    caller: CallerParam,
    status: DeliveryFilter | None = None,
    batch_id: str | None = None,
    limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
    after: str | None = None,
) -> WebhookDeliveryList:
    """Newest first; `status=dead` lists the dead letters."""
    cursor: int | None = None
    if after:
        cursor = await deps.pool.fetchval(
            f"SELECT seq FROM webhook_deliveries WHERE id = $1 AND {_IN_PROJECT}",
            after, caller.scope,
        )  # fmt: skip
        if cursor is None:
            raise NotFound(f"No such webhook delivery: {after}", param="after")
    rows = await deps.pool.fetch(
        f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries"
        " WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR batch_id = $2)"
        " AND ($3::bigint IS NULL OR seq < $3) AND ($5::text IS NULL OR project_id = $5)"
        " ORDER BY seq DESC LIMIT $4",
        status, batch_id, cursor, limit + 1, caller.scope,
    )  # fmt: skip
    data = [delivery_from_row(r) for r in rows[:limit]]
    return list_page(WebhookDeliveryList, data, len(rows) > limit)


async def _delivery_with_attempts(
    conn: asyncpg.Connection | asyncpg.Pool, delivery_id: str, scope: str | None
) -> WebhookDelivery:
    row = await conn.fetchrow(
        f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries WHERE id = $1 AND {_IN_PROJECT}",
        delivery_id, scope,
    )  # fmt: skip
    if row is None:
        raise delivery_not_found(delivery_id)
    attempts = await conn.fetch(
        "SELECT attempt, extract(epoch FROM started_at)::float8 AS started_at, status_code,"
        " error, latency_ms FROM webhook_attempts WHERE delivery_id = $1 ORDER BY attempt",
        delivery_id,
    )
    return delivery_from_row(row, attempts)


@get("/webhook_deliveries/{delivery_id:str}")
async def retrieve_delivery(
    delivery_id: str, deps: DepsParam, caller: CallerParam
) -> WebhookDelivery:
    """The delivery with every attempt (`attempt_log`)."""
    return await _delivery_with_attempts(deps.pool, delivery_id, caller.scope)


@post("/webhook_deliveries/{delivery_id:str}/resend", status_code=200)
async def resend_delivery(
    delivery_id: str, deps: DepsParam, caller: CallerParam
) -> WebhookDelivery:
    """A new round of attempts (the full retry policy again) for a delivery that is not pending:
    a dead letter, typically. The body and webhook-id are the same as before."""
    async with deps.pool.acquire() as conn, conn.transaction():
        batch_id = await conn.fetchval(
            "UPDATE webhook_deliveries SET status = 'pending', cycle_attempts = 0,"
            " cycle_started_at = clock_timestamp(), next_attempt_at = clock_timestamp(),"
            " delivered_at = NULL, dead_at = NULL, updated_at = $3"
            f" WHERE id = $1 AND {_IN_PROJECT} AND status <> 'pending' RETURNING batch_id",
            delivery_id, caller.scope, now_s(),
        )  # fmt: skip
        if batch_id is None:
            status = await conn.fetchval(
                f"SELECT status FROM webhook_deliveries WHERE id = $1 AND {_IN_PROJECT}",
                delivery_id, caller.scope,
            )  # fmt: skip
            if status is None:
                raise delivery_not_found(delivery_id)
            raise Conflict(
                f"webhook delivery {delivery_id} is already pending: its next attempt is scheduled",
                param="delivery_id",
            )
        await conn.execute("SELECT jetbatch_refresh_batch_webhooks($1::text[])", [batch_id])
        delivery = await _delivery_with_attempts(conn, delivery_id, caller.scope)
    log.info("batch %s: webhook delivery %s re-sent", batch_id, delivery_id)
    return delivery


ROUTES = [
    create_endpoint,
    list_endpoints,
    retrieve_endpoint,
    update_endpoint,
    rotate_secret,
    delete_endpoint,
    list_deliveries,
    retrieve_delivery,
    resend_delivery,
]
