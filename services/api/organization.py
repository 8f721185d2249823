"""`/v1/organization`: OpenAI's admin API for jetbatch's tenants (README: Projects and keys), so
an operator manages them with the official SDK's admin client
(`OpenAI(admin_api_key=...).admin.organization...`). Admin keys only: a project key gets a 403.

Here: admin API keys, projects (create, list, retrieve, modify, archive) and each project's
webhook signing secret (a jetbatch extension). A project's service accounts, API keys and rate
limits: services/api/project_members.py. SQL: services/api/tenants.py.
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from litestar import delete, get, post
from litestar.params import Parameter

from schemas.organization import (
    AdminApiKey,
    AdminApiKeyList,
    AdminApiKeyWithValue,
    AdminKeyOwner,
    CreateAdminApiKeyRequest,
    CreateProjectRequest,
    DeletedAdminApiKey,
    Project,
    ProjectList,
    ProjectWebhookSecret,
    UpdateProjectRequest,
)
from services.api import tenants
from services.api.auth import ADMIN
from services.api.deps import DepsParam
from services.api.pages import list_page
from services.api.store import now_s
from shared.errors import NotFound

log = logging.getLogger(__name__)

Limit = Annotated[int, Parameter(ge=1, le=100)]


def project_not_found(project_id: str) -> NotFound:
    return NotFound(f"No such project: {project_id}", param="project_id")


async def live_project(deps: DepsParam, project_id: str) -> tenants.Row:
    """The project, or a 404 (an archived project is still found: its work can be read)."""
    row = await tenants.get_project(deps.pool, project_id)
    if row is None:
        raise project_not_found(project_id)
    return row


# Admin API keys ------------------------------------------------------------------------------


def admin_key_from_row(row: tenants.Row) -> AdminApiKey:
    return AdminApiKey(
        id=row["id"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        last_used_at=row["last_used_at"],
        name=row["name"],
        owner=AdminKeyOwner(name="jetbatch operator", created_at=row["created_at"]),
        redacted_value=row["redacted_value"],
    )


def _admin_key_not_found(key_id: str) -> NotFound:
    return NotFound(f"No such admin API key: {key_id}", param="key_id")


@post("/organization/admin_api_keys", status_code=200, opt=ADMIN)
async def create_admin_key(data: CreateAdminApiKeyRequest, deps: DepsParam) -> AdminApiKeyWithValue:
    now = now_s()
    row, value = await tenants.insert_key(
        deps.pool,
        kind="admin",
        name=data.name,
        now=now,
        expires_at=tenants.expiry(now, data.expires_in_seconds),
    )
    deps.keys_exist = True
    log.info("admin API key %s created (%s)", row["id"], data.name)
    key = admin_key_from_row(row)
    return AdminApiKeyWithValue(**{f: getattr(key, f) for f in key.__struct_fields__}, value=value)


@get("/organization/admin_api_keys", opt=ADMIN)
async def list_admin_keys(
    deps: DepsParam,
    limit: Limit = 20,
    after: str | None = None,
    order: Literal["asc", "desc"] = "asc",
) -> AdminApiKeyList:
    page = await tenants.list_admin_keys(deps.pool, limit=limit, after=after, order=order)
    if page is None:
        raise NotFound(f"No such admin API key: {after}", param="after")
    rows, has_more = page
    data = [admin_key_from_row(r) for r in rows]
    return list_page(AdminApiKeyList, data, has_more)


@get("/organization/admin_api_keys/{key_id:str}", opt=ADMIN)
async def retrieve_admin_key(key_id: str, deps: DepsParam) -> AdminApiKey:
    row = await tenants.get_admin_key(deps.pool, key_id)
    if row is None:
        raise _admin_key_not_found(key_id)
    return admin_key_from_row(row)


@delete("/organization/admin_api_keys/{key_id:str}", status_code=200, opt=ADMIN)
async def delete_admin_key(key_id: str, deps: DepsParam) -> DeletedAdminApiKey:
    """Revoked at once: the next call with it is a 401 here, and on every other api replica
    as soon as PostgreSQL's notification reaches it (milliseconds: key_cache.py)."""
    if not await tenants.revoke_key(deps.pool, key_id, now_s(), kind="admin"):
        raise _admin_key_not_found(key_id)
    deps.key_cache.clear()
    log.info("admin API key %s revoked", key_id)
    return DeletedAdminApiKey(id=key_id)


# Projects ------------------------------------------------------------------------------------


def project_from_row(row: tenants.Row) -> Project:
    archived = row["archived_at"] is not None
    return Project(
        id=row["id"],
        name=row["name"],
        created_at=row["created_at"],
        archived_at=row["archived_at"],
        status="archived" if archived else "active",
        max_batch_priority=row.get("max_batch_priority") or 0,
        share=float(row.get("share") or 1.0),
    )


@post("/organization/projects", status_code=200, opt=ADMIN)
async def create_project(data: CreateProjectRequest, deps: DepsParam) -> Project:
    row = await tenants.create_project(deps.pool, data.name, now_s())
    if data.share is not None:
        row = await tenants.set_share(deps.pool, row["id"], data.share) or row
    log.info("project %s created (%s)", row["id"], data.name)
    return project_from_row(row)


@get("/organization/projects", opt=ADMIN)
async def list_projects(
    deps: DepsParam,
    limit: Limit = 20,
    after: str | None = None,
    include_archived: bool = False,
) -> ProjectList:
    page = await tenants.list_projects(
        deps.pool, limit=limit, after=after, include_archived=include_archived
    )
    if page is None:
        raise NotFound(f"No such project: {after}", param="after")
    rows, has_more = page
    data = [project_from_row(r) for r in rows]
    return list_page(ProjectList, data, has_more)


@get("/organization/projects/{project_id:str}", opt=ADMIN)
async def retrieve_project(project_id: str, deps: DepsParam) -> Project:
    return project_from_row(await live_project(deps, project_id))


@post("/organization/projects/{project_id:str}", status_code=200, opt=ADMIN)
async def modify_project(project_id: str, data: UpdateProjectRequest, deps: DepsParam) -> Project:
    """A new name, and/or (jetbatch extensions) the highest priority its batches may ask for and
    its fair-share weight."""
    row = await live_project(deps, project_id)
    if data.max_batch_priority is not None:
        row = await tenants.set_max_batch_priority(deps.pool, project_id, data.max_batch_priority)
        log.info("project %s: max_batch_priority %d", project_id, data.max_batch_priority)
    if data.share is not None:
        row = await tenants.set_share(deps.pool, project_id, data.share)
        log.info("project %s: share %g", project_id, data.share)
    if data.name is not None:
        row = await tenants.rename_project(deps.pool, project_id, data.name)
    if row is None:
        raise project_not_found(project_id)
    return project_from_row(row)


@post("/organization/projects/{project_id:str}/archive", status_code=200, opt=ADMIN)
async def archive_project(project_id: str, deps: DepsParam) -> Project:
    """Its keys are revoked at once; its open batches run to their end."""
    row = await tenants.archive_project(deps.pool, project_id, now_s())
    if row is None:
        raise project_not_found(project_id)
    deps.key_cache.clear()  # here at once; other apis hear it from PostgreSQL (key_cache.py)
    log.info("project %s archived: its keys are revoked", project_id)
    return project_from_row(row)


# A project's webhook signing secret (jetbatch extension) -------------------------------------


def _secret(deps: DepsParam, row: tenants.Row) -> ProjectWebhookSecret:
    secret = row["webhook_secret"]
    if secret is None and tenants.is_default(row["id"]):
        secret = deps.settings.webhooks.secret  # the deployment's, until rotated here
    return ProjectWebhookSecret(
        project_id=row["id"], secret=secret, updated_at=row["webhook_secret_updated_at"]
    )


@get("/organization/projects/{project_id:str}/webhook_secret", opt=ADMIN)
async def retrieve_webhook_secret(project_id: str, deps: DepsParam) -> ProjectWebhookSecret:
    """What signs the project's batches' `metadata.webhook_url` deliveries."""
    return _secret(deps, await live_project(deps, project_id))


@post("/organization/projects/{project_id:str}/webhook_secret/rotate", status_code=200, opt=ADMIN)
async def rotate_webhook_secret(project_id: str, deps: DepsParam) -> ProjectWebhookSecret:
    """A new secret signs the project's next delivery attempts."""
    row = await tenants.rotate_webhook_secret(deps.pool, project_id, now_s())
    if row is None:
        raise project_not_found(project_id)
    log.info("project %s: webhook secret rotated", project_id)
    return _secret(deps, row)


ROUTES = [
    create_admin_key,
    list_admin_keys,
    retrieve_admin_key,
    delete_admin_key,
    create_project,
    list_projects,
    retrieve_project,
    modify_project,
    archive_project,
    retrieve_webhook_secret,
    rotate_webhook_secret,
]
