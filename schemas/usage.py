"""OpenAI's usage and costs objects (`/v1/organization/usage/completions|embeddings`,
`/v1/organization/costs`), field for field as the `openai` SDK's
`types/admin/organization/usage_*_response.py` declare them; and jetbatch's own `/v1/stats`
and `/ready` answers (README: Usage and costs, Operations)."""

from __future__ import annotations

from typing import Generic, Literal, TypeVar

import msgspec

from schemas.openai import ErrorDetail


class CompletionsUsageResult(msgspec.Struct, kw_only=True):
    """The group fields are null unless grouped by them (`group_by`)."""

    input_tokens: int
    output_tokens: int
    input_cached_tokens: int
    input_audio_tokens: int = 0
    output_audio_tokens: int = 0
    num_model_requests: int
    object: Literal["organization.usage.completions.result"] = (
        "organization.usage.completions.result"
    )
    project_id: str | None = None
    user_id: str | None = None
    api_key_id: str | None = None
    model: str | None = None
    batch: bool | None = None
    service_tier: str | None = None
    api_source: str | None = None


class EmbeddingsUsageResult(msgspec.Struct, kw_only=True):
    input_tokens: int
    num_model_requests: int
    object: Literal["organization.usage.embeddings.result"] = "organization.usage.embeddings.result"
    project_id: str | None = None
    user_id: str | None = None
    api_key_id: str | None = None
    model: str | None = None


class CostAmount(msgspec.Struct, kw_only=True):
    value: float
    currency: str = "usd"


class CostsResult(msgspec.Struct, kw_only=True):
    amount: CostAmount
    object: Literal["organization.costs.result"] = "organization.costs.result"
    line_item: str | None = None
    project_id: str | None = None
    api_key_id: str | None = None
    user_id: str | None = None
    api_source: str | None = None
    # With `group_by=line_item`: how much of what (tokens, or duration_hours of GPU time).
    quantity: float | None = None
    quantity_unit: str | None = None


R = TypeVar("R", CompletionsUsageResult, EmbeddingsUsageResult, CostsResult)


class Bucket(msgspec.Struct, Generic[R], kw_only=True):
    start_time: int
    end_time: int
    results: list[R]
    object: Literal["bucket"] = "bucket"


class UsagePage(msgspec.Struct, Generic[R], kw_only=True):
    data: list[Bucket[R]]
    has_more: bool
    next_page: str | None
    object: Literal["page"] = "page"


# jetbatch's own -------------------------------------------------------------------------------


class Totals(msgspec.Struct, kw_only=True):
    """Batches by status (`pending`: validating; `active`: in progress, finalizing or
    cancelling) and their lines (`pending`: in an open batch, not finished yet)."""

    batches_created: int = 0
    batches_pending: int = 0
    batches_active: int = 0
    batches_completed: int = 0
    batches_failed: int = 0
    batches_cancelled: int = 0
    batches_expired: int = 0
    lines_created: int = 0
    lines_completed: int = 0
    lines_failed: int = 0
    lines_pending: int = 0


class GroupTotals(Totals, kw_only=True):
    key: str


class Stats(msgspec.Struct, kw_only=True):
    """`GET /v1/stats`: a project key's own figures, an admin key's of every project."""

    totals: Totals
    models: list[GroupTotals]
    projects: list[GroupTotals]
    object: Literal["stats"] = "stats"


class ReadyCheck(msgspec.Struct, kw_only=True):
    name: str
    ok: bool
    detail: str


class Ready(msgspec.Struct, kw_only=True, omit_defaults=True):
    """`GET /ready`: whether this api can take batches right now, and each check's finding."""

    ready: bool
    checks: list[ReadyCheck]
    # When not ready, also an OpenAI error (code `not_ready`), as every other error answer.
    error: ErrorDetail | None = None
