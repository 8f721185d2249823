"""Operators' commands to this worker: KV bucket `jetbatch_worker_control` (README: Workers and
GPU health), key = the worker's control id (stable across restarts), value = WorkerCommand.

`drain`: pull nothing new, finish what is held, stay up (heartbeat `state: "draining"`, then
`"drained"`); `resume`: pull again (`"running"`); `restart`: drain, then stop the worker so the
process exits 0 and its supervisor (systemd, `jetbatch up`) starts it again. A restart names the
process it was given for (host, pid, started_at): the restarted process is another one, so it
runs, and the command needs no clearing (the worker cannot write the bucket anyway).

A put reaches the worker at once through a plain subscription to its key's subject, which the
NATS client re-establishes after a reconnect; the key is read again at start and every RESYNC_S,
so a command put while the worker was disconnected is obeyed too (as services/inference/
cancellations.py does for the cancel bucket)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError

from schemas.messages import WorkerCommand
from shared import bus

log = logging.getLogger(__name__)

RESYNC_S = 5.0
# A pull sent just before a drain may still bring requests (the runner's fetch waits up to 1 s
# on the server): the worker says "drained" only once that long has passed and it holds nothing.
PULL_GRACE_S = 1.5
# How often a draining worker looks whether it holds nothing any more.
CHECK_S = 0.25

_decoder = msgspec.json.Decoder(WorkerCommand)


def control_id_for(configured: str | None, host: str, model: str, gpu: int | None) -> str:
    """The configured worker id, or host-model-gpu: the same after a restart."""
    raw = configured or f"{host}-{model}-{'cpu' if gpu is None else f'gpu{gpu}'}"
    return "".join(c if c.isalnum() or c in "-_=" else "_" for c in raw)


class WorkerControl:
    def __init__(
        self, control_id: str, host: str, pid: int, started_at: int, busy: Callable[[], bool]
    ) -> None:
        self.control_id = control_id
        self.host, self.pid, self.started_at = host, pid, started_at
        self._busy = busy  # whether the worker holds requests not yet acked
        self.command: WorkerCommand | None = None
        self.on_change: Callable[[], None] = lambda: None  # the heartbeat, at once
        self._stop: asyncio.Event | None = None
        self._sub: Any = None
        self._kv: Any = None
        self._draining_since = 0.0

    # -- what the intake and the heartbeat ask ---------------------------------------------------
    @property
    def restarting(self) -> bool:
        c = self.command
        return (
            c is not None
            and c.action == "restart"
            and (c.host, c.pid, c.started_at) == (self.host, self.pid, self.started_at)
        )

    @property
    def draining(self) -> bool:
        """Whether to pull nothing new."""
        return self.restarting or (self.command is not None and self.command.action == "drain")

    @property
    def state(self) -> str:
        if self.restarting:
            return "restarting"
        if not self.draining:
            return "running"
        pulling = time.monotonic() - self._draining_since < PULL_GRACE_S
        return "draining" if pulling or self._busy() else "drained"

    # -- following the bucket --------------------------------------------------------------------
    async def start(
        self, nc: NATS, js: JetStreamContext, stop: asyncio.Event, replicas: int = 1
    ) -> None:
        """Subscribe, then read the key: nothing put in between is missed. `stop` is set to
        end the worker once a restart is obeyed."""
        self._stop = stop
        self._kv = await bus.worker_control_kv(js, replicas)
        subject = f"$KV.{bus.WORKER_CONTROL_BUCKET}.{self.control_id}"
        self._sub = await nc.subscribe(subject, cb=self._on_put)
        await self.resync()

    async def keep_in_sync(self, done: asyncio.Event) -> None:
        """Until `done`: re-read the key every RESYNC_S; end the worker once a restart is
        obeyed and nothing is held."""
        loop = asyncio.get_running_loop()
        next_read = loop.time() + RESYNC_S
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), CHECK_S)
            settled = time.monotonic() - self._draining_since >= PULL_GRACE_S
            if self.restarting and settled and not self._busy() and self._stop is not None:
                if not self._stop.is_set():
                    log.info("worker %s restarting: drained, exiting", self.control_id)
                    self._stop.set()
            if loop.time() >= next_read:
                next_read = loop.time() + RESYNC_S
                try:
                    await self.resync()
                except Exception as e:  # disconnected: the next round tries again
                    log.warning("worker commands not re-read: %r", e)
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()

    async def resync(self) -> None:
        try:
            entry = await self._kv.get(self.control_id)
        except KeyNotFoundError:  # never commanded, or the command deleted
            self._set(None)
            return
        self._set_raw(entry.value or b"")

    async def _on_put(self, msg: Msg) -> None:
        if msg.headers and msg.headers.get("KV-Operation") in ("DEL", "PURGE"):
            self._set(None)
            return
        self._set_raw(msg.data)

    def _set_raw(self, value: bytes) -> None:
        if not value:
            self._set(None)
            return
        try:
            self._set(_decoder.decode(value))
        except msgspec.DecodeError as e:
            log.warning("undecodable command in %s: %s", bus.WORKER_CONTROL_BUCKET, e)

    def _set(self, command: WorkerCommand | None) -> None:
        if command == self.command:
            return
        before, was_draining = self.state, self.draining
        self.command = command
        if self.draining and not was_draining:
            self._draining_since = time.monotonic()
        if self.state != before:
            log.info("worker %s: %s -> %s", self.control_id, before, self.state)
            self.on_change()
