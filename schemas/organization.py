"""OpenAI's admin API objects, served for jetbatch's tenants (README: Projects and keys).

Field for field what the official `openai` SDK's admin client reads and sends
(`openai/types/admin/organization/**`): admin API keys, projects, a project's service accounts,
API keys and rate limits. jetbatch's one addition is a project's webhook signing secret.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

Name = Annotated[str, Meta(min_length=1, max_length=256)]
# OpenAI accepts key lifetimes in seconds; at least a minute, at most ten years here.
ExpiresIn = Annotated[int, Meta(ge=60, le=10 * 365 * 86_400)]


class _Object(msgspec.Struct, kw_only=True, omit_defaults=False):
    pass


# Admin API keys ------------------------------------------------------------------------------


class AdminKeyOwner(_Object):
    id: str | None = None
    created_at: int | None = None
    name: str | None = None
    object: str | None = "organization.user"
    role: str | None = "owner"
    type: str | None = "user"


class AdminApiKey(_Object):
    id: str
    created_at: int
    owner: AdminKeyOwner
    redacted_value: str
    expires_at: int | None = None
    last_used_at: int | None = None
    name: str | None = None
    object: Literal["organization.admin_api_key"] = "organization.admin_api_key"


class AdminApiKeyWithValue(AdminApiKey, kw_only=True):
    value: str = ""  # shown once, on create


class AdminApiKeyList(_Object):
    data: list[AdminApiKey]
    first_id: str | None
    last_id: str | None
    has_more: bool
    object: Literal["list"] = "list"


class CreateAdminApiKeyRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Name
    expires_in_seconds: ExpiresIn | None = None


class DeletedAdminApiKey(_Object):
    id: str
    deleted: bool = True
    object: Literal["organization.admin_api_key.deleted"] = "organization.admin_api_key.deleted"


# Projects ------------------------------------------------------------------------------------


class Project(_Object):
    id: str
    name: str
    created_at: int
    archived_at: int | None = None
    status: Literal["active", "archived"] = "active"
    object: Literal["organization.project"] = "organization.project"
    # jetbatch extension: the highest batch priority its batches may ask for (-10 .. 10).
    max_batch_priority: int = 0
    # jetbatch extension: its weight in the fair share of each model's workers against other
    # projects with work waiting (README: Scheduling); 1 by default.
    share: float = 1.0


class ProjectList(_Object):
    data: list[Project]
    first_id: str | None
    last_id: str | None
    has_more: bool
    object: Literal["list"] = "list"


# A project's fair-share weight (README: Scheduling): above 0.
Share = Annotated[float, Meta(gt=0, le=1_000_000)]


class CreateProjectRequest(msgspec.Struct, kw_only=True):
    name: Name
    # Accepted and ignored: OpenAI's data residency and external keys mean nothing here.
    external_key_id: str | None = None
    geography: str | None = None
    # jetbatch extension (SDKs send it with `extra_body`): see Project.share.
    share: Share | None = None


class UpdateProjectRequest(msgspec.Struct, kw_only=True):
    name: Name | None = None
    external_key_id: str | None = None
    geography: str | None = None
    # jetbatch extension (SDKs send it with `extra_body`): see Project.max_batch_priority.
    max_batch_priority: Annotated[int, Meta(ge=-10, le=10)] | None = None
    # jetbatch extension (SDKs send it with `extra_body`): see Project.share.
    share: Share | None = None


class ProjectWebhookSecret(_Object):
    """jetbatch extension: signs the project's batches' `metadata.webhook_url` deliveries."""

    project_id: str
    secret: str | None
    updated_at: int | None = None
    object: Literal["organization.project.webhook_secret"] = "organization.project.webhook_secret"


# Service accounts and their keys -------------------------------------------------------------


class ServiceAccount(_Object):
    id: str
    name: str
    created_at: int
    role: Literal["owner", "member", "none"] = "member"
    object: Literal["organization.project.service_account"] = "organization.project.service_account"


class ServiceAccountList(_Object):
    data: list[ServiceAccount]
    first_id: str | None
    last_id: str | None
    has_more: bool
    object: Literal["list"] = "list"


class CreateServiceAccountRequest(msgspec.Struct, kw_only=True):
    name: Name
    create_service_account_only: bool | None = None
    expires_in_seconds: ExpiresIn | None = None


class UpdateServiceAccountRequest(msgspec.Struct, kw_only=True):
    name: Name | None = None
    role: Literal["member", "owner"] | None = None


class ServiceAccountKey(_Object):
    """The one time a project key's value is shown."""

    id: str
    name: str
    created_at: int
    value: str
    expires_at: int | None = None
    object: Literal["organization.project.service_account.api_key"] = (
        "organization.project.service_account.api_key"
    )


class CreatedServiceAccount(_Object):
    id: str
    name: str
    created_at: int
    role: Literal["member", "none"]
    api_key: ServiceAccountKey | None
    object: Literal["organization.project.service_account"] = "organization.project.service_account"


class CreateServiceAccountKeyRequest(msgspec.Struct, kw_only=True):
    name: Annotated[str, Meta(max_length=256)] = ""
    expires_in_seconds: ExpiresIn | None = None
    scopes: list[str] | None = None  # accepted; a jetbatch project key can do everything


class DeletedServiceAccount(_Object):
    id: str
    deleted: bool = True
    object: Literal["organization.project.service_account.deleted"] = (
        "organization.project.service_account.deleted"
    )


class ProjectKeyOwnerAccount(_Object):
    id: str
    name: str
    created_at: int
    role: str


class ProjectKeyOwner(_Object):
    type: Literal["user", "service_account"] = "service_account"
    service_account: ProjectKeyOwnerAccount | None = None
    user: None = None


class ProjectApiKey(_Object):
    id: str
    name: str
    created_at: int
    owner: ProjectKeyOwner
    redacted_value: str
    expires_at: int | None = None
    last_used_at: int | None = None
    owner_project_access: Literal["active", "inactive"] = "active"
    object: Literal["organization.project.api_key"] = "organization.project.api_key"


class ProjectApiKeyList(_Object):
    data: list[ProjectApiKey]
    first_id: str | None
    last_id: str | None
    has_more: bool
    object: Literal["list"] = "list"


class DeletedProjectApiKey(_Object):
    id: str
    deleted: bool = True
    object: Literal["organization.project.api_key.deleted"] = "organization.project.api_key.deleted"


# Rate limits ---------------------------------------------------------------------------------

Limit = Annotated[int, Meta(ge=0, le=2**62)]


class RateLimit(_Object):
    """A project's limits for one model (0 = no limit): the batch queue limit
    `batch_1_day_max_input_tokens` holds batches (services/api/token_limit.py), the request and
    token limits hold synchronous requests (services/api/rate_limits.py); the image and audio
    limits are stored only. jetbatch's own per-project limits: README "Limits"."""

    id: str  # rl-<model>
    model: str
    max_requests_per_1_minute: int = 0
    max_tokens_per_1_minute: int = 0
    max_images_per_1_minute: int | None = None
    max_audio_megabytes_per_1_minute: int | None = None
    max_requests_per_1_day: int | None = None
    batch_1_day_max_input_tokens: int | None = None
    object: Literal["project.rate_limit"] = "project.rate_limit"


class RateLimitList(_Object):
    data: list[RateLimit]
    first_id: str | None
    last_id: str | None
    has_more: bool
    object: Literal["list"] = "list"


class UpdateRateLimitRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    max_requests_per_1_minute: Limit | None = None
    max_tokens_per_1_minute: Limit | None = None
    max_images_per_1_minute: Limit | None = None
    max_audio_megabytes_per_1_minute: Limit | None = None
    max_requests_per_1_day: Limit | None = None
    batch_1_day_max_input_tokens: Limit | None = None


RATE_LIMIT_FIELDS: tuple[str, ...] = tuple(UpdateRateLimitRequest.__struct_fields__)
