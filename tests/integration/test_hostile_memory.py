"""Hostile input never grows the api's memory with what is sent (README: Hostile input): a real
api process (tests/harness.py) takes round after round of the largest bodies it accepts, bodies
over its limits and garbage uploads; its resident memory, measured after the first rounds and
again after ten times as many bytes, stays flat. What one request may hold at once is bounded by
the limits; what many requests send in all must not add up."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from shared.embedded import EmbeddedNats
from tests.harness import API_KEY, Harness
from tests.helpers import CHAT_MODEL

MB = 1024 * 1024
MAX_FILE = 4 * MB
WARM_ROUNDS, ROUNDS = 2, 12
# Allocator slack: freed memory is not always handed back to the system at once.
FLAT_MB = 40


@pytest.fixture
def harness(nats_server: EmbeddedNats, database_url: str, tmp_path: Path) -> Iterator[Harness]:
    env = {"JETBATCH_MAX_FILE_BYTES": str(MAX_FILE), "JETBATCH_MAX_BATCH_LINES": "1000"}
    h = Harness(tmp_path / "harness", env, nats=nats_server, database_url=database_url)
    h.start_servers()
    h.start("api")
    h.wait_api()
    yield h
    h.stop_all()


def hostile_round(http: httpx.Client, n: int) -> int:
    """One round of bad input; every answer is a clear 4xx/5xx, never a 500. Returns the bytes
    sent."""
    long_string = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x" * (7 * MB)}]}
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    wide = json.dumps({"model": CHAT_MODEL, "input": [[1] * 4096] * 200}).encode()
    over = b"{" + b" " * (9 * MB) + b"}"
    bodies = [json.dumps(long_string).encode(), deep, wide, over]
    sent = 0
    for body in bodies:
        r = http.post(
            "/chat/completions", content=body, headers={"content-type": "application/json"}
        )
        assert 400 <= r.status_code < 600 and r.status_code != 500, r.text[:300]
        assert r.json()["error"]["code"], r.text[:300]
        sent += len(body)
    garbage = b"".join(
        b'{"custom_id": "%d", "method": "POST"' % i + b"\xff" * 300 + b"\n" for i in range(1000)
    )
    big = (b'{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{}}\n' * 100_000)[
        : MAX_FILE + MB
    ]
    for content in (garbage, big):
        r = http.post("/files", files={"file": (f"h{n}.jsonl", content)}, data={"purpose": "batch"})
        assert r.status_code in (200, 400, 413), r.text[:300]  # stored, refused or too large
        sent += len(content)
    return sent


def test_memory_stays_flat_whatever_is_sent(harness: Harness) -> None:
    api = psutil.Process(harness.procs["api"].pid)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=harness.base_url, headers=auth, timeout=60) as http:
        for n in range(WARM_ROUNDS):
            hostile_round(http, n)
        warm = api.memory_info().rss
        sent = sum(hostile_round(http, n) for n in range(WARM_ROUNDS, ROUNDS))
        after = api.memory_info().rss
    grown_mb = (after - warm) / MB
    assert sent > 200 * MB
    assert grown_mb < FLAT_MB, (
        f"api RSS grew {grown_mb:.0f} MB over {sent / MB:.0f} MB of hostile input"
        f" ({warm / MB:.0f} -> {after / MB:.0f} MB)"
    )
    assert harness.procs["api"].poll() is None
