"""`GET /ready` and `GET /v1/stats` (README: Operations).

- `/ready` (no key, like `/healthz`): whether this api can take batches right now: NATS
  connected, PostgreSQL answering, and a worker with a fresh, healthy heartbeat for every served
  model. 200 when all hold, else 503; either way the body lists each check and what it found.
- `/v1/stats`: batches and lines by state, in all, per model and per project. A project key sees
  its own project's; an admin key every project's.

These and the usage and costs routes (usage.py) are registered at the app's root; the /v1 ones
carry their prefix, the /v1 router's guard and its `caller` themselves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from litestar import Response, get
from litestar.di import Provide

from schemas.openai import ErrorDetail
from schemas.usage import GroupTotals, Ready, ReadyCheck, Stats, Totals
from services.api import usage
from services.api.admin import is_stale, read_heartbeats
from services.api.auth import CallerParam, get_caller
from services.api.deps import DepsParam
from services.api.usage import V1, V1_GUARDS

CHECK_TIMEOUT_S = 2.0
OPEN = ("in_progress", "finalizing", "cancelling")


async def _postgres(deps: DepsParam) -> ReadyCheck:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            await deps.pool.fetchval("SELECT 1")
    except Exception as e:
        return ReadyCheck(name="postgres", ok=False, detail=f"unreachable: {e!r}"[:300])
    return ReadyCheck(name="postgres", ok=True, detail="reachable")


def _nats(deps: DepsParam) -> ReadyCheck:
    if deps.nc.is_connected:
        # Host and port only: the URL holds this api's NATS password.
        url = deps.nc.connected_url
        where = f"{url.hostname}:{url.port}" if url is not None else "a server"
        return ReadyCheck(name="nats", ok=True, detail=f"connected to {where}")
    return ReadyCheck(name="nats", ok=False, detail="not connected")


async def _workers(deps: DepsParam) -> list[ReadyCheck]:
    models = [m.name for m in deps.settings.models]
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S * 2):
            beats = await read_heartbeats(deps)
    except Exception as e:
        detail = f"worker heartbeats unreadable: {e!r}"[:300]
        return [ReadyCheck(name=f"worker:{m}", ok=False, detail=detail) for m in models]
    now, stale_s = time.time(), deps.settings.health.worker_stale_s
    checks = []
    for model in models:
        mine = [b for b in beats if b.model == model]
        live = [b for b in mine if b.healthy and not is_stale(b, now, stale_s)]
        if live:
            detail = f"{len(live)} live worker(s)"
        elif mine:
            detail = (
                f"{len(mine)} worker(s), none healthy with a heartbeat in the last {stale_s:g} s"
            )
        else:
            detail = "no worker has sent a heartbeat"
        checks.append(ReadyCheck(name=f"worker:{model}", ok=bool(live), detail=detail))
    return checks


@get("/ready")
async def ready(deps: DepsParam) -> Response[Ready]:
    checks = [_nats(deps), await _postgres(deps)]
    checks += (
        await _workers(deps)
        if checks[0].ok
        else [
            ReadyCheck(name=f"worker:{m.name}", ok=False, detail="unknown: NATS is not connected")
            for m in deps.settings.models
        ]
    )
    ok = all(c.ok for c in checks)
    if ok:
        return Response(Ready(ready=True, checks=checks), status_code=200)
    failed = ", ".join(f"{c.name} ({c.detail})" for c in checks if not c.ok)
    error = ErrorDetail(
        message=f"not ready: {failed}", type="service_unavailable", code="not_ready"
    )
    return Response(Ready(ready=False, checks=checks, error=error), status_code=503)


_STATS = """
SELECT project_id, coalesce(model, '') AS model, status, count(*) AS batches,
       sum(total)::bigint AS total, sum(completed)::bigint AS completed,
       sum(failed)::bigint AS failed
FROM batches
WHERE $1::text IS NULL OR project_id = $1
GROUP BY 1, 2, 3
"""


def add(totals: Totals, status: str, batches: int, total: int, completed: int, failed: int) -> None:
    """One status's batches and their lines into `totals`."""
    totals.batches_created += batches
    if status == "validating":
        totals.batches_pending += batches
    elif status in OPEN:
        totals.batches_active += batches
    elif status == "completed":
        totals.batches_completed += batches
    elif status == "failed":
        totals.batches_failed += batches
    elif status == "cancelled":
        totals.batches_cancelled += batches
    elif status == "expired":
        totals.batches_expired += batches
    totals.lines_created += total
    totals.lines_completed += completed
    totals.lines_failed += failed
    if status == "validating" or status in OPEN:
        totals.lines_pending += max(0, total - completed - failed)


def _groups(groups: dict[str, GroupTotals]) -> list[GroupTotals]:
    return [groups[k] for k in sorted(groups)]


def stats_from(rows: Iterable[tuple[str, str, str, int, int, int, int]]) -> Stats:
    """Stats from (project, model, status, batches, lines, completed, failed) rows."""
    totals = Totals()
    models: dict[str, GroupTotals] = {}
    projects: dict[str, GroupTotals] = {}
    for project, model, status, *counts in rows:
        add(totals, status, *counts)
        add(models.setdefault(model, GroupTotals(key=model)), status, *counts)
        add(projects.setdefault(project, GroupTotals(key=project)), status, *counts)
    return Stats(totals=totals, models=_groups(models), projects=_groups(projects))


@get(
    f"{V1}/stats",
    guards=V1_GUARDS,
    dependencies={"caller": Provide(get_caller, sync_to_thread=False)},
)
async def stats(deps: DepsParam, caller: CallerParam) -> Stats:
    rows = await deps.pool.fetch(_STATS, caller.scope)
    return stats_from(
        (r["project_id"], r["model"], r["status"], r["batches"], r["total"] or 0,
         r["completed"] or 0, r["failed"] or 0)
        for r in rows
    )  # fmt: skip


# Registered at the app's root (the /v1 ones carry their prefix and guard).
ROUTES = [ready, stats, *usage.ROUTES]
