"""inference: runs request messages through the engine, one process per GPU per model.

Consumes: stream REQUESTS, durable `inference-<model>`, subjects `jetbatch.requests.<model>.>`,
  message RequestMessage (JSON), ack_wait = JETBATCH_REQUEST_ACK_WAIT_S,
  max_deliver = JETBATCH_REQUEST_MAX_DELIVER, at most `engine.capacity` in flight per worker.
Serves: core NATS `jetbatch.interactive.<model>` (queue group `inference-<model>`), request/reply,
  for the synchronous API: interactive requests go straight to the engine, never behind the queue.
Watches: KV `jetbatch_cancelled` (cancellations.py): a request of a cancelled or expired batch
  is answered with a `batch_cancelled` / `batch_expired` error result without running the
  engine, and one running when its batch stops is aborted in the engine.
Emits: ResultMessage on RESULTS `jetbatch.results.<batch_id>` (acked by the stream before the
  request is acked); WorkerHeartbeat into KV `jetbatch_workers` every few seconds; a request
  that does not decode as a DeadLetterMessage on DEADLETTERS (then termed).
Health: while its GPU is over a threshold (JETBATCH_GPU_MAX_*, gpu.GpuGate) the worker pulls no
  new requests, and its heartbeat says `healthy: false`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections import deque

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from schemas.messages import (
    BatchStop,
    DeadLetterMessage,
    InteractiveRequest,
    RequestMessage,
    ResultMessage,
    WorkerHeartbeat,
    subject_token,
)
from services.inference.cancellations import Cancellations
from services.inference.engine import Engine, EngineResult, make_engine
from services.inference.gpu import GpuGate, GpuMonitor
from shared import bus, config, telemetry
from shared.ids import new_id, stable_id
from shared.lane import Lane, on_loop

log = logging.getLogger(__name__)

FETCH_MAX = 512
# Requests whose result is on its way to RESULTS (published, PubAck pending, then acked) do not
# hold an engine slot: the engine is refilled as soon as a request finishes, and up to this many
# finished ones may wait for their PubAck meanwhile. Bounded, so a stalled stream stops the pulls.
RESULTS_WINDOW = 2_048
# Requests handled per turn of the event loop, so a synchronous request waits for one slice of
# batch work, never a whole fetch. Every turn runs one slice of each busy batch task before the
# sockets are polled again, so while synchronous requests keep coming (one within SYNC_RECENT_S)
# slices shrink: measured on bench interactive, p99 under load 103-113 -> 54-63 ms, at the price
# of ~15% of batch throughput (bench orchestration), which is paid only then.
TAKE_SLICE = 64
TAKE_SLICE_SYNC = 16
YIELD_EVERY_SYNC = 32
SYNC_RECENT_S = 1.0
# While the GPU is unhealthy, how often the pull loop looks again.
UNHEALTHY_POLL_S = 1.0

_request_decoder = msgspec.json.Decoder(RequestMessage)
_interactive_decoder = msgspec.json.Decoder(InteractiveRequest)
_encoder = msgspec.json.Encoder()


def result_for(
    request_id: str,
    outcome: EngineResult,
    *,
    batch_id: str = "",
    line: int = 0,
    custom_id: str = "",
    worker_id: str = "",
) -> ResultMessage:
    body = outcome.body
    if body is None and outcome.status_code >= 400:
        # Keep OpenAI's shape: a rejected request's response body is an error object.
        body = _encoder.encode(
            {
                "error": {
                    "message": outcome.error_message or "request failed",
                    "type": outcome.error_code or "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            }
        )
    return ResultMessage(
        batch_id=batch_id,
        line=line,
        custom_id=custom_id,
        request_id=request_id,
        status_code=outcome.status_code,
        response_body=msgspec.Raw(body if body is not None else b"null"),
        error_code=outcome.error_code if outcome.status_code >= 300 else None,
        error_message=outcome.error_message if outcome.status_code >= 300 else None,
        input_tokens=outcome.input_tokens,
        output_tokens=outcome.output_tokens,
        cached_tokens=outcome.cached_tokens,
        worker_id=worker_id,
        finished_at_ms=int(time.time() * 1000),
    )


def error_result(
    req: RequestMessage, request_id: str, status_code: int, code: str, message: str, worker_id: str
) -> ResultMessage:
    """An error line that no engine answer produced (no response body)."""
    return ResultMessage(
        batch_id=req.batch_id,
        line=req.line,
        custom_id=req.custom_id,
        request_id=request_id,
        status_code=status_code,
        error_code=code,
        error_message=message,
        worker_id=worker_id,
        finished_at_ms=int(time.time() * 1000),
    )


def engine_failure(
    req: RequestMessage, request_id: str, error: str, worker_id: str
) -> ResultMessage:
    """The request crashed the engine on its last delivery: an error line, so the batch finishes."""
    return error_result(req, request_id, 500, "engine_error", error, worker_id)


def stopped_result(
    req: RequestMessage, request_id: str, stop: BatchStop, worker_id: str
) -> ResultMessage:
    """The request's batch was cancelled or expired before it ran (or while it ran)."""
    return error_result(req, request_id, 499, stop.error_code, stop.error_message, worker_id)


class _NeedsEngine:
    """Marker: the request must wait for the engine."""


NEEDS_ENGINE = _NeedsEngine()


class Worker:
    def __init__(
        self,
        settings: config.Settings,
        spec: config.ModelSpec,
        engine: Engine,
        gpu: GpuMonitor,
        worker_id: str,
    ) -> None:
        self.settings = settings
        self.spec = spec
        self.engine = engine
        self.gpu = gpu
        self.gate = GpuGate(
            settings.health.gpu_max_memory_pct, settings.health.gpu_max_temperature_c
        )
        self.worker_id = worker_id
        self.cancellations = Cancellations(on_stop=self._abort_batch)
        # batch id -> request ids of that batch now in the engine, to abort on cancel
        self._running: dict[str, set[str]] = {}
        self.capacity = settings.max_in_flight or engine.capacity
        self.max_unacked = self.capacity + RESULTS_WINDOW
        self.in_flight: dict[str, Msg] = {}  # every message not acked yet
        self.running = 0  # of those, requests in the engine (or about to enter it)
        self._sync_seen = -SYNC_RECENT_S  # when the last synchronous request came in
        self.results: bus.AckAfterPublish | None = None  # set by pull_loop
        self._js: JetStreamContext | None = None
        self.completed = 0
        self.started_at = int(time.time())
        self._slot_free = asyncio.Event()
        self._tokens: deque[tuple[float, int]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the handler: domain logic only ------------------------------------------------------
    async def handle(self, req: RequestMessage, delivery: int) -> ResultMessage | None:
        """Run one request. None = retry later (engine failure before the last delivery)."""
        request_id = stable_id("req_", req.batch_id, req.custom_id)
        now = self.answer_now(req, request_id, delivery)
        if not isinstance(now, _NeedsEngine):
            return now
        running = self._running.setdefault(req.batch_id, set())
        running.add(request_id)
        try:
            outcome = await self.engine.run(req.endpoint, bytes(req.body), request_id)
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
        self._count_tokens(outcome.output_tokens)
        return result_for(
            request_id,
            outcome,
            batch_id=req.batch_id,
            line=req.line,
            custom_id=req.custom_id,
            worker_id=self.worker_id,
        )

    # -- the runner ---------------------------------------------------------------------------
    async def take(self, msgs: list[Msg]) -> None:
        """Start on a pulled chunk. Requests answered without waiting are published and acked
        in groups (one task per slice); the others each get a task that awaits the engine.
        Between slices the event loop runs whatever else is ready (a synchronous request)."""
        self.running += len(msgs)
        sync = self.sync_traffic()
        size = TAKE_SLICE_SYNC if sync else TAKE_SLICE
        if self.results is not None:
            self.results.yield_every = YIELD_EVERY_SYNC if sync else bus.YIELD_EVERY
        for start in range(0, len(msgs), size):
            if start:
                await asyncio.sleep(0)
            self._take_slice(msgs[start : start + size])

    def sync_traffic(self) -> bool:
        """Whether synchronous requests are coming in now (one within SYNC_RECENT_S)."""
        return time.monotonic() - self._sync_seen < SYNC_RECENT_S

    def _take_slice(self, msgs: list[Msg]) -> None:
        ready: list[tuple[Msg, ResultMessage | None]] = []
        for msg in msgs:
            try:
                req = _request_decoder.decode(msg.data)
                delivery = bus.delivery_count(msg)
                now = self.answer_now(req, stable_id("req_", req.batch_id, req.custom_id), delivery)
            except Exception:  # undecodable: the full path dead-letters it
                now = NEEDS_ENGINE
            if isinstance(now, _NeedsEngine):
                self._spawn(self.process(msg))
                continue
            self.in_flight[msg.reply or new_id("m")] = msg
            self._release_slot()
            ready.append((msg, now))
        if ready:
            self._spawn(self._publish_ready(ready))

    async def _publish_ready(self, ready: list[tuple[Msg, ResultMessage | None]]) -> None:
        assert self.results is not None
        items: list[tuple[str, bytes, str, Msg]] = []
        retry: list[Msg] = []
        for msg, result in ready:
            if result is None:
                retry.append(msg)
            else:
                items.append(
                    (
                        ResultMessage.subject_for(result.batch_id),
                        _encoder.encode(result),
                        result.msg_id,
                        msg,
                    )
                )
        try:
            for msg in retry:
                with contextlib.suppress(Exception):
                    await msg.nak(delay=min(30.0, 2.0 ** bus.delivery_count(msg)))
            failed = await self.results.publish_many_then_ack(items)
            self.completed += len(items) - len(failed)
            for index, error in failed.items():
                msg = items[index][3]
                log.warning(
                    "result of %s not published (%r); it will be redelivered", msg.subject, error
                )
                with contextlib.suppress(Exception):
                    await msg.nak(delay=5)
        finally:
            for msg, _ in ready:
                self.in_flight.pop(msg.reply or "", None)
            self._slot_free.set()

    async def process(self, msg: Msg) -> None:
        """One pulled message that waits for the engine; `self.running` counted it already."""
        token = msg.reply or new_id("m")
        self.in_flight[token] = msg
        in_engine = True
        try:
            try:
                req = _request_decoder.decode(msg.data)
            except msgspec.DecodeError as e:
                log.error("undecodable request on %s: %s", msg.subject, e)
                await self._dead_letter(msg, f"undecodable request: {e}")
                await msg.term()
                return
            try:
                result = await self.handle(req, bus.delivery_count(msg))
            finally:
                in_engine = False
                self._release_slot()
            if result is None:
                await msg.nak(delay=min(30.0, 2.0 ** bus.delivery_count(msg)))
                return
            # Acked once RESULTS holds the result; results finishing together share one round
            # trip to the server.
            assert self.results is not None
            await self.results.publish_then_ack(
                ResultMessage.subject_for(req.batch_id), _encoder.encode(result), result.msg_id, msg
            )
            self.completed += 1
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request on %s not handled; it will be redelivered", msg.subject)
            with contextlib.suppress(Exception):
                await msg.nak(delay=5)
        finally:
            if in_engine:
                self._release_slot()
            self.in_flight.pop(token, None)
            self._slot_free.set()

    def _release_slot(self) -> None:
        self.running -= 1
        self._slot_free.set()

    async def pull_loop(self, js, stop: asyncio.Event) -> None:  # type: ignore[no-untyped-def]
        token = subject_token(self.spec.name)
        self._js = js
        self.results = bus.AckAfterPublish(js)
        sub = await bus.durable_fast_pull(
            js,
            bus.REQUESTS,
            f"inference-{token}",
            f"jetbatch.requests.{token}.>",
            ack_wait_s=self.settings.request_ack_wait_s,
            max_deliver=self.settings.request_max_deliver,
            max_ack_pending=max(10_000, self.max_unacked * 2),
        )
        while not stop.is_set():
            if not self.gate.healthy:
                # The GPU is over a threshold: take nothing new until it recovers (the heartbeat
                # loop reads it). What is in flight finishes.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), UNHEALTHY_POLL_S)
                continue
            free = min(self.capacity - self.running, self.max_unacked - len(self.in_flight))
            if free <= 0:
                self._slot_free.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_free.wait(), 1.0)
                continue
            await self.take(await sub.fetch(min(free, FETCH_MAX), 1.0))
        with contextlib.suppress(Exception):
            await sub.unsubscribe()

    async def serve_interactive(self, nc, engine_loop: asyncio.AbstractEventLoop) -> None:  # type: ignore[no-untyped-def]
        """Serve synchronous requests on `nc`, from the event loop this runs on: the worker's
        fast lane (shared.lane), a thread and a NATS connection of their own, so a request
        never waits behind a batch's deliveries, its results or the main loop's slices of batch
        work. One the engine answers at once is answered in the callback; the others run on
        the engine's loop (`engine_loop`), a task each, so a long one never holds up the next."""
        tasks: set[asyncio.Task[None]] = set()

        async def on_request(msg: Msg) -> None:
            self._sync_seen = time.monotonic()
            try:
                req = _interactive_decoder.decode(msg.data)
            except msgspec.DecodeError as e:
                undecodable = EngineResult(
                    status_code=400,
                    error_code="invalid_request_error",
                    error_message=f"undecodable request: {e}",
                )
                await msg.respond(
                    _encoder.encode(result_for("", undecodable, worker_id=self.worker_id))
                )
                return
            outcome = self._interactive_now(req)
            if outcome is None:
                task = asyncio.create_task(self._interactive(msg, req, engine_loop))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            else:
                await self._respond(msg, req, outcome)

        await nc.subscribe(
            InteractiveRequest.subject_for(self.spec.name),
            queue=f"inference-{subject_token(self.spec.name)}",
            cb=on_request,
        )

    def _interactive_now(self, req: InteractiveRequest) -> EngineResult | None:
        if req.endpoint not in self.spec.endpoints:
            return EngineResult(
                status_code=400,
                error_code="invalid_request_error",
                error_message=f"model {req.model!r} does not serve {req.endpoint}",
            )
        try:
            return self.engine.answer_now(req.endpoint, bytes(req.body), req.request_id)
        except Exception:
            return None  # the engine's full path reports it

    async def _interactive(
        self, msg: Msg, req: InteractiveRequest, engine_loop: asyncio.AbstractEventLoop
    ) -> None:
        outcome = await on_loop(engine_loop, self._run_interactive(req))
        await self._respond(msg, req, outcome)

    async def _run_interactive(self, req: InteractiveRequest) -> EngineResult:
        try:
            return await self.engine.run(
                req.endpoint, bytes(req.body), req.request_id, interactive=True
            )
        except Exception as e:
            log.exception("engine failed on interactive request %s", req.request_id)
            return EngineResult(status_code=500, error_code="engine_error", error_message=str(e))

    async def _respond(self, msg: Msg, req: InteractiveRequest, outcome: EngineResult) -> None:
        self._count_tokens(outcome.output_tokens)
        await msg.respond(
            _encoder.encode(result_for(req.request_id, outcome, worker_id=self.worker_id))
        )

    async def keep_alive(self, stop: asyncio.Event) -> None:
        """Tell JetStream that long requests are still being worked on, so they aren't redelivered."""
        interval = max(1.0, self.settings.request_ack_wait_s / 3)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            for msg in list(self.in_flight.values()):
                with contextlib.suppress(Exception):
                    await msg.in_progress()

    def heartbeat(self) -> WorkerHeartbeat:
        reading = self.gpu.read()
        healthy = self.gate.update(reading)
        return WorkerHeartbeat(
            worker_id=self.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            model=self.spec.name,
            endpoints=list(self.spec.endpoints),
            engine=self.engine.name,
            started_at=self.started_at,
            seen_at=int(time.time()),
            in_flight=self.running,  # in the engine, against `capacity`
            capacity=self.capacity,
            completed=self.completed,
            tokens_per_s=self._tokens_per_s(),
            gpu_index=reading.index if reading else self.gpu.index,
            gpu_name=reading.name if reading else None,
            gpu_memory_used_mb=reading.memory_used_mb if reading else None,
            gpu_memory_total_mb=reading.memory_total_mb if reading else None,
            gpu_temperature_c=reading.temperature_c if reading else None,
            gpu_utilization_pct=reading.utilization_pct if reading else None,
            healthy=healthy,
        )

    async def heartbeat_loop(self, kv, stop: asyncio.Event) -> None:  # type: ignore[no-untyped-def]
        while not stop.is_set():
            try:
                await kv.put(self.worker_id, _encoder.encode(self.heartbeat()))
            except Exception as e:
                log.warning("heartbeat not written: %s", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.heartbeat_interval_s)

    async def drain(self, timeout_s: float) -> None:
        """Let in-flight requests finish; hand back whatever is still running after the timeout.

        What is still running is stopped first (aborted in the engine), then every message not
        acked is nak'ed, so JetStream redelivers it at once to another worker. A request whose
        result was published but not yet acked is redelivered too: its result has the same msg
        id, and the results writer keeps one row per line, so nothing is duplicated."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            self._slot_free.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._slot_free.wait(), 0.5)
        leftover = list(self.in_flight.values())
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        handed_back = 0
        for msg in leftover:
            if msg.is_acked:
                continue
            with contextlib.suppress(Exception):
                await msg.nak()
                handed_back += 1
        if handed_back:
            log.info("handed back %d in-flight requests", handed_back)

    def _abort_batch(self, stop: BatchStop) -> None:
        for request_id in list(self._running.get(stop.batch_id, ())):
            self._spawn(self.engine.abort(request_id))

    async def _dead_letter(self, msg: Msg, error: str) -> None:
        """Hand a message this worker cannot use to the watchdog, which records it."""
        meta = msg.metadata
        letter = DeadLetterMessage(
            stream=meta.stream,
            stream_seq=meta.sequence.stream,
            consumer=meta.consumer,
            original_subject=msg.subject,
            payload=msg.data,
            error=error,
            deliveries=int(meta.num_delivered),
            headers=dict(msg.headers) if msg.headers else None,
        )
        assert self._js is not None
        publisher = bus.Publisher(self._js)
        await publisher.publish(
            DeadLetterMessage.subject_for(letter.stream), _encoder.encode(letter), letter.msg_id
        )
        await publisher.flush()

    def _spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _count_tokens(self, n: int) -> None:
        if n:
            self._tokens.append((time.monotonic(), n))

    def _tokens_per_s(self, window_s: float = 30.0) -> float:
        now = time.monotonic()
        while self._tokens and self._tokens[0][0] < now - window_s:
            self._tokens.popleft()
        return round(sum(n for _, n in self._tokens) / window_s, 2)


async def run(
    settings: config.Settings,
    model: str,
    gpu_index: int | None,
    stop: asyncio.Event,
    worker_id: str | None = None,
) -> None:
    spec = settings.model(model)
    if spec is None:
        raise config.ConfigError(
            f"model {model!r} is not configured; served: {[m.name for m in settings.models]}"
        )
    if not settings.nats_url:
        raise config.ConfigError("JETBATCH_NATS_URL is not set")
    worker_id = worker_id or f"{socket.gethostname()}-{subject_token(spec.name)}-{os.getpid()}"
    worker_id = "".join(c if c.isalnum() or c in "-_=" else "_" for c in worker_id)
    engine = make_engine(settings, spec)
    log.info("starting %s engine for %s (worker %s)", engine.name, spec.name, worker_id)
    await engine.start()
    telemetry.freeze_heap()  # vLLM's imports: millions of objects no collection should rescan
    nc = await bus.connect(settings.nats_url, name=f"inference:{worker_id}")
    nc_sync = None
    lane = Lane(f"inference-sync:{worker_id}")
    try:
        js = nc.jetstream(publish_async_max_pending=8192)
        await bus.ensure_streams(js)
        kv = await bus.workers_kv(js)
        worker = Worker(settings, spec, engine, GpuMonitor(gpu_index), worker_id)
        # Before the first pull: a request of a batch cancelled while we were down must not run.
        await worker.cancellations.start(nc, js)
        lane.start()
        nc_sync = await lane.call(
            bus.connect(settings.nats_url, name=f"inference-sync:{worker_id}")
        )
        await lane.call(worker.serve_interactive(nc_sync, asyncio.get_running_loop()))
        fetching = asyncio.Event()  # set = stop fetching
        drained = asyncio.Event()  # heartbeats and ack extensions go on while draining
        background = [
            asyncio.create_task(worker.heartbeat_loop(kv, drained)),
            asyncio.create_task(worker.keep_alive(drained)),
            asyncio.create_task(worker.cancellations.keep_in_sync(drained)),
        ]
        puller = asyncio.create_task(worker.pull_loop(js, fetching))
        log.info("worker %s ready: model=%s capacity=%d", worker_id, spec.name, worker.capacity)
        await stop.wait()
        log.info("stopping: no new requests; draining %d in flight", len(worker.in_flight))
        fetching.set()
        await puller
        await worker.drain(settings.health.drain_timeout_s)
        if worker.results is not None:
            # Its reply subscription would hold the NATS drain below for its whole timeout.
            await worker.results.close()
        drained.set()
        await asyncio.gather(*background, return_exceptions=True)
        with contextlib.suppress(Exception):
            await kv.delete(worker_id)
    finally:
        if nc_sync is not None:
            with contextlib.suppress(Exception):
                await lane.call(nc_sync.drain())
        lane.stop()
        with contextlib.suppress(Exception):
            await nc.drain()
        await engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="jetbatch inference")
    parser.add_argument("--model", required=True, help="served model name (JETBATCH_MODELS)")
    parser.add_argument("--gpu", type=int, default=None, help="GPU index this worker owns")
    parser.add_argument("--worker-id", default=None)
    args = parser.parse_args()
    if args.gpu is not None:
        # Before the engine starts: the worker sees only its own GPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
    settings = config.load()
    telemetry.setup("inference", settings.log_level)
    asyncio.run(_main(settings, args.model, args.gpu, args.worker_id))


async def _main(
    settings: config.Settings, model: str, gpu: int | None, worker_id: str | None
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run(settings, model, gpu, stop, worker_id)
