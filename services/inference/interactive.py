"""The worker's sync lane: synchronous requests over core NATS request/reply on
`jetbatch.interactive.<model>` (queue group `inference-<model>`), served from a thread and a
NATS connection of their own (shared.lane), so a request never waits behind a batch's
deliveries, its results or the main loop's slices of batch work."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import msgspec
from nats.aio.msg import Msg

from schemas.messages import InteractiveRequest, subject_token
from services.inference.engine import EngineResult
from services.inference.results import result_for
from shared.lane import on_loop

if TYPE_CHECKING:
    from services.inference.service import Worker

log = logging.getLogger(__name__)

_decoder = msgspec.json.Decoder(InteractiveRequest)
_encoder = msgspec.json.Encoder()


class SyncLane:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._tasks: set[asyncio.Task[None]] = set()
        self._engine_loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, nc, engine_loop: asyncio.AbstractEventLoop) -> None:  # type: ignore[no-untyped-def]
        """Serve synchronous requests on `nc`, from the event loop this runs on (the lane's).
        One the engine answers at once is answered in the callback; the others run on the
        engine's loop (`engine_loop`), a task each, so a long one never holds up the next."""
        spec = self.worker.spec
        self._engine_loop = engine_loop
        await nc.subscribe(
            InteractiveRequest.subject_for(spec.name),
            queue=f"inference-{subject_token(spec.name)}",
            cb=self._on_request,
        )

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
        outcome = self._answer_now(req)
        if outcome is None:
            task = asyncio.create_task(self._later(msg, req, engine_loop))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            await self._respond(msg, req, outcome)

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
        self, msg: Msg, req: InteractiveRequest, engine_loop: asyncio.AbstractEventLoop | None
    ) -> None:
        assert engine_loop is not None
        outcome = await on_loop(engine_loop, self._run(req))
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
