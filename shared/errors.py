"""Domain errors with the HTTP status and OpenAI error fields they map to. Controllers raise them;
one exception handler in the api turns them into `{"error": {message, type, param, code}}`."""

from __future__ import annotations


class ApiError(Exception):
    status_code = 400
    type = "invalid_request_error"
    headers: dict[str, str] | None = None  # extra response headers (retry-after, ...)

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequest(ApiError):
    status_code = 400


class Unauthorized(ApiError):
    status_code = 401
    type = "invalid_request_error"


class NotFound(ApiError):
    status_code = 404


class Conflict(ApiError):
    status_code = 409


class PayloadTooLarge(ApiError):
    status_code = 413


class RequestTimeout(ApiError):
    status_code = 408


class RateLimited(ApiError):
    status_code = 429
    type = "rate_limit_error"

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


class UpstreamTimeout(ApiError):
    status_code = 504
    type = "timeout"


# Text a caller sent, echoed into an error message or a stored list, is cut to this many
# characters: an 8 MB model name must not become an 8 MB error (README: Hostile input).
ECHO_CHARS = 128


def clip(text: str, limit: int = ECHO_CHARS) -> str:
    """`text` cut to `limit` characters, the cut marked."""
    return text if len(text) <= limit else text[:limit] + f"…(+{len(text) - limit} chars)"
