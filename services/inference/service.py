"""inference: runs request messages through the engine, one process per GPU per model.

Consumes: CONSUMER and CONSUMER_DIRECT below, per model: REQUESTS
  `jetbatch.requests.<model>.*.dispatched` (the api's lines) as durable `inference-<model>`, and
  the lines other services publish straight to JetStream (`...<model>.*.batch`, and the
  subjects before projects) as `inference-<model>-direct`; RequestMessage, ack_wait =
  JETBATCH_REQUEST_ACK_WAIT_S, max_deliver = JETBATCH_REQUEST_MAX_DELIVER; at most
  `engine.capacity` in the engine, each class at least half of it while both wait (intake.py,
  shares.py).
Serves: core NATS `jetbatch.interactive.<model>.<project>` (queue group `inference-<model>`), request/reply,
  for the synchronous API: interactive requests go straight to the engine, never behind the
  queue (interactive.py); and `jetbatch.interactive.abort.<model>.<project>` (every worker), the api's
  InteractiveAbort of one it stopped waiting for, which the worker running it aborts.
Watches: KV `jetbatch_cancelled` (cancellations.py): a request of a cancelled or expired batch
  is answered with a `batch_cancelled` / `batch_expired` error result without running the
  engine, and one running when its batch stops is aborted in the engine.
Emits: ResultMessage on RESULTS `jetbatch.results.<project>.<batch_id>` (the request's project;
  acked by the stream before the request is acked); WorkerHeartbeat into KV `jetbatch_workers` every few seconds
  (heartbeats.py); a request that does not decode as a DeadLetterMessage on DEADLETTERS (then
  termed).
Health: while its GPU is over a threshold (JETBATCH_GPU_MAX_*, gpu.GpuGate) the worker pulls no
  new requests, and its heartbeat says `healthy: false`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from typing import Any

import msgspec
from nats.aio.msg import Msg

from schemas.messages import (
    DIRECT,
    DISPATCHED,
    BatchStop,
    DeadLetterMessage,
    RequestMessage,
    ResultMessage,
    subject_token,
)
from services.inference import engine_args, priority
from services.inference.cancellations import Cancellations
from services.inference.control import WorkerControl, control_id_for
from services.inference.engine import Engine, EngineResult, make_engine
from services.inference.engine_time import EngineClock
from services.inference.gpu import GpuGate, GpuMonitor
from services.inference.heartbeats import Heartbeats
from services.inference.intake import RESULTS_WINDOW, TAKE_SLICE, TAKE_SLICE_SYNC, Intake
from services.inference.interactive import SyncLane
from services.inference.results import engine_failure, result_for, stopped_result
from shared import bus, config, logship, process, telemetry
from shared.consumer import Consumer, Runner
from shared.domain import deadletters
from shared.ids import stable_id
from shared.lane import Lane
from shared.metrics import expose as expose_metrics

__all__ = [
    "CONSUMER",
    "CONSUMERS",
    "CONSUMER_DIRECT",
    "EMITS",
    "TAKE_SLICE",
    "TAKE_SLICE_SYNC",
    "Worker",
    "run",
]

log = logging.getLogger(__name__)

# Filled in per model at start (consumers_for): the model, and the settings named above.
CONSUMER = Consumer(
    stream=bus.REQUESTS,
    durable=RequestMessage.class_durables("MODEL")[DISPATCHED],
    message=RequestMessage,
    bound={"model": "MODEL"},
    filters=RequestMessage.class_filters("MODEL")[DISPATCHED],
    ack_wait_s=60,
    max_deliver=5,
    fetch=512,
    max_ack_pending=10_000,
)
CONSUMER_DIRECT = dataclasses.replace(
    CONSUMER,
    durable=RequestMessage.class_durables("MODEL")[DIRECT],
    filters=RequestMessage.class_filters("MODEL")[DIRECT],
)
CONSUMERS = (CONSUMER, CONSUMER_DIRECT)
EMITS = (ResultMessage, DeadLetterMessage, "WorkerHeartbeat into KV `jetbatch_workers`")

_encoder = msgspec.json.Encoder()


def consumers_for(
    settings: config.Settings, spec: config.ModelSpec, capacity: int
) -> dict[str, Consumer]:
    """The model's consumer of each class, dispatched first (Intake.pull binds in this order)."""
    durables = RequestMessage.class_durables(spec.name)
    filters = RequestMessage.class_filters(spec.name)
    return {
        cls: dataclasses.replace(
            CONSUMER,
            durable=durables[cls],
            bound={"model": spec.name},
            filters=filters[cls],
            ack_wait_s=settings.request_ack_wait_s,
            max_deliver=settings.request_max_deliver,
            max_ack_pending=max(CONSUMER.max_ack_pending, (capacity + RESULTS_WINDOW) * 2),
        )
        for cls in (DISPATCHED, DIRECT)
    }


class _NeedsEngine:
    """Marker: the request must wait for the engine."""


NEEDS_ENGINE = _NeedsEngine()


class Worker:
    needs_engine = NEEDS_ENGINE

    def __init__(
        self,
        settings: config.Settings,
        spec: config.ModelSpec,
        engine: Engine,
        gpu: GpuMonitor,
        worker_id: str,
        control_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.spec = spec
        self.engine = engine
        self.gate = GpuGate(
            settings.health.gpu_max_memory_pct, settings.health.gpu_max_temperature_c
        )
        self.worker_id = worker_id
        self.cancellations = Cancellations(on_stop=self._abort_batch)
        # batch id -> request ids of that batch now in the engine, to abort on cancel
        self._running: dict[str, set[str]] = {}
        # Each request's share of the engine, times the GPUs this worker owns (`--gpu`).
        self.engine_clock = EngineClock(gpus=engine_args.visible_gpus())
        self.capacity = settings.max_in_flight or engine.capacity
        # The connection comes with `start`; until then the runners only decode (unit tests).
        self.runners: dict[str, Runner[RequestMessage]] = {
            cls: Runner(None, consumer, self._dead_letter)
            for cls, consumer in consumers_for(settings, spec, self.capacity).items()
        }
        self.intake = Intake(self, self.runners)
        self.heartbeats = Heartbeats(self, gpu, self.gate)
        # Operators' drain/resume/restart (control.py), keyed by an id stable across restarts.
        self.control = WorkerControl(
            control_id or worker_id,
            socket.gethostname(),
            os.getpid(),
            self.heartbeats.started_at,
            busy=lambda: bool(self.intake.in_flight) or self.intake.running > 0,
        )
        self.control.on_change = self.heartbeats.wake
        self.lane = SyncLane(self)
        self._dead_letters: deadletters.OnBus | None = None

    def start(self, js: Any) -> None:
        for runner in self.runners.values():
            runner.js = js
        self._dead_letters = deadletters.OnBus(js)

    def encode(self, result: ResultMessage) -> bytes:
        return _encoder.encode(result)

    # -- the handler: domain logic only ------------------------------------------------------
    async def handle(
        self, req: RequestMessage, delivery: int, published_ns: int = 0
    ) -> ResultMessage | None:
        """Run one request. None = retry later (engine failure before the last delivery).
        `published_ns`: when it was published to REQUESTS (0: unknown), which ages its priority."""
        request_id = stable_id("req_", req.batch_id, req.custom_id)
        now = self.answer_now(req, request_id, delivery)
        if not isinstance(now, _NeedsEngine):
            return now
        running = self._running.setdefault(req.batch_id, set())
        running.add(request_id)
        started = self.engine_clock.start()
        try:
            waited_s = time.time() - published_ns / 1e9 if published_ns else 0.0
            outcome = await self.engine.run(
                req.endpoint,
                bytes(req.body),
                request_id,
                batch_priority=priority.aged(req.priority, waited_s),
            )
            gpu_ms = self.engine_clock.stop(started)
            started = -1.0
            outcome = msgspec.structs.replace(outcome, gpu_ms=gpu_ms)
        except Exception as e:
            log.exception(
                "engine failed on batch_id=%s custom_id=%s (delivery %d)",
                req.batch_id,
                req.custom_id,
                delivery,
            )
            if delivery >= self.settings.request_max_deliver:
                return engine_failure(req, request_id, f"engine error: {e}", self.worker_id)
            return None
        finally:
            if started >= 0:
                self.engine_clock.stop(started)  # failed or cancelled: it still left the engine
            running.discard(request_id)
            if not running and self._running.get(req.batch_id) is running:
                del self._running[req.batch_id]
        return self._result(req, request_id, outcome, delivery)

    def answer_now(
        self, req: RequestMessage, request_id: str, delivery: int
    ) -> ResultMessage | None | _NeedsEngine:
        """The request's result when it needs no waiting: its batch stopped, its endpoint is
        not served here, or the engine answers at once. NEEDS_ENGINE otherwise."""
        stop = self.cancellations.get(req.batch_id)
        if stop is not None:
            return stopped_result(req, request_id, stop, self.worker_id)
        if req.endpoint not in self.spec.endpoints:
            outcome = EngineResult(
                status_code=400,
                body=None,
                error_code="invalid_request_error",
                error_message=f"model {req.model!r} does not serve {req.endpoint}",
            )
            return self._result(req, request_id, outcome, delivery)
        try:
            outcome_now = self.engine.answer_now(req.endpoint, bytes(req.body), request_id)
        except Exception:
            return NEEDS_ENGINE  # `engine.run` fails the same way, and handle() retries that
        if outcome_now is None:
            return NEEDS_ENGINE
        return self._result(req, request_id, outcome_now, delivery)

    def _result(
        self, req: RequestMessage, request_id: str, outcome: EngineResult, delivery: int
    ) -> ResultMessage | None:
        if outcome.status_code == 499:  # aborted in the engine
            stop = self.cancellations.get(req.batch_id)
            if stop is not None:
                return stopped_result(req, request_id, stop, self.worker_id)
            return None  # not by a cancel (shutting down): another delivery runs it
        if outcome.status_code >= 500 and delivery < self.settings.request_max_deliver:
            # The engine failed, not the request: let another delivery (maybe another worker)
            # try; on the last one the failure becomes the request's error line.
            log.warning(
                "engine error on batch_id=%s custom_id=%s (delivery %d): %s",
                req.batch_id,
                req.custom_id,
                delivery,
                outcome.error_message,
            )
            return None
        self.heartbeats.count_tokens(outcome.output_tokens)
        return result_for(
            request_id,
            outcome,
            batch_id=req.batch_id,
            line=req.line,
            custom_id=req.custom_id,
            worker_id=self.worker_id,
            project=req.project,
        )

    # -- what the intake and the heartbeat show (and tests read) ---------------------------------
    async def take(self, msgs: list[Msg]) -> None:
        await self.intake.take(msgs)

    def sync_traffic(self) -> bool:
        return self.intake.sync_traffic()

    def heartbeat(self):  # type: ignore[no-untyped-def]
        return self.heartbeats.beat()

    @property
    def running(self) -> int:
        return self.intake.running

    @property
    def in_flight(self) -> dict[str, Msg]:
        return self.intake.in_flight

    @property
    def completed(self) -> int:
        return self.intake.completed

    @property
    def results(self) -> bus.AckAfterPublish | None:
        return self.intake.results

    @results.setter
    def results(self, value: bus.AckAfterPublish | None) -> None:
        self.intake.results = value

    @property
    def _sync_seen(self) -> float:
        return self.intake.sync_seen

    @_sync_seen.setter
    def _sync_seen(self, value: float) -> None:
        self.intake.sync_seen = value

    def _abort_batch(self, stop: BatchStop) -> None:
        for request_id in list(self._running.get(stop.batch_id, ())):
            self.intake.spawn(self.engine.abort(request_id))

    async def _dead_letter(self, msg: Msg, reason: str) -> None:
        """Hand a message this worker cannot use to the watchdog, which records it."""
        assert self._dead_letters is not None, "the worker is not started"
        await self._dead_letters(msg, reason)


async def run(
    settings: config.Settings,
    model: str,
    gpu_index: int | None,
    stop: asyncio.Event,
    worker_id: str | None = None,
) -> None:
    """Start the engine, serve until `stop` is set, then drain (README: Operations)."""
    spec = settings.model(model)
    if spec is None:
        raise config.ConfigError(
            f"model {model!r} is not configured; served: {[m.name for m in settings.models]}"
        )
    config.require(settings, "inference", "nats_url")
    assert settings.nats_url is not None
    expose_metrics(settings, "inference", gpu_index)  # before the engine: a taken port stops it
    host = socket.gethostname()
    control_id = control_id_for(worker_id, host, subject_token(spec.name), gpu_index)
    worker_id = worker_id or f"{socket.gethostname()}-{subject_token(spec.name)}-{os.getpid()}"
    worker_id = "".join(c if c.isalnum() or c in "-_=" else "_" for c in worker_id)
    engine = make_engine(settings, spec)
    log.info("starting %s engine for %s (worker %s)", engine.name, spec.name, worker_id)
    await engine.start()
    telemetry.freeze_heap()  # vLLM's imports: millions of objects no collection should rescan
    nc = await bus.connect(settings.nats_url, name=f"inference:{worker_id}")
    nc_sync = None
    lane = Lane(f"inference-sync:{worker_id}")
    shipping = logship.shipping(nc, "inference", settings.nats_replicas)
    try:
        await shipping.__aenter__()
        js = nc.jetstream(publish_async_max_pending=8192)
        await bus.ensure_streams(js, replicas=settings.nats_replicas)
        worker = Worker(settings, spec, engine, GpuMonitor(gpu_index), worker_id, control_id)
        worker.start(js)
        # Before the first pull: a request of a batch cancelled while we were down must not run,
        # and a drained worker stays drained.
        await worker.cancellations.start(nc, js, settings.nats_replicas)
        await worker.control.start(nc, js, stop, settings.nats_replicas)
        lane.start()
        nc_sync = await lane.call(
            bus.connect(settings.nats_url, name=f"inference-sync:{worker_id}")
        )
        await lane.call(worker.lane.serve(nc_sync, asyncio.get_running_loop()))
        await _serve(worker, js, await bus.workers_kv(js, settings.nats_replicas), stop)
    finally:
        if nc_sync is not None:
            with contextlib.suppress(Exception):
                await lane.call(nc_sync.drain())
        lane.stop()
        with contextlib.suppress(Exception):
            await shipping.__aexit__(None, None, None)
        with contextlib.suppress(Exception):
            await nc.drain()
        await engine.stop()


async def _serve(worker: Worker, js: Any, kv: Any, stop: asyncio.Event) -> None:
    fetching = asyncio.Event()  # set = stop fetching
    drained = asyncio.Event()  # heartbeats and ack extensions go on while draining
    background = [
        asyncio.create_task(worker.heartbeats.loop(kv, drained)),
        asyncio.create_task(worker.intake.keep_alive(drained)),
        asyncio.create_task(worker.cancellations.keep_in_sync(drained)),
        asyncio.create_task(worker.control.keep_in_sync(drained)),
    ]
    puller = asyncio.create_task(worker.intake.pull(js, fetching))
    log.info(
        "worker %s ready: model=%s capacity=%d", worker.worker_id, worker.spec.name, worker.capacity
    )
    await stop.wait()
    log.info("stopping: no new requests; draining %d in flight", len(worker.in_flight))
    fetching.set()
    await puller
    await worker.intake.drain(worker.settings.health.drain_timeout_s)
    if worker.results is not None:
        # Its reply subscription would hold the NATS drain below for its whole timeout.
        await worker.results.close()
    drained.set()
    await asyncio.gather(*background, return_exceptions=True)
    with contextlib.suppress(Exception):
        await kv.delete(worker.worker_id)


def main() -> None:
    parser = argparse.ArgumentParser(prog="jetbatch inference")
    parser.add_argument("--model", required=True, help="served model name (JETBATCH_MODELS)")
    parser.add_argument(
        "--gpu",
        type=engine_args.gpu_list,
        default=(),
        metavar="N[,N...]",
        help="GPUs this worker owns; several = one engine over all of them (tensor_parallel_size"
        " = their number unless JETBATCH_MODELS_FILE says otherwise)",
    )
    parser.add_argument("--worker-id", default=None)
    args = parser.parse_args()
    # Before the engine starts: the worker (and vLLM's processes) see only its own GPUs.
    engine_args.claim_gpus(args.gpu)
    # NVML watches the first: the health gate and the heartbeat report one GPU.
    gpu_index = args.gpu[0] if args.gpu else None

    async def serve(settings: config.Settings, stop: asyncio.Event) -> None:
        await run(settings, args.model, gpu_index, stop, args.worker_id)

    process.main("inference", serve, requires=("nats_url",))
