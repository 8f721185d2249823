"""The batch queue limit `batch_1_day_max_input_tokens` of a project and model (README: Limits),
as on OpenAI: the input tokens of a project's queued batches for a model (validating or in
progress, created within the last day) may not exceed it. A batch's tokens are counted while it
validates (services/api/tokens.py) and kept on its row (`input_tokens_estimate`,
infra/migrations/006_batch_tokens.sql); the batch that would go over fails with
`token_limit_exceeded`. Unset or 0 = no limit.

The check and the batch's start are one transaction under the project's admission lock
(store.lock_admission, the one batch creation takes): two batches finishing their validation at
once cannot both take the last tokens.
"""

from __future__ import annotations

import logging

import asyncpg

from schemas.openai import BatchError
from services.api import store
from services.inference.models import ModelNotAvailable, model_path
from shared.config import Settings

log = logging.getLogger(__name__)

WINDOW_S = 86_400  # "1_day": batches created longer ago no longer count
_noted: set[str] = set()  # models whose tokenizer could not be loaded, logged once per process


async def limited_models(pool: asyncpg.Pool, project_id: str) -> set[str]:
    """The models for which the project has a batch queue limit."""
    rows = await pool.fetch(
        "SELECT model FROM project_rate_limits"
        " WHERE project_id = $1 AND batch_1_day_max_input_tokens > 0",
        project_id,
    )
    return {r["model"] for r in rows}


async def tokenizers_for(settings: Settings, pool: asyncpg.Pool, project_id: str) -> dict[str, str]:
    """model -> tokenizer directory, for each served model the project has a limit for: the
    validation counts those models' lines with their tokenizer (the others by estimate: counting
    costs seconds that a project without a limit does not pay)."""
    paths: dict[str, str] = {}
    for model in await limited_models(pool, project_id):
        spec = settings.model(model)
        if spec is None:
            continue
        try:
            paths[model] = model_path(settings, spec)
        except (ModelNotAvailable, ValueError) as e:
            note_estimate(model, str(e))
    return paths


def note_estimate(model: str, why: str) -> None:
    """Say once per process that `model`'s tokens are estimated, not counted."""
    if model not in _noted:
        _noted.add(model)
        log.warning(
            "model %s: its tokenizer cannot be loaded (%s); input tokens are estimated as request"
            " body bytes / 4 for its batch queue limit", model, why,
        )  # fmt: skip


def exceeded(model: str, project_id: str, limit: int) -> BatchError:
    return BatchError(
        code="token_limit_exceeded",
        message=f"Enqueued token limit reached for {model} in project {project_id}. Limit: "
        f"{limit:,} enqueued tokens. Please try again once some in_progress batches have been "
        "completed.",
    )


async def _limit(conn: asyncpg.Connection, project_id: str, model: str) -> int:
    value = await conn.fetchval(
        "SELECT batch_1_day_max_input_tokens FROM project_rate_limits"
        " WHERE project_id = $1 AND model = $2",
        project_id, model,
    )  # fmt: skip
    return int(value or 0)


async def queued_tokens(
    conn: asyncpg.Connection, project_id: str, model: str, *, besides: str, now: int
) -> int:
    """The input tokens of the project's other queued batches for `model`."""
    value = await conn.fetchval(
        "SELECT coalesce(sum(input_tokens_estimate), 0) FROM batches"
        " WHERE project_id = $1 AND model = $2 AND id <> $3 AND status = ANY($4::text[])"
        " AND ending IS NULL AND created_at >= $5",
        project_id, model, besides, store.ACTIVE_STATUSES, now - WINDOW_S,
    )  # fmt: skip
    return int(value)


async def start_within_limit(
    pool: asyncpg.Pool, row: store.Row, *, model: str, total: int, tokens: int
) -> tuple[store.Row | None, store.Row | None]:
    """validating -> in_progress with its `tokens` when the queue limit allows: (its row, None);
    otherwise validating -> failed with token_limit_exceeded: (None, its row). (None, None) when
    the batch had left `validating` (cancelled meanwhile)."""
    project_id = row["project_id"]
    async with pool.acquire() as conn, conn.transaction():
        await store.lock_admission(conn, project_id)
        limit = await _limit(conn, project_id, model)
        if limit > 0:
            queued = await queued_tokens(
                conn, project_id, model, besides=row["id"], now=store.now_s()
            )
            if queued + tokens > limit:
                log.info(
                    "batch %s: %d input tokens, %d queued in project %s for %s: over the limit"
                    " of %d", row["id"], tokens, queued, project_id, model, limit,
                )  # fmt: skip
                error = exceeded(model, project_id, limit)
                return None, await store.fail_batch(conn, row["id"], [error])
        started = await store.start_batch(
            conn, row["id"], model=model, total=total, input_tokens=tokens
        )
        return started, None
