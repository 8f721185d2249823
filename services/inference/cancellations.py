"""Which batches' requests a worker must not run: KV bucket `jetbatch_cancelled` (README:
Lifecycle), kept in memory.

Every put reaches the worker as it happens through a plain subscription to the bucket's subject
(`$KV.jetbatch_cancelled.<batch id>`), which the NATS client re-establishes after a reconnect; a
full snapshot is read at start (before the worker pulls anything) and every RESYNC_S, so a put
made while the worker was disconnected is picked up too. The api puts an entry on cancel, the
watchdog on expiry (and again for any batch it finds missing)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from schemas.messages import BatchStop
from shared import bus

log = logging.getLogger(__name__)

RESYNC_S = 30.0
KV_READ_TIMEOUT_S = 5.0

_decoder = msgspec.json.Decoder(BatchStop)


class Cancellations:
    def __init__(self, on_stop: Callable[[BatchStop], None] | None = None) -> None:
        self._stops: dict[str, BatchStop] = {}
        self._on_stop = on_stop

    def get(self, batch_id: str) -> BatchStop | None:
        return self._stops.get(batch_id)

    def add(self, stop: BatchStop) -> None:
        if stop.batch_id in self._stops:
            return
        self._stops[stop.batch_id] = stop
        log.info("batch %s %s: its remaining requests will not run", stop.batch_id, stop.reason)
        if self._on_stop is not None:
            self._on_stop(stop)

    def __len__(self) -> int:
        return len(self._stops)

    async def start(self, nc: NATS, js: JetStreamContext, replicas: int = 1) -> None:
        """Subscribe, then read the snapshot: nothing put in between is missed."""
        self._kv = await bus.cancelled_kv(js, replicas)
        self._sub = await nc.subscribe(f"$KV.{bus.CANCELLED_BUCKET}.>", cb=self._on_put)
        await self.resync()

    async def keep_in_sync(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RESYNC_S)
            if stop.is_set():
                break
            try:
                await self.resync()
            except Exception as e:  # disconnected: the next round tries again
                log.warning("cancelled batches not re-read: %r", e)
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()

    async def resync(self) -> None:
        watcher = await self._kv.watchall(ignore_deletes=True)
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=KV_READ_TIMEOUT_S)
                except nats.errors.TimeoutError:
                    log.warning("reading cancelled batches timed out")
                    break
                if entry is None:  # end of the snapshot
                    break
                self._add_raw(entry.value or b"")
        finally:
            await watcher.stop()

    async def _on_put(self, msg: Msg) -> None:
        if msg.headers and msg.headers.get("KV-Operation") in ("DEL", "PURGE"):
            return
        self._add_raw(msg.data)

    def _add_raw(self, value: bytes) -> None:
        if not value:
            return
        try:
            self.add(_decoder.decode(value))
        except msgspec.DecodeError as e:
            log.warning("undecodable entry in %s: %s", bus.CANCELLED_BUCKET, e)
