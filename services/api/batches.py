"""`/v1/batches`: create (checks what can be checked at once, then validates and publishes in the
background: services/api/ingest.py), retrieve, list, cancel."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get, post
from litestar.params import Parameter

from schemas.messages import BatchStop
from schemas.openai import Batch, BatchList, CreateBatchRequest
from services.api import idempotency, store
from services.api.admin import require_healthy_worker
from services.api.auth import CallerParam
from services.api.batch_options import check_priority, requested_priority, window_s
from services.api.deps import DepsParam
from services.api.files import not_found as file_not_found
from services.api.ingest import run_process_batch
from services.api.pages import list_page
from services.api.store import now_s
from shared import logs, tracing
from shared.config import LimitSettings, Settings
from shared.errors import Conflict, InvalidRequest, NotFound, RateLimited
from shared.ids import new_id

log = logging.getLogger(__name__)
_encoder = msgspec.json.Encoder()

# How long "24h" lasts is the operator's (JETBATCH_COMPLETION_WINDOW_S, default 86,400); other
# windows (a jetbatch extension) scale with it (batch_options.py).
CANCELLABLE = ("validating", "in_progress")


def not_found(batch_id: str) -> NotFound:
    return NotFound(f"No such Batch object: {batch_id}", param="batch_id")


def check_models(settings: Settings, endpoint: str, models: list[str] | None) -> None:
    """The models the upload scan found in the file: each must be served, for this endpoint.
    (Mixed models are a line-level error of the validation, reported with their lines.)"""
    served = ", ".join(m.name for m in settings.models) or "none"
    for name in models or ():
        spec = settings.model(name)
        if spec is None:
            raise InvalidRequest(
                f"The input file uses model {name!r}, which this deployment does not serve "
                f"(served models: {served})",
                param="input_file_id",
                code="model_not_found",
            )
        if endpoint not in spec.endpoints:
            raise InvalidRequest(
                f"model {name!r} does not serve {endpoint} (it serves {', '.join(spec.endpoints)})",
                param="endpoint",
                code="unsupported_endpoint",
            )


def check_limits(limits: LimitSettings, active: int, queued: int, adding: int) -> None:
    """429 when the project is full (README: Limits): the limits count per project."""
    if active >= limits.max_active_batches:
        raise RateLimited(
            f"{active} batches of this project are already validating or in progress, the most a "
            f"project runs at once ({limits.max_active_batches}); retry when one has finished",
            code="too_many_active_batches",
        )
    if queued + adding > limits.max_queued_requests:
        raise RateLimited(
            f"{queued} requests of this project are queued and this batch adds {adding}; a project "
            f"queues at most {limits.max_queued_requests}. Retry when the queue is shorter",
            code="queue_full",
        )


@post("/batches", status_code=200)
async def create_batch(
    data: CreateBatchRequest, request: Request[Any, Any, Any], deps: DepsParam, caller: CallerParam
) -> Batch | Response[bytes]:
    """With an `Idempotency-Key`, a repeat gets the first response (idempotency.py)."""

    async def run() -> tuple[Batch, None]:
        return await _create_batch(data, deps, caller), None

    key, body_hash = idempotency.key_of(request), idempotency.hash_of(_encoder.encode(data))
    return await idempotency.once(  # type: ignore[no-any-return]
        deps.pool, caller.project_id, key, "POST /v1/batches", body_hash, run
    )


async def _create_batch(data: CreateBatchRequest, deps: DepsParam, caller: CallerParam) -> Batch:
    # The endpoint and metadata were checked as the body decoded (their types: schemas/openai.py).
    started_ns = time.time_ns()  # the batch's trace begins here (shared.tracing)
    settings = deps.settings
    window = window_s(data.completion_window, settings.limits.completion_window_s)
    priority = requested_priority(data)
    file_row = await store.get_file(deps.pool, data.input_file_id, caller.scope)
    if file_row is None:
        raise file_not_found(data.input_file_id, param="input_file_id")
    if file_row["purpose"] != "batch":
        raise InvalidRequest(
            f"input file {data.input_file_id} has purpose {file_row['purpose']!r}; a batch "
            "needs a file uploaded with purpose 'batch'",
            param="input_file_id",
        )
    check_models(settings, data.endpoint, file_row["models"])
    if (file_row["line_count"] or 0) > settings.max_batch_lines:
        raise InvalidRequest(
            f"input file {data.input_file_id} has {file_row['line_count']} requests; a batch "
            f"holds at most {settings.max_batch_lines}",
            param="input_file_id",
            code="too_many_requests",
        )
    if settings.health.require_healthy_worker:
        await require_healthy_worker(deps, list(file_row["models"] or ()))
    # The batch runs in its file's project (an admin's batch too). Its limits are checked and
    # the batch inserted in one transaction, under the project's lock all api replicas share:
    # two creates cannot both take the last slot, and a refusal leaves nothing.
    project_id = file_row["project_id"]
    async with deps.pool.acquire() as conn, conn.transaction():
        await store.lock_admission(conn, project_id)
        load = await store.open_load(conn, project_id)
        check_limits(settings.limits, *load, file_row["line_count"] or 0)
        check_priority(priority, await store.max_batch_priority(conn, project_id), project_id)
        created_at = store.now_s()
        row = await store.insert_batch(
            conn,
            batch_id=new_id("batch_"),
            endpoint=data.endpoint,
            input_file_id=data.input_file_id,
            completion_window=data.completion_window,
            created_at=created_at,
            expires_at=created_at + window,
            metadata=data.metadata,
            output_expires_after=(
                data.output_expires_after.seconds if data.output_expires_after else None
            ),
            project_id=project_id,
            api_key_id=caller.key_id,
            priority=priority,
        )
    batch = store.batch_from_row(row)
    logs.bind(batch.id)  # this request's later records, and its ingestion task's
    log.info(
        "batch %s created: file %s, endpoint %s", batch.id, batch.input_file_id, batch.endpoint
    )
    tracing.batch_created(batch.id, started_ns, **{"jetbatch.endpoint": batch.endpoint})
    deps.spawn(run_process_batch(deps, batch.id), name=f"process_batch {batch.id}")
    return batch


@get("/batches/{batch_id:str}")
async def retrieve_batch(batch_id: str, deps: DepsParam, caller: CallerParam) -> Batch:
    row = await store.get_batch(deps.pool, batch_id, caller.scope)
    if row is None:
        raise not_found(batch_id)
    return store.batch_from_row(row)


@get("/batches")
async def list_batches(
    deps: DepsParam,
    caller: CallerParam,
    limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
    after: str | None = None,
) -> BatchList:
    cursor = None
    if after:
        created_at = await store.batch_cursor(deps.pool, after, caller.scope)
        if created_at is None:
            raise NotFound(f"No such Batch object: {after}", param="after")
        cursor = (created_at, after)
    rows, has_more = await store.list_batches(
        deps.pool, limit=limit, after=cursor, project=caller.scope
    )
    data = [store.batch_from_row(r) for r in rows]
    return list_page(BatchList, data, has_more)


@post("/batches/{batch_id:str}/cancel", status_code=200)
async def cancel_batch(batch_id: str, deps: DepsParam, caller: CallerParam) -> Batch:
    row = await store.cancel_batch(deps.pool, batch_id, caller.scope)
    if row is None:
        row = await store.get_batch(deps.pool, batch_id, caller.scope)
        if row is None:
            raise not_found(batch_id)
        if row["status"] == "cancelling":
            # A retried cancel: already under way (telling the workers again is harmless).
            await announce_stop(
                deps, BatchStop(batch_id=batch_id, reason="cancelled", at=row["cancelling_at"])
            )
            return store.batch_from_row(row)
        raise Conflict(
            f"Cannot cancel batch {batch_id}: its status is {row['status']!r}; only "
            f"{' or '.join(CANCELLABLE)} batches can be cancelled",
            param="batch_id",
        )
    log.info("batch %s cancelling", batch_id)
    await announce_stop(deps, BatchStop(batch_id=batch_id, reason="cancelled", at=now_s()))
    return store.batch_from_row(row)


async def announce_stop(deps: DepsParam, stop: BatchStop) -> None:
    """Tell the workers at once (KV `jetbatch_cancelled`, which they watch). If this fails the
    watchdog puts it there on its next round: the database is the truth."""
    if deps.cancelled is None:
        return
    try:
        await deps.cancelled.put(stop.batch_id, _encoder.encode(stop))
    except Exception as e:
        log.warning("batch %s: workers not told of the cancel yet (%s)", stop.batch_id, e)


ROUTES = [create_batch, retrieve_batch, list_batches, cancel_batch]
