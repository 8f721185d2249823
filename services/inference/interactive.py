"""The worker's sync lane: synchronous requests over core NATS request/reply on
`jetbatch.interactive.<model>.<project>` (queue group `inference-<model>`), served from a thread and a
NATS connection of their own (shared.lane), so a request never waits behind a batch's
deliveries, its results or the main loop's slices of batch work.

A request the api gives up on (its client went away, no answer in time) is aborted here too:
the api publishes an InteractiveAbort on `jetbatch.interactive.abort.<model>.<project>`, which every
worker of the model receives (no queue group); the one running that request cancels it in the
engine (for vLLM: the request is aborted in the EngineCore, as `vllm serve` does for a client
that disconnects) and answers 499, the others ignore it. An abort that comes before its request
(the two travel on different subscriptions) is remembered, a bounded number of them, and the
request is then answered 499 without running."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

import msgspec
from nats.aio.msg import Msg

from schemas.messages import InteractiveAbort, InteractiveRequest, subject_token
from services.inference.engine import EngineResult
from services.inference.results import result_for

if TYPE_CHECKING:
    from services.inference.service import Worker

log = logging.getLogger(__name__)

# Aborts of requests not running here, kept in case their request is still on its way: every
# worker of the model gets every abort, so most are for another worker's requests.
EARLY_ABORTS_KEPT = 1024
MAX_REQUEST_ID = 256  # longer ids are not remembered (the api's are ~30 characters)

_decoder = msgspec.json.Decoder(InteractiveRequest)
_abort_decoder = msgspec.json.Decoder(InteractiveAbort)
_encoder = msgspec.json.Encoder()


def aborted() -> EngineResult:
    # As the engines' own abort (services.inference.engine): withdrawn, not failed.
    return EngineResult(
        status_code=499, error_code="request_aborted", error_message="Request was aborted"
    )


class SyncLane:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._tasks: set[asyncio.Task[None]] = set()
        self._engine_loop: asyncio.AbstractEventLoop | None = None
        # request id -> its run on the engine's loop; touched on the lane's loop only
        self._running: dict[str, concurrent.futures.Future[EngineResult]] = {}
        self._early_aborts: OrderedDict[str, None] = OrderedDict()
        self.aborted = 0  # synchronous requests aborted since start (heartbeat)

    @property
    def in_flight(self) -> int:
        """Synchronous requests in the engine now (heartbeat)."""
        return len(self._running)

    async def serve(self, nc, engine_loop: asyncio.AbstractEventLoop) -> None:  # type: ignore[no-untyped-def]
        """Serve synchronous requests on `nc`, from the event loop this runs on (the lane's).
        One the engine answers at once is answered in the callback; the others run on the
        engine's loop (`engine_loop`), a task each, so a long one never holds up the next."""
        spec = self.worker.spec
        self._engine_loop = engine_loop
        # Aborts first: once requests come, their aborts are heard.
        model = subject_token(spec.name)
        await nc.subscribe(
            InteractiveAbort.subject.format(model=model, project="*"), cb=self._on_abort
        )
        # Every project's requests, and those of an api from before projects, in one queue group.
        for subject in (
            InteractiveRequest.subject.format(model=model, project="*"),
            InteractiveRequest.legacy_subject.format(model=model),
        ):
            await nc.subscribe(subject, queue=f"inference-{model}", cb=self._on_request)

    async def _on_request(self, msg: Msg) -> None:
        engine_loop = self._engine_loop
        self.worker.intake.sync_seen = time.monotonic()
        try:
            req = _decoder.decode(msg.data)
        except msgspec.DecodeError as e:
            undecodable = EngineResult(
                status_code=400,
                error_code="invalid_request_error",
                error_message=f"undecodable request: {e}",
            )
            await msg.respond(
                _encoder.encode(result_for("", undecodable, worker_id=self.worker.worker_id))
            )
            return
        if req.request_id in self._early_aborts:  # its abort came first
            del self._early_aborts[req.request_id]
            self.aborted += 1
            await self._respond(msg, req, aborted())
            return
        outcome = self._answer_now(req)
        if outcome is not None:
            await self._respond(msg, req, outcome)
            return
        assert engine_loop is not None
        # Registered before anything awaits, so an abort handled next finds it.
        running = asyncio.run_coroutine_threadsafe(self._run(req), engine_loop)
        self._running[req.request_id] = running
        task = asyncio.create_task(self._later(msg, req, running))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_abort(self, msg: Msg) -> None:
        try:
            request_id = _abort_decoder.decode(msg.data).request_id
        except msgspec.DecodeError as e:
            log.warning("undecodable abort of a synchronous request: %s", e)
            return
        running = self._running.get(request_id)
        if running is None:
            if len(request_id) <= MAX_REQUEST_ID:
                self._early_aborts[request_id] = None
                while len(self._early_aborts) > EARLY_ABORTS_KEPT:
                    self._early_aborts.popitem(last=False)
            return
        # Cancels its task on the engine's loop, before or during the engine's work.
        if running.cancel():
            self.aborted += 1
            log.info("synchronous request %s aborted: the api gave up on it", request_id)

    def _answer_now(self, req: InteractiveRequest) -> EngineResult | None:
        if req.endpoint not in self.worker.spec.endpoints:
            return EngineResult(
                status_code=400,
                error_code="invalid_request_error",
                error_message=f"model {req.model!r} does not serve {req.endpoint}",
            )
        try:
            return self.worker.engine.answer_now(req.endpoint, bytes(req.body), req.request_id)
        except Exception:
            return None  # the engine's full path reports it

    async def _later(
        self, msg: Msg, req: InteractiveRequest, running: concurrent.futures.Future[EngineResult]
    ) -> None:
        try:
            outcome = await asyncio.wrap_future(running)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not running.cancelled() or (task is not None and task.cancelling()):
                raise  # the lane itself stops: the run is cancelled with it
            outcome = aborted()
        finally:
            if self._running.get(req.request_id) is running:
                del self._running[req.request_id]
        await self._respond(msg, req, outcome)

    async def _run(self, req: InteractiveRequest) -> EngineResult:
        try:
            return await self.worker.engine.run(
                req.endpoint, bytes(req.body), req.request_id, interactive=True
            )
        except Exception as e:
            log.exception("engine failed on interactive request %s", req.request_id)
            return EngineResult(status_code=500, error_code="engine_error", error_message=str(e))

    async def _respond(self, msg: Msg, req: InteractiveRequest, outcome: EngineResult) -> None:
        self.worker.heartbeats.count_tokens(outcome.output_tokens)
        await msg.respond(
            _encoder.encode(result_for(req.request_id, outcome, worker_id=self.worker.worker_id))
        )
