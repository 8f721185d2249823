"""The inference handler on Structs: what a request turns into, and when it is retried."""

from __future__ import annotations

import asyncio
import time

import msgspec
from nats.aio.msg import Msg

from schemas.messages import BatchStop, RequestMessage
from services.inference.engine import EngineResult
from services.inference.gpu import GpuMonitor, GpuReading
from services.inference.instant_engine import InstantEngine
from services.inference.service import TAKE_SLICE, TAKE_SLICE_SYNC, Worker
from shared import config

SETTINGS = config.load({"JETBATCH_ENGINE": "instant", "JETBATCH_REQUEST_MAX_DELIVER": "3"})
CHAT = SETTINGS.model("SmolLM2-135M-Instruct")
EMBED = SETTINGS.model("all-MiniLM-L6-v2")


def request(body: dict, endpoint: str = "/v1/chat/completions", line: int = 0) -> RequestMessage:
    return RequestMessage(
        batch_id="batch_x",
        line=line,
        custom_id=f"c{line}",
        endpoint=endpoint,
        model=body.get("model", ""),
        body=msgspec.Raw(msgspec.json.encode(body)),
    )


class FailingEngine:
    name = "failing"
    capacity = 4
    load = None

    def __init__(self, outcome: EngineResult | None = None) -> None:
        self.outcome = outcome
        self.batch_priorities: list[int] = []

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def abort(self, request_id: str) -> None: ...

    def answer_now(self, endpoint: str, body: bytes, request_id: str) -> EngineResult | None:
        return None

    async def run(
        self,
        endpoint: str,
        body: bytes,
        request_id: str,
        *,
        interactive: bool = False,
        batch_priority: int = 0,
    ) -> EngineResult:
        self.batch_priorities.append(batch_priority)
        if self.outcome is None:
            raise RuntimeError("CUDA error: device-side assert")
        return self.outcome


def worker(engine, spec=CHAT) -> Worker:  # type: ignore[no-untyped-def]
    return Worker(SETTINGS, spec, engine, GpuMonitor(None), "w1")


async def test_successful_request_becomes_a_200_result_with_usage() -> None:
    w = worker(InstantEngine(CHAT))
    result = await w.handle(
        request({"model": CHAT.name, "messages": [{"role": "user", "content": "hi"}]}), 1
    )
    assert result is not None and result.ok and result.status_code == 200
    assert result.batch_id == "batch_x" and result.custom_id == "c0"
    assert result.output_tokens > 0
    assert msgspec.json.decode(result.response_body)["object"] == "chat.completion"


async def test_request_id_is_stable_across_redeliveries() -> None:
    w = worker(InstantEngine(CHAT))
    req = request({"model": CHAT.name, "messages": [{"role": "user", "content": "hi"}]})
    first, second = await w.handle(req, 1), await w.handle(req, 2)
    assert first is not None and second is not None
    assert first.request_id == second.request_id and first.msg_id == second.msg_id


async def test_rejected_request_is_an_error_result_with_an_openai_error_body() -> None:
    w = worker(InstantEngine(CHAT))
    result = await w.handle(request({"model": CHAT.name}), 1)  # no messages
    assert result is not None and not result.ok and result.status_code == 400
    assert "error" in msgspec.json.decode(result.response_body)


async def test_endpoint_the_model_does_not_serve_is_rejected_without_the_engine() -> None:
    w = worker(FailingEngine(), EMBED)
    result = await w.handle(request({"model": EMBED.name, "messages": []}), 1)
    assert result is not None and result.status_code == 400
    assert "does not serve" in (result.error_message or "")


async def test_engine_crash_is_retried_then_becomes_an_error_line_on_the_last_delivery() -> None:
    w = worker(FailingEngine())
    req = request({"model": CHAT.name, "messages": []})
    assert await w.handle(req, 1) is None
    assert await w.handle(req, 2) is None
    last = await w.handle(req, 3)
    assert last is not None and last.error_code == "engine_error" and last.status_code == 500
    assert not last.has_body


async def test_engine_5xx_is_retried_like_a_crash() -> None:
    w = worker(
        FailingEngine(
            EngineResult(status_code=503, error_code="EngineDeadError", error_message="dead")
        )
    )
    req = request({"model": CHAT.name, "messages": []})
    assert await w.handle(req, 1) is None
    last = await w.handle(req, 3)
    assert last is not None and last.status_code == 503


def test_no_gpu_means_no_readings_and_a_heartbeat_without_gpu_fields() -> None:
    w = worker(InstantEngine(CHAT))
    assert GpuMonitor(0).read() is None  # no NVML library here: degrades, does not raise
    beat = w.heartbeat()
    assert beat.gpu_name is None and beat.model == CHAT.name and beat.capacity == 256


# Cancellation and expiry ---------------------------------------------------------------------


def chat_request(line: int = 0) -> RequestMessage:
    return request({"model": CHAT.name, "messages": [{"role": "user", "content": "hi"}]}, line=line)


async def test_request_of_a_cancelled_batch_is_answered_without_the_engine() -> None:
    w = worker(FailingEngine())  # would raise if it ran
    w.cancellations.add(BatchStop(batch_id="batch_x", reason="cancelled", at=1))
    result = await w.handle(chat_request(), 1)
    assert result is not None and not result.ok and not result.has_body
    assert result.error_code == "batch_cancelled" and result.status_code == 499
    assert result.custom_id == "c0" and result.msg_id == "batch_x:0:r"


async def test_request_of_an_expired_batch_is_a_batch_expired_line() -> None:
    w = worker(FailingEngine())
    w.cancellations.add(BatchStop(batch_id="batch_x", reason="expired", at=1))
    result = await w.handle(chat_request(), 1)
    assert result is not None and result.error_code == "batch_expired"
    assert "completion window" in (result.error_message or "")


async def test_running_request_is_aborted_when_its_batch_is_cancelled() -> None:
    w = worker(InstantEngine(CHAT, delay_s=30))
    running = asyncio.create_task(w.handle(chat_request(), 1))
    other = asyncio.create_task(w.handle(chat_request(line=1), 1))
    await asyncio.sleep(0.05)
    w.cancellations.add(BatchStop(batch_id="batch_x", reason="cancelled", at=1))
    result = await asyncio.wait_for(running, 5)
    assert result is not None and result.error_code == "batch_cancelled"
    assert (await asyncio.wait_for(other, 5)).error_code == "batch_cancelled"  # type: ignore[union-attr]


async def test_request_aborted_for_another_reason_is_retried() -> None:
    engine = InstantEngine(CHAT, delay_s=30)
    w = worker(engine)
    running = asyncio.create_task(w.handle(chat_request(), 1))
    await asyncio.sleep(0.05)
    [request_id] = w._running["batch_x"]
    await engine.abort(request_id)  # as at shutdown: not because of a cancel
    assert await asyncio.wait_for(running, 5) is None  # nak: another delivery runs it


class RecordedGpu(GpuMonitor):
    def __init__(self, readings: list[GpuReading]) -> None:
        super().__init__(None)
        self.index = 0
        self.readings = readings

    def read(self) -> GpuReading | None:
        return self.readings.pop(0) if self.readings else None


def test_heartbeat_says_unhealthy_while_the_gpu_is_over_a_threshold() -> None:
    settings = config.load({"JETBATCH_ENGINE": "instant", "JETBATCH_GPU_MAX_TEMPERATURE_C": "85"})
    hot = GpuReading(
        index=0,
        name="H100",
        memory_used_mb=70_000,
        memory_total_mb=81_559,
        temperature_c=91,
        utilization_pct=99,
    )
    cool = GpuReading(
        index=0,
        name="H100",
        memory_used_mb=70_000,
        memory_total_mb=81_559,
        temperature_c=60,
        utilization_pct=99,
    )
    w = Worker(settings, CHAT, InstantEngine(CHAT), RecordedGpu([hot, cool]), "w1")
    beat = w.heartbeat()
    assert not beat.healthy and beat.gpu_temperature_c == 91 and not w.gate.healthy
    beat = w.heartbeat()
    assert beat.healthy and w.gate.healthy


# -- the runner: engine slots and grouped results ------------------------------------------------


def pulled(req: RequestMessage, seq: int = 1) -> Msg:
    """A message as a pull delivers it: the ack subject carries the delivery count (1)."""
    return Msg(
        _client=None,  # type: ignore[arg-type]
        subject="jetbatch.requests.SmolLM2-135M-Instruct.batch",
        reply=f"$JS.ACK.REQUESTS.inference-x.1.{seq}.{seq}.1700000000.0",
        data=msgspec.json.encode(req),
    )


class HeldResults:
    """Stands in for bus.AckAfterPublish: holds every publish until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.single: list[str] = []
        self.groups: list[list[str]] = []

    async def publish_then_ack(self, subject, payload, msg_id, source, headers=None) -> None:  # type: ignore[no-untyped-def]
        self.single.append(msg_id)
        await self.release.wait()

    async def publish_many_then_ack(self, items):  # type: ignore[no-untyped-def]
        self.groups.append([msg_id for _, _, msg_id, _ in items])
        await self.release.wait()
        return {}


async def test_a_finished_request_frees_its_engine_slot_while_its_result_awaits_the_stream() -> (
    None
):
    w = worker(InstantEngine(CHAT, delay_s=0.01))  # waits for the engine: the per-request path
    held = HeldResults()
    w.results = held  # type: ignore[assignment]
    body = {"model": CHAT.name, "messages": [{"role": "user", "content": "hi"}]}
    await w.take([pulled(request(body))])
    assert w.running == 1
    await asyncio.sleep(0.1)
    # Out of the engine, not yet acked: a new request may enter the engine meanwhile.
    assert w.running == 0 and len(w.in_flight) == 1 and held.single
    held.release.set()
    await asyncio.sleep(0.01)
    assert not w.in_flight and w.completed == 1


async def test_requests_answered_without_waiting_are_published_as_one_group_per_slice() -> None:
    w = worker(InstantEngine(CHAT))
    held = HeldResults()
    w.results = held  # type: ignore[assignment]
    n = TAKE_SLICE + 10
    msgs = [
        pulled(
            request(
                {"model": CHAT.name, "messages": [{"role": "user", "content": f"q{i}"}]}, line=i
            ),
            i + 1,
        )
        for i in range(n)
    ]
    await w.take(msgs)
    await asyncio.sleep(0)
    assert [len(g) for g in held.groups] == [TAKE_SLICE, 10]
    assert w.running == 0 and len(w.in_flight) == n and not held.single
    held.release.set()
    await asyncio.sleep(0.01)
    assert not w.in_flight and w.completed == n


async def test_an_engine_that_fails_answering_at_once_is_retried_like_any_engine_failure() -> None:
    class Broken(InstantEngine):
        def _answer(self, endpoint: str, body: bytes, request_id: str) -> EngineResult:
            raise RuntimeError("bug in the engine")

    w = worker(Broken(CHAT))
    body = {"model": CHAT.name, "messages": [{"role": "user", "content": "hi"}]}
    assert await w.handle(request(body), 1) is None  # retried
    last = await w.handle(request(body), SETTINGS.request_max_deliver)
    assert last is not None and last.status_code == 500 and last.error_code == "engine_error"


async def test_batch_work_comes_in_smaller_slices_while_synchronous_requests_come_in() -> None:
    w = worker(InstantEngine(CHAT))
    held = HeldResults()
    w.results = held  # type: ignore[assignment]
    body = {"model": CHAT.name, "messages": [{"role": "user", "content": "q"}]}
    msgs = [pulled(request(body, line=i), i + 1) for i in range(40)]
    w._sync_seen = time.monotonic()  # as on_request does
    await w.take(msgs)
    await asyncio.sleep(0)
    assert w.sync_traffic()
    assert [len(g) for g in held.groups] == [TAKE_SLICE_SYNC, TAKE_SLICE_SYNC, 8]
    held.release.set()
