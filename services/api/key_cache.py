"""The api's cache of live API keys: a request with a project key is checked against PostgreSQL
once, not on every request (synchronous requests would otherwise wait on a database busy with a
batch's results, and every request would cost a query).

A key's end is heard at once, by every api: migration 015's triggers notify `jetbatch_keys` when
a change that can end a key's life commits (revoked, expiry set, deleted, its project archived),
whatever made it (any api's admin API, `jetbatch keys revoke`, plain SQL), and each api LISTENs
on a connection of its own and drops its whole cache (such changes are rare). The cache is used
only while that connection is up: before it listens, after it drops (it reconnects), and while a
link that went silent is found out (a check every CHECK_S), every request queries PostgreSQL
again. Entries also age out after TTL_S, and a key past its `expires_at` is never served from
here. A query that was running while the cache was dropped does not put its (maybe stale) row
back: entries carry the generation they were read in."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import asyncpg

log = logging.getLogger(__name__)

CHANNEL = "jetbatch_keys"
TTL_S = 30.0  # a backstop: the notifications end an entry's life first
CHECK_S = 5.0  # how often the listening connection is checked, and how soon it reconnects
MAX_ENTRIES = 10_000


class _Entry:
    __slots__ = ("row", "cached_at", "last_used")

    def __init__(self, row: Any, cached_at: float, last_used: int | None) -> None:
        self.row, self.cached_at, self.last_used = row, cached_at, last_used


class KeyCache:
    def __init__(self, ttl_s: float = TTL_S, max_entries: int = MAX_ENTRIES) -> None:
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self.live = False  # whether changes are being heard: the cache is used only then
        self.generation = 0  # bumped by every clear()
        self._entries: dict[bytes, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: bytes, now: int) -> Any | None:
        """The cached row of the key hashing to `digest`, if usable now."""
        if not self.live:
            return None
        entry = self._entries.get(digest)
        if entry is None:
            return None
        expires_at = entry.row["expires_at"]
        stale = time.monotonic() - entry.cached_at > self.ttl_s
        if stale or (expires_at is not None and expires_at <= now):
            del self._entries[digest]
            return None
        return entry.row

    def put(self, digest: bytes, row: Any, generation: int) -> None:
        """Cache `row`, read from PostgreSQL while the cache was at `generation`."""
        if not self.live or generation != self.generation:
            return  # dropped meanwhile: the row may be from before the change
        if len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]  # the oldest
        self._entries[digest] = _Entry(row, time.monotonic(), row["last_used_at"])

    def last_used(self, digest: bytes, read: int | None) -> int | None:
        """When the key was last recorded as used: `read` (its row's), or later by this api."""
        entry = self._entries.get(digest)
        return read if entry is None else entry.last_used

    def used(self, digest: bytes, now: int) -> None:
        entry = self._entries.get(digest)
        if entry is not None:
            entry.last_used = now

    def clear(self) -> None:
        self._entries.clear()
        self.generation += 1

    def _changed(self, *_: Any) -> None:  # asyncpg's listener callback
        self.clear()

    async def listen(self, database_url: str, stop: asyncio.Event) -> None:
        """Hear key changes until `stop`; the cache is live only while this listens."""
        while not stop.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(database_url, timeout=CHECK_S)
                await conn.add_listener(CHANNEL, self._changed)
                self.clear()  # what was cached before is from a time nobody listened
                self.live = True
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), CHECK_S)
                    await conn.fetchval("SELECT 1", timeout=CHECK_S)  # a dead link raises
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("api key changes not heard (%r): keys are read from PostgreSQL", e)
            finally:
                self.live = False
                self.clear()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), CHECK_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), CHECK_S)
