"""services/api/key_cache.py without servers: when a cached key may be served, and when not."""

from __future__ import annotations

import time

from services.api.key_cache import KeyCache

NOW = 1_800_000_000


def row(expires_at: int | None = None, last_used_at: int | None = None) -> dict[str, object]:
    return {"id": "key_1", "expires_at": expires_at, "last_used_at": last_used_at}


def live_cache(**kwargs: float) -> KeyCache:
    cache = KeyCache(**kwargs)  # type: ignore[arg-type]
    cache.live = True
    return cache


def test_a_key_is_served_from_the_cache_only_while_changes_are_heard() -> None:
    cache = KeyCache()
    cache.put(b"d", row(), cache.generation)
    assert cache.get(b"d", NOW) is None and len(cache) == 0  # not listening: nothing is kept
    cache.live = True
    cache.put(b"d", row(), cache.generation)
    assert cache.get(b"d", NOW) == row()
    cache.live = False  # the listening connection dropped
    assert cache.get(b"d", NOW) is None


def test_a_row_read_before_a_change_was_heard_is_not_cached() -> None:
    cache = live_cache()
    generation = cache.generation  # a query starts...
    cache.clear()  # ...a key is revoked meanwhile...
    cache.put(b"d", row(), generation)  # ...and its answer comes back: maybe stale
    assert cache.get(b"d", NOW) is None


def test_an_expired_key_or_an_old_entry_is_not_served() -> None:
    cache = live_cache()
    cache.put(b"soon", row(expires_at=NOW + 1), cache.generation)
    assert cache.get(b"soon", NOW) is not None
    assert cache.get(b"soon", NOW + 1) is None and len(cache) == 0
    short = live_cache(ttl_s=0.01)
    short.put(b"d", row(), short.generation)
    time.sleep(0.02)
    assert short.get(b"d", NOW) is None


def test_the_cache_is_bounded_and_remembers_when_a_key_was_last_recorded_used() -> None:
    cache = live_cache(max_entries=2)
    for digest in (b"a", b"b", b"c"):
        cache.put(digest, row(last_used_at=NOW - 600), cache.generation)
    assert len(cache) == 2 and cache.get(b"a", NOW) is None  # the oldest went
    assert cache.last_used(b"b", NOW - 600) == NOW - 600
    cache.used(b"b", NOW)
    assert cache.last_used(b"b", NOW - 600) == NOW
    assert cache.last_used(b"gone", 5) == 5
