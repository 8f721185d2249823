"""`/v1/organization/projects/{project_id}/...`: a project's service accounts (each with its API
key), its API keys and its rate limits, in the shape of OpenAI's admin API (README: Projects and
keys). Admin keys only. SQL: services/api/tenants.py.

A key's value is shown once, in the answer that creates it; a deleted key (or service account)
is refused on its next call, on every api replica.
"""

from __future__ import annotations

import logging
from typing import Annotated

from litestar import delete, get, post
from litestar.params import Parameter

from schemas.organization import (
    RATE_LIMIT_FIELDS,
    CreatedServiceAccount,
    CreateServiceAccountKeyRequest,
    CreateServiceAccountRequest,
    DeletedProjectApiKey,
    DeletedServiceAccount,
    ProjectApiKey,
    ProjectApiKeyList,
    ProjectKeyOwner,
    ProjectKeyOwnerAccount,
    RateLimit,
    RateLimitList,
    ServiceAccount,
    ServiceAccountKey,
    ServiceAccountList,
    UpdateRateLimitRequest,
    UpdateServiceAccountRequest,
)
from services.api import tenants
from services.api.auth import ADMIN
from services.api.deps import DepsParam
from services.api.organization import live_project
from services.api.pages import list_page
from services.api.store import now_s
from shared.errors import Conflict, NotFound

log = logging.getLogger(__name__)

Limit = Annotated[int, Parameter(ge=1, le=100)]
PROJECT = "/organization/projects/{project_id:str}"
RATE_LIMIT_PREFIX = "rl-"


async def open_project(deps: DepsParam, project_id: str) -> tenants.Row:
    """The project, if it may get new keys: 404 when unknown, 409 when archived."""
    row = await live_project(deps, project_id)
    if row["archived_at"] is not None:
        raise Conflict(
            f"Project {project_id} is archived: it gets no new service accounts or keys",
            param="project_id",
        )
    return row


# Service accounts ----------------------------------------------------------------------------


def account_from_row(row: tenants.Row) -> ServiceAccount:
    return ServiceAccount(
        id=row["id"], name=row["name"], created_at=row["created_at"], role=row["role"]
    )


def _account_not_found(account_id: str) -> NotFound:
    return NotFound(f"No such service account: {account_id}", param="service_account_id")


def _shown_once(key: tenants.Row, value: str) -> ServiceAccountKey:
    return ServiceAccountKey(
        id=key["id"],
        name=key["name"],
        created_at=key["created_at"],
        value=value,
        expires_at=key["expires_at"],
    )


@post(f"{PROJECT}/service_accounts", status_code=200, opt=ADMIN)
async def create_service_account(
    project_id: str, data: CreateServiceAccountRequest, deps: DepsParam
) -> CreatedServiceAccount:
    await open_project(deps, project_id)
    now = now_s()
    account, key, value = await tenants.create_service_account(
        deps.pool,
        project_id,
        data.name,
        now,
        with_key=not data.create_service_account_only,
        expires_at=tenants.expiry(now, data.expires_in_seconds),
    )
    if key is not None:
        deps.keys_exist = True
    log.info("project %s: service account %s created", project_id, account["id"])
    return CreatedServiceAccount(
        id=account["id"],
        name=account["name"],
        created_at=account["created_at"],
        role="none" if key is None else "member",
        api_key=None if key is None or value is None else _shown_once(key, value),
    )


@get(f"{PROJECT}/service_accounts", opt=ADMIN)
async def list_service_accounts(
    project_id: str, deps: DepsParam, limit: Limit = 20, after: str | None = None
) -> ServiceAccountList:
    await live_project(deps, project_id)
    page = await tenants.list_service_accounts(deps.pool, project_id, limit=limit, after=after)
    if page is None:
        raise NotFound(f"No such service account: {after}", param="after")
    rows, has_more = page
    data = [account_from_row(r) for r in rows]
    return list_page(ServiceAccountList, data, has_more)


@get(f"{PROJECT}/service_accounts/{{service_account_id:str}}", opt=ADMIN)
async def retrieve_service_account(
    project_id: str, service_account_id: str, deps: DepsParam
) -> ServiceAccount:
    row = await tenants.get_service_account(deps.pool, project_id, service_account_id)
    if row is None:
        raise _account_not_found(service_account_id)
    return account_from_row(row)


@post(f"{PROJECT}/service_accounts/{{service_account_id:str}}", status_code=200, opt=ADMIN)
async def update_service_account(
    project_id: str, service_account_id: str, data: UpdateServiceAccountRequest, deps: DepsParam
) -> ServiceAccount:
    row = await tenants.update_service_account(
        deps.pool, project_id, service_account_id, data.name, data.role
    )
    if row is None:
        raise _account_not_found(service_account_id)
    return account_from_row(row)


@delete(f"{PROJECT}/service_accounts/{{service_account_id:str}}", status_code=200, opt=ADMIN)
async def delete_service_account(
    project_id: str, service_account_id: str, deps: DepsParam
) -> DeletedServiceAccount:
    """The account and its keys: revoked at once."""
    if not await tenants.delete_service_account(deps.pool, project_id, service_account_id, now_s()):
        raise _account_not_found(service_account_id)
    deps.key_cache.clear()  # here at once; other apis hear it from PostgreSQL (key_cache.py)
    log.info("project %s: service account %s deleted", project_id, service_account_id)
    return DeletedServiceAccount(id=service_account_id)


@post(f"{PROJECT}/service_accounts/{{service_account_id:str}}/api_keys", status_code=200, opt=ADMIN)
async def create_service_account_key(
    project_id: str, service_account_id: str, data: CreateServiceAccountKeyRequest, deps: DepsParam
) -> ServiceAccountKey:
    """Another key for the account (to rotate: create one, move the client, delete the old)."""
    await open_project(deps, project_id)
    if await tenants.get_service_account(deps.pool, project_id, service_account_id) is None:
        raise _account_not_found(service_account_id)
    now = now_s()
    key, value = await tenants.insert_key(
        deps.pool,
        kind="project",
        name=data.name or "Secret key",
        now=now,
        expires_at=tenants.expiry(now, data.expires_in_seconds),
        project_id=project_id,
        service_account_id=service_account_id,
    )
    deps.keys_exist = True
    return _shown_once(key, value)


# A project's API keys ------------------------------------------------------------------------


def project_key_from_row(row: tenants.Row) -> ProjectApiKey:
    return ProjectApiKey(
        id=row["id"],
        name=row["name"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        last_used_at=row["last_used_at"],
        redacted_value=row["redacted_value"],
        owner=ProjectKeyOwner(
            service_account=ProjectKeyOwnerAccount(
                id=row["service_account_id"],
                name=row["owner_name"],
                created_at=row["owner_created_at"],
                role=row["owner_role"],
            )
        ),
    )


def _key_not_found(key_id: str) -> NotFound:
    return NotFound(f"No such API key: {key_id}", param="api_key_id")


@get(f"{PROJECT}/api_keys", opt=ADMIN)
async def list_project_keys(
    project_id: str,
    deps: DepsParam,
    limit: Limit = 20,
    after: str | None = None,
    owner_project_access: str | None = None,  # accepted: every key's owner has access here
) -> ProjectApiKeyList:
    await live_project(deps, project_id)
    page = await tenants.list_project_keys(deps.pool, project_id, limit=limit, after=after)
    if page is None:
        raise NotFound(f"No such API key: {after}", param="after")
    rows, has_more = page
    data = [project_key_from_row(r) for r in rows]
    return list_page(ProjectApiKeyList, data, has_more)


@get(f"{PROJECT}/api_keys/{{api_key_id:str}}", opt=ADMIN)
async def retrieve_project_key(project_id: str, api_key_id: str, deps: DepsParam) -> ProjectApiKey:
    row = await tenants.get_project_key(deps.pool, project_id, api_key_id)
    if row is None:
        raise _key_not_found(api_key_id)
    return project_key_from_row(row)


@delete(f"{PROJECT}/api_keys/{{api_key_id:str}}", status_code=200, opt=ADMIN)
async def delete_project_key(
    project_id: str, api_key_id: str, deps: DepsParam
) -> DeletedProjectApiKey:
    """Revoked at once: the next call with it is a 401 here, and on every other api replica
    as soon as PostgreSQL's notification reaches it (milliseconds: key_cache.py)."""
    if not await tenants.revoke_key(
        deps.pool, api_key_id, now_s(), kind="project", project_id=project_id
    ):
        raise _key_not_found(api_key_id)
    deps.key_cache.clear()
    log.info("project %s: API key %s revoked", project_id, api_key_id)
    return DeletedProjectApiKey(id=api_key_id)


# Rate limits ---------------------------------------------------------------------------------


def _rate_limit(model: str, row: tenants.Row | None) -> RateLimit:
    values = {f: row[f] for f in RATE_LIMIT_FIELDS if row is not None and row[f] is not None}
    return RateLimit(id=f"{RATE_LIMIT_PREFIX}{model}", model=model, **values)


@get(f"{PROJECT}/rate_limits", opt=ADMIN)
async def list_rate_limits(
    project_id: str,
    deps: DepsParam,
    limit: Annotated[int, Parameter(ge=1, le=1000)] = 100,
    after: str | None = None,
    before: str | None = None,
) -> RateLimitList:
    """One per model this deployment serves."""
    await live_project(deps, project_id)
    stored = await tenants.rate_limits(deps.pool, project_id)
    every = [_rate_limit(m.name, stored.get(m.name)) for m in deps.settings.models]
    ids = [r.id for r in every]
    start = ids.index(after) + 1 if after in ids else 0
    end = ids.index(before) if before in ids else len(every)
    data = every[start:end][:limit]
    return list_page(RateLimitList, data, start + len(data) < end)


@post(f"{PROJECT}/rate_limits/{{rate_limit_id:str}}", status_code=200, opt=ADMIN)
async def update_rate_limit(
    project_id: str, rate_limit_id: str, data: UpdateRateLimitRequest, deps: DepsParam
) -> RateLimit:
    await live_project(deps, project_id)
    model = rate_limit_id.removeprefix(RATE_LIMIT_PREFIX)
    if not rate_limit_id.startswith(RATE_LIMIT_PREFIX) or deps.settings.model(model) is None:
        raise NotFound(f"No such rate limit: {rate_limit_id}", param="rate_limit_id")
    values = {f: getattr(data, f) for f in RATE_LIMIT_FIELDS if getattr(data, f) is not None}
    await tenants.update_rate_limit(deps.pool, project_id, model, values)
    deps.rate_limiter.forget(project_id)
    stored = await tenants.rate_limits(deps.pool, project_id)
    return _rate_limit(model, stored.get(model))


ROUTES = [
    create_service_account,
    list_service_accounts,
    retrieve_service_account,
    update_service_account,
    delete_service_account,
    create_service_account_key,
    list_project_keys,
    retrieve_project_key,
    delete_project_key,
    list_rate_limits,
    update_rate_limit,
]
