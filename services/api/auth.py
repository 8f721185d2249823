"""Who is calling: the `Caller` of every `/v1` request, resolved once by the guard below from its
`Authorization: Bearer <key>` and injected into handlers as `caller` (README: Projects and keys).

- A project key (a service account's) acts for its project: every query is scoped to it, another
  project's ids answer as unknown ids do, and operator routes (`opt={"admin": True}`) are a 403.
- An admin key (`/v1/organization/admin_api_keys`, or JETBATCH_API_KEY) may do everything: it
  manages projects and keys, reads every project's work, and creates in the default project.
- No key configured and none ever created: every request is an admin of the default project
  (the api warns at start), as before projects existed.
- No Authorization header but the admin page's session cookie (sessions.py): the admin key the
  session was opened with, looked up again; a state-changing request needs its CSRF token too.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.handlers import BaseRouteHandler

from schemas.projects import DEFAULT_PROJECT_ID
from services.api import sessions, tenants
from services.api.deps import Deps
from services.api.store import now_s
from shared.errors import ApiError, Unauthorized

log = logging.getLogger(__name__)

ADMIN = {"admin": True}  # a route handler's `opt` for operator routes


class Forbidden(ApiError):
    """OpenAI's answer to a key without the permission a route needs."""

    status_code = 403
    type = "invalid_request_error"


@dataclass(frozen=True, slots=True)
class Caller:
    project_id: str  # where what it creates goes
    admin: bool
    key_id: str | None = None  # None: JETBATCH_API_KEY, or no auth at all

    @property
    def scope(self) -> str | None:
        """The project its reads are limited to; None: every project (an admin)."""
        return None if self.admin else self.project_id


ANONYMOUS = Caller(project_id=DEFAULT_PROJECT_ID, admin=True)


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, key = header.partition(" ")
    return (key.strip() or None) if scheme.lower() == "bearer" else None


async def resolve(deps: Deps, header: str | None) -> Caller:
    """The Caller for an Authorization header, or a 401."""
    key = bearer(header)
    configured = deps.settings.api_key
    if key is not None and configured and hmac.compare_digest(key.encode(), configured.encode()):
        return Caller(project_id=DEFAULT_PROJECT_ID, admin=True)
    if key is not None and len(key) <= 512:
        row = await tenants.lookup_key(deps.pool, key, now_s(), deps.key_cache)
        if row is not None:
            if row["kind"] == "admin":
                return Caller(project_id=DEFAULT_PROJECT_ID, admin=True, key_id=row["id"])
            return Caller(project_id=row["project_id"], admin=False, key_id=row["id"])
    if configured is None and not await _keys_exist(deps):
        return ANONYMOUS
    if key is None:
        raise Unauthorized(
            "You didn't provide an API key: send it as 'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )
    raise Unauthorized("Incorrect API key provided", code="invalid_api_key")


async def _keys_exist(deps: Deps) -> bool:
    # Once a key exists it always will (revoked keys are kept): only asked until then.
    if not deps.keys_exist:
        deps.keys_exist = await tenants.any_keys(deps.pool)
    return deps.keys_exist


def forbidden(what: str = "api.management.read") -> Forbidden:
    return Forbidden(
        "You have insufficient permissions for this operation. Missing scopes: "
        f"{what}. This route needs an admin key.",
        code="insufficient_permissions",
    )


async def from_session(deps: Deps, connection: ASGIConnection[Any, Any, Any, Any]) -> Caller:
    """The admin an admin page session cookie stands for (services/api/sessions.py), or a 401;
    a state-changing request must also carry the session's CSRF token (else a 403)."""
    session = await sessions.lookup(
        deps.pool, connection.cookies[sessions.COOKIE], deps.settings.api_key, now_s()
    )
    if session is None:
        raise Unauthorized("Your admin page session has ended: log in again", code="session_ended")
    method = connection.scope.get("method", "GET")
    if method not in sessions.SAFE_METHODS and not sessions.csrf_ok(
        session, connection.headers.get(sessions.CSRF_HEADER)
    ):
        raise Forbidden(
            f"A request made with the admin page's session cookie must carry its CSRF token in"
            f" {sessions.CSRF_HEADER}",
            code="csrf_token_invalid",
        )
    return Caller(project_id=DEFAULT_PROJECT_ID, admin=True, key_id=session.key_id)


async def authenticate(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """The guard of every `/v1` route: resolves the Caller and refuses a project key on an
    operator route."""
    deps: Deps = connection.app.state.deps
    header = connection.headers.get("authorization")
    if header is None and sessions.COOKIE in connection.cookies:
        caller = await from_session(deps, connection)
    else:
        caller = await resolve(deps, header)
    if handler.opt.get("admin") and not caller.admin:
        raise forbidden()
    connection.state.caller = caller


def get_caller(request: Request[Any, Any, Any]) -> Caller:
    caller: Caller = request.state.caller
    return caller


# How route handlers ask for the Caller.
CallerParam = NamedDependency[Caller]
