"""What synchronous requests used, for the usage and costs API (`batch=false`; README: Usage and
costs). Each answer is added up in memory per project, model, key, endpoint and minute, and the
sums are upserted into `sync_usage_minutes` every FLUSH_S seconds and when the api stops: a
request costs no database round trip. A crash loses at most the last FLUSH_S seconds of these
figures (the requests themselves were answered); a flush that fails keeps its sums for the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict

import asyncpg

log = logging.getLogger(__name__)

FLUSH_S = 5.0
# project, model, key id ('' = none), endpoint, minute
Key = tuple[str, str, str, str, int]
# requests, failed, input, cached, output tokens, gpu ms
_FIELDS = 6

_UPSERT = """
INSERT INTO sync_usage_minutes AS u (project_id, model, api_key_id, endpoint, minute, requests,
    failed, input_tokens, cached_tokens, output_tokens, gpu_ms)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::int[],
    $7::int[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[])
ON CONFLICT (project_id, model, api_key_id, endpoint, minute) DO UPDATE SET
    requests = u.requests + EXCLUDED.requests, failed = u.failed + EXCLUDED.failed,
    input_tokens = u.input_tokens + EXCLUDED.input_tokens,
    cached_tokens = u.cached_tokens + EXCLUDED.cached_tokens,
    output_tokens = u.output_tokens + EXCLUDED.output_tokens,
    gpu_ms = u.gpu_ms + EXCLUDED.gpu_ms
"""


class SyncUsage:
    def __init__(self) -> None:
        self._sums: defaultdict[Key, list[int]] = defaultdict(lambda: [0] * _FIELDS)

    def add(
        self,
        key: tuple[str, str, str | None, str],
        *,
        ok: bool,
        input_tokens: int,
        cached_tokens: int,
        output_tokens: int,
        gpu_ms: int,
        now: float | None = None,
    ) -> None:
        """One answered request of (project, model, key id, endpoint)."""
        project, model, key_id, endpoint = key
        minute = int(time.time() if now is None else now) // 60 * 60
        sums = self._sums[(project, model, key_id or "", endpoint, minute)]
        sums[0 if ok else 1] += 1
        for i, n in enumerate((input_tokens, cached_tokens, output_tokens, gpu_ms), start=2):
            sums[i] += n

    async def flush(self, pool: asyncpg.Pool) -> int:
        """Write what was added since the last flush; returns how many rows it upserted."""
        if not self._sums:
            return 0
        taken, self._sums = self._sums, defaultdict(lambda: [0] * _FIELDS)
        keys, sums = list(taken), list(taken.values())
        columns = [list(c) for c in zip(*keys, strict=True)]
        columns += [list(c) for c in zip(*sums, strict=True)]
        try:
            await pool.execute(_UPSERT, *columns)
        except BaseException:
            for key, values in taken.items():  # kept for the next flush
                mine = self._sums[key]
                for i, n in enumerate(values):
                    mine[i] += n
            raise
        return len(keys)

    async def flush_every(self, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
        """Flush every FLUSH_S until `stop`, then once more."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), FLUSH_S)
            try:
                await self.flush(pool)
            except Exception as e:
                log.warning("synchronous usage not written yet (next try in %gs): %r", FLUSH_S, e)
