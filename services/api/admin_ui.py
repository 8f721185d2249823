"""`/admin`: the operators' page (README: Admin page), plain HTML, JS and CSS shipped in the package
(services/api/admin_page/), no build step and nothing from elsewhere.

- `GET /admin`: the page for an admin (an `Authorization: Bearer` admin key, or the session
  cookie), the login form for anyone else, a 403 page for a project key.
- `POST /admin/login` (`{"key": ...}`, JSON only): opens a session for an admin key
  (services/api/sessions.py) and sets its HttpOnly, SameSite=Strict cookie.
- `POST /admin/logout`: ends it (with its CSRF token, as every state-changing request).
- `GET /admin/static/{name}`: the page's scripts and styles.

The page then calls the `/v1` routes with the cookie; a batch's progress reaches it only through
`GET /v1/batches/{id}/events` (EventSource)."""

from __future__ import annotations

import hmac
import html
from functools import cache
from pathlib import Path
from typing import Any

from litestar import Request, Response, get, post
from litestar.datastructures import Cookie

from schemas.admin_session import AdminSession, LoginRequest
from services.api import sessions, tenants
from services.api.auth import Caller, Forbidden, forbidden, resolve
from services.api.deps import DepsParam
from services.api.store import now_s
from shared.errors import ApiError, NotFound, Unauthorized

PAGE_DIR = Path(__file__).resolve().parent / "admin_page"
STATIC = {
    "admin.js": "text/javascript; charset=utf-8",
    "admin.css": "text/css; charset=utf-8",
    "login.js": "text/javascript; charset=utf-8",
}
# Everything the page loads is its own: no inline script, no other origin.
HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; object-src 'none';"
    " base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


class UnsupportedMediaType(ApiError):
    status_code = 415
    default_code = "unsupported_media_type"


@cache
def _file(name: str) -> bytes:
    return (PAGE_DIR / name).read_bytes()


def _html(name: str, status_code: int = 200, **fills: str) -> Response[bytes]:
    body = _file(name).decode()
    for placeholder, value in fills.items():
        body = body.replace(f"{{{{{placeholder}}}}}", html.escape(value))
    return Response(
        body.encode(), status_code=status_code, media_type="text/html; charset=utf-8",
        headers=HEADERS,
    )  # fmt: skip


def _cookie(request: Request[Any, Any, Any], value: str, max_age: int) -> Cookie:
    https = request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"
    return Cookie(
        key=sessions.COOKIE, value=value, max_age=max_age, path="/", httponly=True,
        samesite="strict", secure=https,
    )  # fmt: skip


async def _viewer(request: Request[Any, Any, Any], deps: DepsParam) -> tuple[Caller, str] | None:
    """Who is looking, and the CSRF token the page must send (none without a session); None:
    nobody the api knows (the login form)."""
    header = request.headers.get("authorization")
    token = request.cookies.get(sessions.COOKIE)
    if header is None and token:
        session = await sessions.lookup(deps.pool, token, deps.settings.api_key, now_s())
        if session is None:
            return None
        return Caller(project_id="", admin=True, key_id=session.key_id), session.csrf_token
    try:
        return await resolve(deps, header), ""
    except Unauthorized:
        return None


@get("/admin", include_in_schema=False)
async def admin_page(request: Request[Any, Any, Any], deps: DepsParam) -> Response[bytes]:
    viewer = await _viewer(request, deps)
    if viewer is None:
        response = _html("login.html", refused="yes" if "authorization" in request.headers else "")
        if sessions.COOKIE in request.cookies:  # a session that ended: forget its cookie
            response.set_cookie(_cookie(request, "", 0))
        return response
    caller, csrf = viewer
    if not caller.admin:
        return _html("forbidden.html", 403)
    return _html("index.html", csrf_token=csrf)


@post("/admin/login", status_code=200, include_in_schema=False)
async def login(
    request: Request[Any, Any, Any], data: LoginRequest, deps: DepsParam
) -> Response[AdminSession]:
    """A session for an admin key: 401 for a key the api does not know, 403 for a project key."""
    if request.content_type[0] != "application/json":
        raise UnsupportedMediaType('log in with a JSON body: {"key": "..."}')
    now, configured = now_s(), deps.settings.api_key
    key_id: str | None = None
    if configured is None or not hmac.compare_digest(
        sessions.digest(data.key), sessions.digest(configured)
    ):  # not JETBATCH_API_KEY (an admin of the default project): a key of the database's
        row = await tenants.lookup_key(deps.pool, data.key, now)
        if row is None:
            raise Unauthorized("Incorrect API key provided", code="invalid_api_key")
        if row["kind"] != "admin":
            raise forbidden()
        key_id = row["id"]
    token, session = await sessions.create(
        deps.pool, key_id=key_id, env_key=configured if key_id is None else None, now=now
    )
    response = Response(AdminSession(csrf_token=session.csrf_token))
    response.set_cookie(_cookie(request, token, sessions.TTL_S))
    return response


@post("/admin/logout", status_code=200, include_in_schema=False)
async def logout(request: Request[Any, Any, Any], deps: DepsParam) -> Response[AdminSession]:
    token = request.cookies.get(sessions.COOKIE)
    deleted = False
    if token:
        session = await sessions.lookup(deps.pool, token, deps.settings.api_key, now_s())
        if session is not None:
            if not sessions.csrf_ok(session, request.headers.get(sessions.CSRF_HEADER)):
                raise Forbidden(
                    f"logging out needs the session's CSRF token in {sessions.CSRF_HEADER}",
                    code="csrf_token_invalid",
                )
            deleted = await sessions.delete(deps.pool, token)
    response = Response(AdminSession(deleted=deleted))
    response.set_cookie(_cookie(request, "", 0))
    return response


@get("/admin/static/{name:str}", include_in_schema=False)
async def static_file(name: str) -> Response[bytes]:
    media_type = STATIC.get(name)
    if media_type is None:
        raise NotFound(f"No such file: {name}", param="name")
    return Response(_file(name), media_type=media_type, headers=HEADERS)


ROUTES = [admin_page, login, logout, static_file]
