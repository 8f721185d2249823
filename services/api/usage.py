"""`/v1/organization/usage/completions`, `/v1/organization/usage/embeddings` and
`/v1/organization/costs`: OpenAI's usage and costs API over what jetbatch ran (README: Usage
and costs), so the SDK's admin client (`client.admin.organization.usage.completions(...)`) and
cost dashboards read it. Admin keys only: a project key gets a 403. The routes carry their
`/v1` prefix and the /v1 router's guard themselves (registered at the app's root).

Counted from batch lines: those of unfinished batches in `request_results` (at the second they
finished), those of finished batches in `usage_minutes` (per minute, once pruned:
shared/domain/retention.py); and from synchronous requests (`batch=false`), per minute in
`sync_usage_minutes` (services/api/sync_usage.py).
`num_model_requests` counts the lines the model answered successfully. Costs price the usage
with the operator's table (JETBATCH_PRICES): line items `<model>, input`, `<model>, output`
(per million tokens) and `<model>, gpu hours` (per GPU-hour). Query logic: usage_buckets.py.
"""

from __future__ import annotations

import time
from typing import Any

import asyncpg
from litestar import Request, get

from schemas.usage import UsagePage
from services.api.auth import ADMIN, authenticate
from services.api.deps import DepsParam
from services.api.usage_buckets import (
    ENDPOINTS,
    Kind,
    Query,
    Usage,
    costs_page,
    line_items,
    parse_query,
    usage_page,
)

# Served beside the app's /v1 router (services/api/service.py), with its guard: who is calling,
# and a 403 for a project key.
V1 = "/v1"
V1_GUARDS = [authenticate]

# One statement, so a batch pruned meanwhile is counted once (its rows move from
# request_results to usage_minutes in one transaction). $1/$2: the page's range; $3: the bucket
# width; then the filters (NULL: any).
_USAGE = """
WITH lines AS (
    SELECT b.project_id, coalesce(b.model, '') AS model, b.api_key_id, b.endpoint, true AS batch,
           coalesce(r.finished_at, b.updated_at) AS t, r.ok::int AS requests,
           r.input_tokens, r.cached_tokens, r.output_tokens, r.gpu_ms
    FROM request_results r JOIN batches b ON b.id = r.batch_id
    WHERE coalesce(r.finished_at, b.updated_at) >= $1
      AND coalesce(r.finished_at, b.updated_at) < $2
    UNION ALL
    SELECT u.project_id, u.model, b.api_key_id, b.endpoint, true, u.minute,
           u.requests - u.failed, u.input_tokens, u.cached_tokens, u.output_tokens, u.gpu_ms
    FROM usage_minutes u JOIN batches b ON b.id = u.batch_id
    WHERE u.minute >= $1 AND u.minute < $2
    UNION ALL
    SELECT s.project_id, s.model, nullif(s.api_key_id, ''), s.endpoint, false, s.minute,
           s.requests, s.input_tokens, s.cached_tokens, s.output_tokens, s.gpu_ms
    FROM sync_usage_minutes s
    WHERE s.minute >= $1 AND s.minute < $2
)
SELECT ((t - $1) / $3)::int AS bucket, project_id, model, api_key_id, batch,
       sum(requests)::bigint AS requests, sum(input_tokens)::bigint AS input_tokens,
       sum(cached_tokens)::bigint AS cached_tokens, sum(output_tokens)::bigint AS output_tokens,
       sum(gpu_ms)::bigint AS gpu_ms
FROM lines
WHERE ($4::text[] IS NULL OR endpoint = ANY($4::text[]))
  AND ($5::text[] IS NULL OR project_id = ANY($5::text[]))
  AND ($6::text[] IS NULL OR model = ANY($6::text[]))
  AND ($7::text[] IS NULL OR api_key_id = ANY($7::text[]))
  AND ($8::bool IS NULL OR batch = $8)
GROUP BY 1, 2, 3, 4, 5
"""


def _list(values: tuple[str, ...] | None) -> list[str] | None:
    return list(values) if values is not None else None


async def usage_rows(pool: asyncpg.Pool, query: Query) -> list[Usage]:
    """What was used in the query's page, per bucket (index from the page's first), project,
    model and key."""
    if query.nothing or query.buckets == 0:
        return []
    endpoints = ENDPOINTS[query.kind]
    rows = await pool.fetch(
        _USAGE,
        query.page_start,
        query.page_end,
        query.width,
        list(endpoints) if endpoints is not None else None,
        _list(query.project_ids),
        _list(query.models),
        _list(query.api_key_ids),
        query.batch,
    )
    return [
        Usage(
            bucket=r["bucket"],
            project_id=r["project_id"],
            model=r["model"],
            api_key_id=r["api_key_id"],
            batch=r["batch"],
            requests=r["requests"],
            input_tokens=r["input_tokens"],
            cached_tokens=r["cached_tokens"],
            output_tokens=r["output_tokens"],
            gpu_ms=r["gpu_ms"],
        )
        for r in rows
    ]


def _query(kind: Kind, request: Request[Any, Any, Any]) -> Query:
    params = {k: list(request.query_params.getall(k)) for k in request.query_params}
    return parse_query(kind, params, int(time.time()))


@get(f"{V1}/organization/usage/completions", opt=ADMIN, guards=V1_GUARDS)
async def completions_usage(request: Request[Any, Any, Any], deps: DepsParam) -> UsagePage:  # type: ignore[type-arg]
    query = _query("completions", request)
    return usage_page(query, await usage_rows(deps.pool, query))


@get(f"{V1}/organization/usage/embeddings", opt=ADMIN, guards=V1_GUARDS)
async def embeddings_usage(request: Request[Any, Any, Any], deps: DepsParam) -> UsagePage:  # type: ignore[type-arg]
    query = _query("embeddings", request)
    return usage_page(query, await usage_rows(deps.pool, query))


@get(f"{V1}/organization/costs", opt=ADMIN, guards=V1_GUARDS)
async def costs(request: Request[Any, Any, Any], deps: DepsParam) -> UsagePage:  # type: ignore[type-arg]
    query = _query("costs", request)
    usage = deps.settings.usage
    items = line_items(await usage_rows(deps.pool, query), usage)
    return costs_page(query, items, usage.currency)


ROUTES = [completions_usage, embeddings_usage, costs]
