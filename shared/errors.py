"""Domain errors with the HTTP status and OpenAI error fields they map to. Controllers raise them;
one exception handler in the api turns them into `{"error": {message, type, param, code}}`."""

from __future__ import annotations


class ApiError(Exception):
    """An error a caller gets. Every one carries a stable `code` (README: Error codes): the one
    it was raised with, else its class's `default_code`."""

    status_code = 400
    type = "invalid_request_error"
    default_code = "invalid_request"
    headers: dict[str, str] | None = None  # extra response headers (retry-after, ...)

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code


class InvalidRequest(ApiError):
    status_code = 400


class Unauthorized(ApiError):
    status_code = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class NotFound(ApiError):
    status_code = 404
    default_code = "not_found"


class Conflict(ApiError):
    status_code = 409
    default_code = "invalid_state"


class PayloadTooLarge(ApiError):
    status_code = 413
    default_code = "payload_too_large"


class RequestTimeout(ApiError):
    status_code = 408
    default_code = "request_timeout"


class RateLimited(ApiError):
    status_code = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code)
        if retry_after_s is not None:
            self.headers = {"retry-after": str(retry_after_s)}


class Unavailable(ApiError):
    status_code = 503
    type = "service_unavailable"
    default_code = "unavailable"


class UpstreamTimeout(ApiError):
    status_code = 504
    type = "timeout"
    default_code = "worker_timeout"


# Text a caller sent, echoed into an error message or a stored list, is cut to this many
# characters: an 8 MB model name must not become an 8 MB error (README: Hostile input).
ECHO_CHARS = 128


def clip(text: str, limit: int = ECHO_CHARS) -> str:
    """`text` cut to `limit` characters, the cut marked."""
    return text if len(text) <= limit else text[:limit] + f"…(+{len(text) - limit} chars)"
