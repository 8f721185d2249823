"""The worker's heartbeat: WorkerHeartbeat into KV `jetbatch_workers` every few seconds (model,
GPU readings, in flight against capacity and what vLLM sized that from, tokens/s, synchronous
requests in flight and aborted), which also updates the GPU gate."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque
from typing import TYPE_CHECKING

import msgspec

from schemas.messages import WorkerHeartbeat
from services.inference.gpu import GpuGate, GpuMonitor

if TYPE_CHECKING:
    from services.inference.service import Worker

log = logging.getLogger(__name__)

TOKENS_WINDOW_S = 30.0

_encoder = msgspec.json.Encoder()


class Heartbeats:
    def __init__(self, worker: Worker, gpu: GpuMonitor, gate: GpuGate) -> None:
        self.worker = worker
        self.gpu = gpu
        self.gate = gate
        self.started_at = int(time.time())
        self._tokens: deque[tuple[float, int]] = deque()
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Beat now (its state changed), not at the next interval."""
        self._wake.set()

    def beat(self) -> WorkerHeartbeat:
        w, intake = self.worker, self.worker.intake
        reading = self.gpu.read()
        healthy = self.gate.update(reading)
        # Only the vLLM engine knows how vLLM sized it (VllmEngine.sizing, once started).
        sizing = getattr(w.engine, "sizing", None)
        beat = WorkerHeartbeat(
            worker_id=w.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            model=w.spec.name,
            endpoints=list(w.spec.endpoints),
            engine=w.engine.name,
            started_at=self.started_at,
            seen_at=int(time.time()),
            in_flight=intake.running,  # in the engine, against `capacity`
            capacity=intake.capacity,
            completed=intake.completed,
            tokens_per_s=self.tokens_per_s(),
            gpu_index=reading.index if reading else self.gpu.index,
            gpu_name=reading.name if reading else None,
            gpu_memory_used_mb=reading.memory_used_mb if reading else None,
            gpu_memory_total_mb=reading.memory_total_mb if reading else None,
            gpu_temperature_c=reading.temperature_c if reading else None,
            gpu_utilization_pct=reading.utilization_pct if reading else None,
            healthy=healthy,
            max_num_seqs=sizing.max_num_seqs if sizing else None,
            max_model_len=sizing.max_model_len if sizing else None,
            kv_cache_blocks=sizing.kv_cache_blocks if sizing else None,
            kv_cache_tokens=sizing.kv_cache_tokens if sizing else None,
            interactive_in_flight=w.lane.in_flight,
            interactive_aborted=w.lane.aborted,
            state=w.control.state,
            control_id=w.control.control_id,
        )
        intake.metrics.heartbeat(beat)  # README: Metrics
        return beat

    async def loop(self, kv, stop: asyncio.Event) -> None:  # type: ignore[no-untyped-def]
        while not stop.is_set():
            try:
                await kv.put(self.worker.worker_id, _encoder.encode(self.beat()))
            except Exception as e:
                log.warning("heartbeat not written: %s", e)
            self._wake.clear()
            waits = [asyncio.ensure_future(e.wait()) for e in (stop, self._wake)]
            await asyncio.wait(waits, timeout=self.worker.settings.heartbeat_interval_s)
            for waiting in waits:
                waiting.cancel()

    def count_tokens(self, n: int) -> None:
        if n:
            self._tokens.append((time.monotonic(), n))

    def tokens_per_s(self, window_s: float = TOKENS_WINDOW_S) -> float:
        now = time.monotonic()
        while self._tokens and self._tokens[0][0] < now - window_s:
            self._tokens.popleft()
        return round(sum(n for _, n in self._tokens) / window_s, 2)
