"""4. Interactive under load: latency of synchronous `POST /v1/chat/completions` (instant
engine, whole `jetbatch up` stack), one request at a time over a kept-alive connection, first
with the system idle (the baseline), then while a 50,000-line batch is validated, published,
run and written. Target: p99 under load at most 2x p99 idle."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx

from bench.common import (
    API_KEY,
    CHAT_MODEL,
    ForeignLoad,
    percentile,
    quiet_machine,
    running_system,
    scratch,
    show,
    write_chat_file,
    write_result,
)

TARGET_P99_FACTOR = 2.0
LINES = 50_000
IDLE_REQUESTS = 2_000
WARMUP_REQUESTS = 200

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


def run(args: Any) -> dict[str, Any]:
    lines = args.lines or LINES
    work = scratch("interactive")
    path = write_chat_file(work / "load.jsonl", lines)
    quiet_machine()
    with running_system("interactive", "instant", CHAT_MODEL) as system, ForeignLoad() as foreign:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(base_url=system.base_url, headers=headers, timeout=60) as http:
            for _ in range(WARMUP_REQUESTS):
                _one(http)
            idle = [_one(http) for _ in range(IDLE_REQUESTS)]

            client = system.client(timeout=600)
            with open(path, "rb") as f:
                upload = client.files.create(file=f, purpose="batch")
            status = {"value": "validating", "counts": None}
            finished = threading.Event()

            def watch(batch_id: str) -> None:
                while not finished.is_set():
                    batch = client.batches.retrieve(batch_id)
                    status["value"], status["counts"] = batch.status, batch.request_counts
                    if batch.status in ("completed", "failed", "expired", "cancelled"):
                        finished.set()
                    finished.wait(0.2)

            batch = client.batches.create(
                input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            t0 = time.perf_counter()
            watcher = threading.Thread(target=watch, args=(batch.id,), daemon=True)
            watcher.start()
            loaded: list[float] = []
            phases: dict[str, list[float]] = {}
            timeline: list[tuple[float, float, str]] = []
            while not finished.is_set():
                phase = str(status["value"])
                ms = _one(http)
                loaded.append(ms)
                phases.setdefault(phase, []).append(ms)
                timeline.append((round(time.perf_counter() - t0, 3), round(ms, 2), phase))
            batch_s = time.perf_counter() - t0
            watcher.join()
        if status["value"] != "completed":
            raise RuntimeError(f"the load batch ended {status['value']}")
    idle_stats, load_stats = _stats(idle), _stats(loaded)
    factor = load_stats["p99_ms"] / idle_stats["p99_ms"]
    figures = {
        "idle": idle_stats,
        "under_load": load_stats,
        "p99_factor": round(factor, 2),
        "p50_factor": round(load_stats["p50_ms"] / idle_stats["p50_ms"], 2),
        "load_batch_lines": lines,
        "load_batch_s": round(batch_s, 2),
        "target_p99_factor": TARGET_P99_FACTOR,
        "meets_target": factor <= TARGET_P99_FACTOR,
        **foreign.report(),
    }
    show(
        f"interactive latency (sync chat, instant engine) idle vs a {lines:,}-line batch in flight",
        [
            (
                "idle",
                f"p50 {idle_stats['p50_ms']:.2f} ms, p99 {idle_stats['p99_ms']:.2f} ms ({len(idle)} requests)",
            ),
            (
                "under load",
                f"p50 {load_stats['p50_ms']:.2f} ms, p99 {load_stats['p99_ms']:.2f} ms ({len(loaded)} requests over {batch_s:.1f} s)",
            ),
            ("p99 under load / idle", f"{factor:.2f}x  (target <= {TARGET_P99_FACTOR}x)"),
        ],
    )
    by_phase = {k: _stats(v) for k, v in phases.items()}
    for phase, st in by_phase.items():
        print(
            f"    while {phase}: p50 {st['p50_ms']:.2f} ms, p99 {st['p99_ms']:.2f} ms, max {st['max_ms']:.1f} ms ({st['requests']} requests)"
        )
    slowest = sorted(timeline, key=lambda x: -x[1])[:10]
    out = write_result("interactive", figures, by_phase=by_phase, slowest=slowest)
    print(f"  -> {out.relative_to(out.parents[2])}")
    return figures
