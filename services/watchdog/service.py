"""watchdog: keeps the system honest.

Consumes: KV `jetbatch_workers` (heartbeats), table `batches`.
Emits: log lines now; batch transitions (expiry, re-drive, dead letters) in the lifecycle issue.

This first version flags workers whose heartbeat is stale, every `interval_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

import msgspec

from schemas.messages import WorkerHeartbeat
from shared import bus, config, telemetry

log = logging.getLogger(__name__)

STALE_AFTER_S = 60
INTERVAL_S = 10.0

_heartbeat = msgspec.json.Decoder(WorkerHeartbeat)


def stale_workers(beats: list[WorkerHeartbeat], now: float, stale_after_s: float) -> list[WorkerHeartbeat]:
    return [b for b in beats if now - b.seen_at > stale_after_s]


async def read_heartbeats(kv) -> list[WorkerHeartbeat]:  # type: ignore[no-untyped-def]
    beats = []
    try:
        keys = await kv.keys()
    except Exception:  # an empty bucket answers NoKeysError
        return []
    for key in keys:
        with contextlib.suppress(Exception):
            entry = await kv.get(key)
            if entry.value:
                beats.append(_heartbeat.decode(entry.value))
    return beats


async def run(settings: config.Settings, stop: asyncio.Event) -> None:
    if not settings.nats_url:
        raise config.ConfigError("JETBATCH_NATS_URL is not set")
    nc = await bus.connect(settings.nats_url, name="watchdog")
    try:
        js = nc.jetstream()
        await bus.ensure_streams(js)
        kv = await bus.workers_kv(js)
        while not stop.is_set():
            for beat in stale_workers(await read_heartbeats(kv), time.time(), STALE_AFTER_S):
                log.warning("worker %s (model %s on %s) last seen %ds ago", beat.worker_id,
                            beat.model, beat.host, int(time.time() - beat.seen_at))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), INTERVAL_S)
    finally:
        with contextlib.suppress(Exception):
            await nc.drain()


def main() -> None:
    settings = config.load()
    telemetry.setup("watchdog", settings.log_level)
    asyncio.run(_main(settings))


async def _main(settings: config.Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run(settings, stop)
