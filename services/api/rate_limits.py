"""OpenAI's per-project, per-model rate limits of synchronous requests (README: Limits):
`max_requests_per_1_minute`, `max_tokens_per_1_minute` and `max_requests_per_1_day`, set through
`/v1/organization/projects/{id}/rate_limits` (0 or unset = no limit). Batches are held to the
batch queue limit instead (services/api/token_limit.py), as on OpenAI.

Counted in fixed windows (the minute, the day) in PostgreSQL (`rate_usage`), so every api replica
counts against the same figures. A request is counted when it is admitted, with what it may cost
in tokens: its prompt estimated at 4 bytes a token plus its `max_completion_tokens` /
`max_tokens` (OpenAI counts the same way before the answer exists). A refused request is not
counted; it gets a 429 `rate_limit_exceeded` with `retry-after` (the window's end) and OpenAI's
`x-ratelimit-*` headers, which admitted requests carry too. A project without a limit for the
model pays one cached lookup, no write. Limits are read through a cache of LIMITS_TTL_S seconds:
a changed limit applies on every replica within that time (at once on the replica that set it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import asyncpg

from shared.errors import RateLimited

LIMITS_TTL_S = 2.0
MINUTE_S, DAY_S = 60, 86_400
UNLIMITED = 2**62
BYTES_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class Limits:
    """A project's limits for one model; 0 = none."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    requests_per_day: int = 0

    @property
    def any(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute or self.requests_per_day)


@dataclass(frozen=True, slots=True)
class Window:
    kind: str  # 'm' | 'd'
    start: int
    length_s: int
    max_requests: int
    max_tokens: int

    def reset_s(self, now: float) -> int:
        return max(1, math.ceil(self.start + self.length_s - now))


_ADMIT = """
INSERT INTO rate_usage AS u (project_id, model, window_kind, window_start, requests, tokens)
SELECT $1, $2, $3, $4, 1, $5::bigint WHERE 1 <= $6 AND $5::bigint <= $7
ON CONFLICT (project_id, model, window_kind, window_start) DO UPDATE
SET requests = u.requests + 1, tokens = u.tokens + EXCLUDED.tokens
WHERE u.requests + 1 <= $6 AND u.tokens + EXCLUDED.tokens <= $7
RETURNING requests, tokens
"""
_USED = (
    "SELECT requests, tokens FROM rate_usage"
    " WHERE project_id = $1 AND model = $2 AND window_kind = $3 AND window_start = $4"
)


def estimate_tokens(body: bytes, max_output: Any) -> int:
    """What a request may cost: its prompt at 4 bytes a token, plus the output it allows."""
    allowed = max_output if isinstance(max_output, int) and not isinstance(max_output, bool) else 0
    return math.ceil(len(body) / BYTES_PER_TOKEN) + max(0, allowed)


class RateLimiter:
    """Admits or refuses one api's synchronous requests against their project's limits."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._cache: dict[str, tuple[float, dict[str, Limits]]] = {}

    def forget(self, project_id: str) -> None:
        """The project's limits changed here: read them again on its next request."""
        self._cache.pop(project_id, None)

    async def limits(self, project_id: str, model: str) -> Limits:
        cached = self._cache.get(project_id)
        if cached is None or time.monotonic() - cached[0] > LIMITS_TTL_S:
            rows = await self.pool.fetch(
                "SELECT model, max_requests_per_1_minute, max_tokens_per_1_minute,"
                " max_requests_per_1_day FROM project_rate_limits WHERE project_id = $1",
                project_id,
            )
            by_model = {
                r["model"]: Limits(
                    r["max_requests_per_1_minute"] or 0,
                    r["max_tokens_per_1_minute"] or 0,
                    r["max_requests_per_1_day"] or 0,
                )
                for r in rows
            }
            cached = (time.monotonic(), by_model)
            self._cache[project_id] = cached
        return cached[1].get(model, Limits())

    async def admit(
        self, project_id: str, model: str, tokens: int, now: float | None = None
    ) -> dict[str, str]:
        """Count one request of `tokens` against the project's limits for `model`, or raise
        RateLimited (nothing counted). Returns the `x-ratelimit-*` headers for the answer."""
        limits = await self.limits(project_id, model)
        if not limits.any:
            return {}
        now = time.time() if now is None else now
        windows = _windows(limits, now)
        async with self.pool.acquire() as conn, conn.transaction():
            used: dict[str, tuple[int, int]] = {}
            for w in windows:
                row = await conn.fetchrow(
                    _ADMIT, project_id, model, w.kind, w.start, tokens,
                    w.max_requests, w.max_tokens,
                )  # fmt: skip
                if row is None:
                    before = await conn.fetchrow(_USED, project_id, model, w.kind, w.start)
                    had = (before["requests"], before["tokens"]) if before else (0, 0)
                    raise _refusal(model, w, had, tokens, now)
                used[w.kind] = (row["requests"], row["tokens"])
        return _headers(windows, used, now)


def _windows(limits: Limits, now: float) -> list[Window]:
    windows = []
    if limits.requests_per_minute or limits.tokens_per_minute:
        windows.append(
            Window(
                "m",
                int(now) // MINUTE_S * MINUTE_S,
                MINUTE_S,
                limits.requests_per_minute or UNLIMITED,
                limits.tokens_per_minute or UNLIMITED,
            )  # fmt: skip
        )
    if limits.requests_per_day:
        windows.append(
            Window("d", int(now) // DAY_S * DAY_S, DAY_S, limits.requests_per_day, UNLIMITED)
        )
    return windows


def _refusal(model: str, w: Window, had: tuple[int, int], tokens: int, now: float) -> RateLimited:
    requests_used, tokens_used = had
    reset = w.reset_s(now)
    if w.kind == "d":
        what, limit, used, asked = "requests per day (RPD)", w.max_requests, requests_used, 1
    elif requests_used + 1 > w.max_requests:
        what, limit, used, asked = "requests per min (RPM)", w.max_requests, requests_used, 1
    else:
        what, limit, used, asked = "tokens per min (TPM)", w.max_tokens, tokens_used, tokens
    if asked > limit:
        message = (
            f"Request too large for {model} on {what}: Limit {limit}, Requested {asked}. The"
            " input or `max_tokens` must be reduced in order to run successfully."
        )
    else:
        message = (
            f"Rate limit reached for {model} on {what}: Limit {limit}, Used {used}, Requested"
            f" {asked}. Please try again in {reset}s."
        )
    error = RateLimited(message, code="rate_limit_exceeded", retry_after_s=reset)
    error.headers = {**getattr(error, "headers", {}), **_limit_headers(w, used, now)}
    return error


def _limit_headers(w: Window, used_requests: int, now: float) -> dict[str, str]:
    if w.max_requests >= UNLIMITED:
        return {}
    return {
        "x-ratelimit-limit-requests": str(w.max_requests),
        "x-ratelimit-remaining-requests": str(max(0, w.max_requests - used_requests)),
        "x-ratelimit-reset-requests": f"{w.reset_s(now)}s",
    }


def _headers(windows: list[Window], used: dict[str, tuple[int, int]], now: float) -> dict[str, str]:
    """OpenAI's headers: requests from the tightest window that has a request limit, tokens
    from the minute's."""
    headers: dict[str, str] = {}
    for w in windows:
        requests, tokens = used[w.kind]
        if not headers:
            headers.update(_limit_headers(w, requests, now))
        if w.kind == "m" and w.max_tokens < UNLIMITED:
            headers["x-ratelimit-limit-tokens"] = str(w.max_tokens)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, w.max_tokens - tokens))
            headers["x-ratelimit-reset-tokens"] = f"{w.reset_s(now)}s"
    return headers
