"""Every error the api answers, in OpenAI's shape `{"error": {message, type, param, code}}`.

Handlers only raise (shared.errors.ApiError or Litestar's own exceptions); the functions here,
registered once on the app, turn each into a response the OpenAI SDKs map to the right class
(BadRequestError, AuthenticationError, NotFoundError, ...)."""

from __future__ import annotations

import logging
import re
from typing import Any

import asyncpg
import msgspec.inspect as mi
import nats.errors
import nats.js.errors
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from schemas.openai import ErrorDetail, ErrorResponse
from shared.bus.streams import store_full
from shared.errors import ApiError, clip

log = logging.getLogger(__name__)

_MISSING_FIELD = re.compile(r"missing required field `([^`]+)`")
_ENUM_VALUE = re.compile(r"Invalid enum value (.+)")
# msgspec's path to a dict value (`metadata[...]`) or a list item (`[3]`): param names the field.
_INDEX = re.compile(r"\[[^\]]*\]")

# OpenAI's `type` for a status code without a more specific one.
_TYPES = {401: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}
# The SDKs retry 409 (and 5xx) by default; a wrong-state 409 or an oversize body never heals.
_NO_RETRY = {409, 413}
# Every message is cut to this length, whatever it echoes (README: Hostile input).
MAX_MESSAGE_CHARS = 1024


class BadGateway(ApiError):
    status_code = 502
    type = "server_error"
    default_code = "bad_worker_reply"


# The code of an answer no more specific code was given for (README: Error codes).
_DEFAULT_CODES = {
    400: "invalid_request", 401: "invalid_api_key", 403: "insufficient_permissions",
    404: "not_found", 405: "method_not_allowed", 408: "request_timeout", 409: "invalid_state",
    413: "payload_too_large", 415: "unsupported_media_type", 429: "rate_limit_exceeded",
    431: "headers_too_large", 503: "unavailable", 504: "timeout",
}  # fmt: skip


def error_type(status_code: int) -> str:
    if status_code in _TYPES:
        return _TYPES[status_code]
    return "server_error" if status_code >= 500 else "invalid_request_error"


def error_response(
    status_code: int,
    message: str,
    *,
    type_: str | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response[ErrorResponse]:
    headers = dict(headers or {})
    if status_code in _NO_RETRY:
        headers["x-should-retry"] = "false"
    body = ErrorResponse(
        error=ErrorDetail(
            message=clip(message, MAX_MESSAGE_CHARS),
            type=type_ or error_type(status_code),
            param=clip(param) if param else param,
            code=code
            or _DEFAULT_CODES.get(status_code)
            or ("internal_error" if status_code >= 500 else "invalid_request"),
        )
    )
    return Response(body, status_code=status_code, headers=headers)


def on_api_error(_: Request[Any, Any, Any], exc: ApiError) -> Response[ErrorResponse]:
    return error_response(
        exc.status_code,
        exc.message,
        type_=exc.type,
        param=exc.param,
        code=exc.code,
        headers=exc.headers,
    )


def on_too_deep(request: Request[Any, Any, Any], exc: RecursionError) -> Response[ErrorResponse]:
    """A JSON body nested deeper than the decoder goes (msgspec raises RecursionError)."""
    return error_response(400, "the JSON body is nested too deeply", code="invalid_json")


# Text PostgreSQL refuses: a NUL character (in text or as \u0000 in JSONB) or an invalid byte
# sequence. Whatever route it came through, it is the caller's input: 400, never a 500.
_BAD_TEXT = (asyncpg.CharacterNotInRepertoireError, asyncpg.UntranslatableCharacterError)


def on_database_error(
    request: Request[Any, Any, Any], exc: asyncpg.PostgresError
) -> Response[ErrorResponse]:
    if isinstance(exc, _BAD_TEXT):
        message = "the request holds text that cannot be stored (a NUL character or invalid text)"
        return error_response(400, message, code="invalid_text")
    return on_unexpected(request, exc)


def on_validation_error(
    request: Request[Any, Any, Any], exc: ValidationException
) -> Response[ErrorResponse]:
    """Bad query/path parameters or a request body that does not decode to its Struct."""
    problems = exc.extra if isinstance(exc.extra, list) else []
    first = problems[0] if problems and isinstance(problems[0], dict) else {}
    param = first.get("key") or None
    message = first.get("message") or exc.detail
    code = None
    if param == "data":  # the body as a whole: a missing field is named only in the message
        missing = _MISSING_FIELD.search(message)
        param = missing.group(1) if missing else None
    elif param:
        param = _INDEX.sub("", param)
        if first.get("source") == "body":
            field_type = body_field_type(request, param)
            if isinstance(field_type, mi.Metadata):  # Meta(extra=...): the type's own error code
                code = (field_type.extra or {}).get("error_code")
                field_type = field_type.type
            message = explain(param, message, field_type)
    if param and param not in message:
        message = f"{message} (parameter {param!r})"
    return error_response(400, message, param=param, code=code or "invalid_parameter")


def explain(param: str, problem: str, field_type: mi.Type | None) -> str:
    """msgspec's terse problem ("Expected `str` of length <= 64") and what the field accepts,
    read from its type: the constraints are written once, in schemas/."""
    if isinstance(field_type, mi.LiteralType) and (enum := _ENUM_VALUE.fullmatch(problem)):
        supported = ", ".join(str(v) for v in field_type.values)
        return (
            f"{param} {enum.group(1)} is not supported by this deployment (supported: {supported})"
        )
    accepts = describe(field_type) if _constrained(field_type) else None
    return f"Invalid {param}: {problem}; {param} must be {accepts}" if accepts else problem


def body_field_type(request: Request[Any, Any, Any], param: str) -> mi.Type | None:
    """The type of the request body's field at dotted path `param`, optional unwrapped."""
    data = request.route_handler.parsed_data_field
    if data is None:
        return None
    try:
        field_type: mi.Type | None = mi.type_info(data.annotation)
    except TypeError:  # not a type msgspec knows (a DTO): nothing to add
        return None
    for name in param.split("."):
        struct = _non_null(field_type)
        if not isinstance(struct, mi.StructType):
            return None
        field_type = next((f.type for f in struct.fields if f.encode_name == name), None)
    return _non_null(field_type)


def describe(t: mi.Type | None, *, plural: bool = False) -> str | None:
    """What a value of type `t` must be, in words ("a string of at most 64 characters")."""
    if isinstance(t, mi.StrType):
        limit = f" of at most {t.max_length} characters" if t.max_length is not None else ""
        return ("strings" if plural else "a string") + limit
    if isinstance(t, mi.IntType):
        if t.ge is not None and t.le is not None:
            limit = f" from {t.ge} to {t.le}"
        else:
            limit = "".join(
                f" {op} {v}"
                for op, v in ((">=", t.ge), (">", t.gt), ("<=", t.le), ("<", t.lt))
                if v is not None
            )
        return ("integers" if plural else "an integer") + limit
    if isinstance(t, mi.LiteralType):
        return "one of " + ", ".join(str(v) for v in t.values)
    if isinstance(t, mi.DictType):
        size = f" of at most {t.max_length} pairs" if t.max_length is not None else ""
        key, value = describe(t.key_type, plural=True), describe(t.value_type, plural=True)
        items = f", its keys {key} and its values {value}" if key and value else ""
        return ("objects" if plural else "an object") + size + items
    return None


def _constrained(t: mi.Type | None) -> bool:
    """Whether the type says more than msgspec's message does (not so for a bare `str`)."""
    if isinstance(t, (mi.LiteralType, mi.DictType)):
        return True
    limits = ("min_length", "max_length", "pattern", "ge", "gt", "le", "lt")
    return any(getattr(t, a, None) is not None for a in limits)


def _non_null(t: mi.Type | None) -> mi.Type | None:
    if isinstance(t, mi.UnionType):
        types = [u for u in t.types if not isinstance(u, mi.NoneType)]
        return types[0] if len(types) == 1 else t
    return t


def on_http_exception(
    request: Request[Any, Any, Any], exc: HTTPException
) -> Response[ErrorResponse]:
    """Litestar's own: unknown route (404), wrong method (405), undecodable body (400),
    body too large (413), and the like."""
    status = exc.status_code
    if status >= 500:
        log.error("%s %s: %s", request.method, request.url.path, exc.detail, exc_info=exc)
        return error_response(status, "internal error")
    if status == 404:
        message = f"Unknown request URL: {request.method} {request.url.path}."
        return error_response(404, message, code="unknown_url")
    if status == 405:
        message = f"Method {request.method} is not allowed for {request.url.path}."
        return error_response(405, message, headers=exc.headers)
    return error_response(status, str(exc.detail), headers=exc.headers)


# NATS answers that heal by themselves: no quorum (a majority of a cluster's nodes down, or
# mid-election past the writes' own retries), a server not answering, the connection between
# servers of its list. The SDKs retry a 503 after Retry-After.
_BUS_DOWN = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
)
BUS_RETRY_AFTER_S = 5


def on_bus_error(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorResponse]:
    """NATS/JetStream failures: 503 with a stable code when they heal by themselves, else 500."""
    headers = {"retry-after": str(BUS_RETRY_AFTER_S)}
    if store_full(exc):
        log.error("%s %s: JetStream store full: %s", request.method, request.url.path, exc)
        message = "The message store is full; try again once space is freed."
        return error_response(503, message, code="jetstream_storage_full", headers=headers)
    if isinstance(exc, _BUS_DOWN):
        log.error("%s %s: JetStream unavailable: %r", request.method, request.url.path, exc)
        message = "JetStream is unavailable (no quorum or no server); try again shortly."
        return error_response(503, message, code="jetstream_unavailable", headers=headers)
    return on_unexpected(request, exc)


def on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorResponse]:
    log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(HTTP_500_INTERNAL_SERVER_ERROR, "internal error")


EXCEPTION_HANDLERS = {
    ApiError: on_api_error,
    ValidationException: on_validation_error,
    HTTPException: on_http_exception,
    nats.errors.Error: on_bus_error,
    RecursionError: on_too_deep,
    asyncpg.PostgresError: on_database_error,
    Exception: on_unexpected,
}
