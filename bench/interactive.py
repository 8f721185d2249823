"""4. Interactive under load: latency of synchronous `POST /v1/chat/completions` (instant
engine, whole `jetbatch up` stack) with a project's API key, one request at a time over a
kept-alive connection, first
with the system idle (the baseline), then while a 50,000-line batch is validated, published,
run and written; then the floor (bench/echo.py: a bare NATS request/reply between two plain
processes) idle and under a second batch of the same file. Targets: p99 under load at most 2x
the floor's p99 under the same load (the issue's), and at most 2x jetbatch's own p99 idle.
Then a second reference, idle and under a third batch: the floor's responder behind a bare HTTP
relay (bench/echo.py: uvicorn, httptools and uvloop as the api runs, a plain ASGI callable, no
jetbatch code), timed with the same client: every hop a synchronous request takes and nothing
else, so `http_relay_vs_floor` is what the HTTP hop itself costs and `p99_vs_http_relay` what
jetbatch's own code does.

On two busy cores one round's ratio moves by a third from run to run (README Performance): with
`--repeat N`, N rounds of the load and then the references' loads run in a row, every round's
ratios are printed, and the figures are those of the round with the median ratio to the
floor."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench import echo
from bench.common import (
    CHAT_MODEL,
    admin_nats_url,
    client_gc_paused,
    percentile,
    quiet_machine,
    running_system,
    scratch,
    show,
    write_chat_file,
    write_result,
)
from bench.sampling import ForeignLoad

TARGET_P99_FACTOR = 2.0  # p99 under load / p99 idle
TARGET_FLOOR_FACTOR = 2.0  # p99 under load / the bare NATS floor's p99 under the same load
LINES = 50_000
IDLE_REQUESTS = 2_000
WARMUP_REQUESTS = 200
POLL_S = 0.2
_ENDED = ("completed", "failed", "expired", "cancelled")

_BODY = {
    "model": CHAT_MODEL,
    "messages": [{"role": "user", "content": "How long does a batch of fifty thousand take?"}],
    "max_tokens": 16,
}


def _one(http: httpx.Client) -> float:
    started = time.perf_counter()
    response = http.post("/chat/completions", json=_BODY)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"sync request failed: {response.status_code} {response.text[:200]}")
    return elapsed * 1000


def _stats(ms: list[float]) -> dict[str, float]:
    return {
        "requests": len(ms),
        "p50_ms": round(percentile(ms, 50), 2),
        "p90_ms": round(percentile(ms, 90), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(max(ms), 2),
    }


class _BatchStatus:
    """A batch's status, read between timed requests from the timing thread itself (a watcher
    thread in this process would hold the GIL now and then while a timed request's answer waits
    for it, and its latency would be the client's, not jetbatch's), at most every POLL_S."""

    def __init__(self, client: Any, batch_id: str) -> None:
        self._client, self._batch_id = client, batch_id
        self.phase = "validating"
        self._next = time.perf_counter() + POLL_S

    def ended(self) -> bool:
        if time.perf_counter() >= self._next:
            self.phase = self._client.batches.retrieve(self._batch_id).status
            self._next = time.perf_counter() + POLL_S
        return self.phase in _ENDED


@dataclass
class _References:
    """What a synchronous request is measured against, each idle and under a batch of the file:
    the floor (bare NATS request/reply, bench/echo.py) and the same behind a bare HTTP relay."""

    floor_idle: list[float]
    floor_loaded: list[float]
    relay_idle: list[float] = field(default_factory=list)
    relay_loaded: list[float] = field(default_factory=list)


def _under_batch(
    client: Any, input_file_id: str, timed: Callable[[_BatchStatus], list[float]]
) -> list[float]:
    """`timed(status)` while a batch of the file runs, which must complete."""
    batch = client.batches.create(
        input_file_id=input_file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    status = _BatchStatus(client, batch.id)
    with client_gc_paused():
        ms = timed(status)
    if status.phase != "completed":
        raise RuntimeError(f"a load batch ended {status.phase}")
    return ms


def _references(system: Any, client: Any, input_file_id: str) -> _References:
    """The floor, then the HTTP relay, each timed idle and then under a batch of its own on the
    same file, the same way as jetbatch."""
    url = admin_nats_url(system)  # plain NATS, outside jetbatch's roles and their permissions
    responder = echo.start_responder(url)
    relay = None
    try:
        asyncio.run(echo.round_trips(url, count=WARMUP_REQUESTS))
        with client_gc_paused():
            idle = asyncio.run(echo.round_trips(url, count=IDLE_REQUESTS))
        loaded = _under_batch(
            client, input_file_id, lambda st: asyncio.run(echo.round_trips(url, until=st.ended))
        )
        refs = _References(idle, loaded)
        relay, relay_url = echo.start_relay(url)
        with httpx.Client(base_url=relay_url, timeout=60) as http:
            refs.relay_idle = _timed_idle(http)
            refs.relay_loaded = _under_batch(client, input_file_id, lambda st: _until(http, st))
        return refs
    finally:
        for proc in (responder, relay):
            if proc is not None:
                proc.kill()
                proc.wait()


def _until(
    http: httpx.Client, status: _BatchStatus, record: Callable[[float, str], None] | None = None
) -> list[float]:
    """Synchronous requests one after another until the batch has ended."""
    out: list[float] = []
    while not status.ended():
        ms = _one(http)
        out.append(ms)
        if record is not None:
            record(ms, status.phase)
    return out


def _timed_idle(http: httpx.Client) -> list[float]:
    for _ in range(WARMUP_REQUESTS):
        _one(http)
    with client_gc_paused():
        return [_one(http) for _ in range(IDLE_REQUESTS)]


@dataclass
class _UnderLoad:
    upload_id: str
    loaded: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)
    timeline: list[tuple[float, float, str]] = field(default_factory=list)
    batch_s: float = 0.0


def _timed_under_load(http: httpx.Client, client: Any, path: Any) -> _UnderLoad:
    """Synchronous requests one after another for as long as a batch of the file runs, each
    with the batch's status when it was sent."""
    with open(path, "rb") as f:
        upload = client.files.create(file=f, purpose="batch")
    load = _UnderLoad(upload.id)
    t0 = time.perf_counter()

    def record(ms: float, phase: str) -> None:
        load.phases.setdefault(phase, []).append(ms)
        load.timeline.append((round(time.perf_counter() - t0, 3), round(ms, 2), phase))

    load.loaded = _under_batch(client, upload.id, lambda st: _until(http, st, record))
    load.batch_s = time.perf_counter() - t0
    return load


def _round(
    system: Any, http: httpx.Client, client: Any, path: Any, n: int, lines: int
) -> tuple[_UnderLoad, _References]:
    """Round `n`: synchronous requests under a batch of the file, then the references under
    others."""
    print(f"round {n}: synchronous requests under a {lines:,}-line batch...", flush=True)
    load = _timed_under_load(http, client, path)
    print(
        f"round {n}: the same with a bare NATS request/reply (the floor), then through a bare"
        " HTTP relay...",
        flush=True,
    )
    return load, _references(system, client, load.upload_id)


def _figures(lines: int, idle: list[float], load: _UnderLoad, refs: _References) -> dict[str, Any]:
    idle_stats, load_stats = _stats(idle), _stats(load.loaded)
    factor = load_stats["p99_ms"] / idle_stats["p99_ms"]
    floor_idle, floor_loaded = _stats(refs.floor_idle), _stats(refs.floor_loaded)
    floor_factor = floor_loaded["p99_ms"] / floor_idle["p99_ms"]
    relay_loaded = _stats(refs.relay_loaded)
    return {
        "http_relay_idle": _stats(refs.relay_idle),
        "http_relay_under_load": relay_loaded,
        "http_relay_vs_floor": round(relay_loaded["p99_ms"] / floor_loaded["p99_ms"], 2),
        "p99_vs_http_relay": round(load_stats["p99_ms"] / relay_loaded["p99_ms"], 2),
        "bare_nats_idle": floor_idle,
        "bare_nats_under_load": floor_loaded,
        "bare_nats_p99_factor": round(floor_factor, 2),
        "idle": idle_stats,
        "under_load": load_stats,
        "p99_factor": round(factor, 2),
        "p50_factor": round(load_stats["p50_ms"] / idle_stats["p50_ms"], 2),
        "load_batch_lines": lines,
        "load_batch_s": round(load.batch_s, 2),
        "target_p99_factor": TARGET_P99_FACTOR,
        "meets_target": factor <= TARGET_P99_FACTOR,
        "p99_vs_floor": round(load_stats["p99_ms"] / floor_loaded["p99_ms"], 2),
        "target_floor_factor": TARGET_FLOOR_FACTOR,
        "meets_floor_target": load_stats["p99_ms"] <= TARGET_FLOOR_FACTOR * floor_loaded["p99_ms"],
    }


def _show(lines: int, figures: dict[str, Any], batch_s: float) -> None:
    idle_stats, load_stats = figures["idle"], figures["under_load"]
    floor_idle, floor_loaded = figures["bare_nats_idle"], figures["bare_nats_under_load"]
    factor = load_stats["p99_ms"] / idle_stats["p99_ms"]
    floor_factor = floor_loaded["p99_ms"] / floor_idle["p99_ms"]
    relay_idle, relay_loaded = figures["http_relay_idle"], figures["http_relay_under_load"]
    show(
        f"interactive latency (sync chat, instant engine) idle vs a {lines:,}-line batch in flight",
        [
            (
                "idle",
                f"p50 {idle_stats['p50_ms']:.2f} ms, p99 {idle_stats['p99_ms']:.2f} ms ({idle_stats['requests']} requests)",
            ),
            (
                "under load",
                f"p50 {load_stats['p50_ms']:.2f} ms, p99 {load_stats['p99_ms']:.2f} ms ({load_stats['requests']} requests over {batch_s:.1f} s)",
            ),
            ("p99 under load / idle", f"{factor:.2f}x  (target <= {TARGET_P99_FACTOR}x)"),
            (
                "bare NATS request/reply, idle",
                f"p50 {floor_idle['p50_ms']:.2f} ms, p99 {floor_idle['p99_ms']:.2f} ms",
            ),
            (
                "bare NATS request/reply, under load",
                f"p50 {floor_loaded['p50_ms']:.2f} ms, p99 {floor_loaded['p99_ms']:.2f} ms "
                f"({floor_factor:.2f}x idle; a second batch of {lines:,} lines)",
            ),
            (
                "p99 under load / the floor's under load",
                f"{figures['p99_vs_floor']:.2f}x  (target <= {TARGET_FLOOR_FACTOR}x: "
                f"{'met' if figures['meets_floor_target'] else 'NOT met'})",
            ),
            (
                "bare HTTP relay to the floor, idle",
                f"p50 {relay_idle['p50_ms']:.2f} ms, p99 {relay_idle['p99_ms']:.2f} ms",
            ),
            (
                "bare HTTP relay to the floor, under load",
                f"p50 {relay_loaded['p50_ms']:.2f} ms, p99 {relay_loaded['p99_ms']:.2f} ms "
                f"({figures['http_relay_vs_floor']:.2f}x the floor's; a third batch)",
            ),
            ("p99 under load / the relay's under load", f"{figures['p99_vs_http_relay']:.2f}x"),
        ],
    )


def run(args: Any) -> dict[str, Any]:
    lines = args.lines or LINES
    work = scratch("interactive")
    path = write_chat_file(work / "load.jsonl", lines)
    quiet_machine()
    with running_system("interactive", "instant", CHAT_MODEL) as system, ForeignLoad() as foreign:
        # Timed with a project's key, as a tenant's service calls (the api checks it: from its
        # key cache, services/api/key_cache.py); the load batch is the admin's.
        _, tenant = system.project_client("interactive")
        headers = {"Authorization": f"Bearer {tenant.api_key}"}
        client = system.client(timeout=600)
        with httpx.Client(base_url=system.base_url, headers=headers, timeout=60) as http:
            idle = _timed_idle(http)
            rounds = [
                _round(system, http, client, path, n, lines)
                for n in range(1, max(1, getattr(args, "repeat", 1)) + 1)
            ]
    each = [_figures(lines, idle, *r) for r in rounds]
    ratios = [f["p99_vs_floor"] for f in each]
    median = sorted(range(len(rounds)), key=lambda i: ratios[i])[(len(rounds) - 1) // 2]
    load = rounds[median][0]
    figures = {**each[median], **foreign.report()}
    figures["rounds_p99_vs_floor"] = ratios
    figures["rounds_p99_vs_http_relay"] = [f["p99_vs_http_relay"] for f in each]
    figures["rounds_http_relay_vs_floor"] = [f["http_relay_vs_floor"] for f in each]
    _show(lines, figures, load.batch_s)
    if len(rounds) > 1:
        print(f"    p99 / floor by round: {', '.join(f'{r:.2f}x' for r in ratios)} (median shown)")
        for label, key in (
            ("p99 / HTTP relay", "rounds_p99_vs_http_relay"),
            ("HTTP relay / floor", "rounds_http_relay_vs_floor"),
        ):
            print(f"    {label} by round: {', '.join(f'{r:.2f}x' for r in figures[key])}")
    by_phase = {k: _stats(v) for k, v in load.phases.items()}
    for phase, st in by_phase.items():
        print(
            f"    while {phase}: p50 {st['p50_ms']:.2f} ms, p99 {st['p99_ms']:.2f} ms, max {st['max_ms']:.1f} ms ({st['requests']} requests)"
        )
    slowest = sorted(load.timeline, key=lambda x: -x[1])[:10]
    out = write_result("interactive", figures, by_phase=by_phase, slowest=slowest)
    print(f"  -> {out.relative_to(out.parents[2])}")
    return figures
