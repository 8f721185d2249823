"""How many synchronous requests one api process runs at once, in all and per caller
(README: Hostile input). Past either cap the request is refused at once with 429 and
`retry-after`, before it costs a worker anything."""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

from litestar.connection import ASGIConnection

from shared.errors import RateLimited

RETRY_AFTER_S = 1


def caller_of(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """Who a request counts against: its project (the auth guard names the caller), or, on an
    api serving without keys, a hash of whatever key it sent."""
    caller = getattr(connection.state, "caller", None)
    if caller is not None and not caller.admin:
        return f"project:{caller.project_id}"
    given = connection.headers.get("authorization") or ""
    return "key:" + hashlib.sha256(given.encode("utf-8", "surrogateescape")).hexdigest()[:16]


class SyncSlots:
    def __init__(self, per_api: int, per_caller: int) -> None:
        self.per_api = per_api
        self.per_caller = per_caller
        self.running = 0
        self._by_caller: Counter[str] = Counter()

    @contextlib.contextmanager
    def take(self, caller: str) -> Iterator[None]:
        if self.running >= self.per_api:
            raise RateLimited(
                f"this server is already running {self.per_api} synchronous requests, the most"
                " it runs at once; retry shortly",
                code="too_many_concurrent_requests",
                retry_after_s=RETRY_AFTER_S,
            )
        if self._by_caller[caller] >= self.per_caller:
            raise RateLimited(
                f"this key already has {self.per_caller} synchronous requests running on this"
                " server, the most it may; retry when one has finished",
                code="too_many_concurrent_requests",
                retry_after_s=RETRY_AFTER_S,
            )
        self.running += 1
        self._by_caller[caller] += 1
        try:
            yield
        finally:
            self.running -= 1
            self._by_caller[caller] -= 1
            if not self._by_caller[caller]:
                del self._by_caller[caller]
