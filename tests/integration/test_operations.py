"""Limits at batch creation (429, nothing half-created), the healthy-worker gate (503), the
workers route with its stale flag, stalled batches, re-drive of a batch a crashed api left in
`validating`, and GPU gating of a real worker's pulls with recorded readings."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import nats
import openai
import pytest

from schemas.messages import RequestMessage, ResultMessage, WorkerHeartbeat
from schemas.projects import DEFAULT_PROJECT_ID
from services.api import store
from services.inference import service as inference
from services.inference.gpu import GpuMonitor, GpuReading
from services.inference.instant_engine import InstantEngine
from shared import bus, config
from shared.db import connect_pool
from tests.helpers import CHAT, CHAT_MODEL, chat_jsonl, wait_until
from tests.lifecycle_helpers import fetchrow, lifecycle_env, running_system


@pytest.fixture
def env(database_url: str, nats_url: str, scratch_dir: Path) -> dict[str, str]:
    return lifecycle_env(database_url, nats_url, scratch_dir)


def heartbeat(worker_id: str, *, seen_at: float, healthy: bool = True) -> bytes:
    return msgspec.json.encode(
        WorkerHeartbeat(
            worker_id=worker_id,
            host="gpu-box",
            pid=1,
            model=CHAT_MODEL,
            endpoints=[CHAT],
            engine="vllm",
            started_at=0,
            seen_at=int(seen_at),
            gpu_index=0,
            gpu_name="NVIDIA H100 80GB HBM3",
            gpu_temperature_c=91 if not healthy else 60,
            healthy=healthy,
        )
    )


async def batch_count(database_url: str) -> int:
    row = await fetchrow(database_url, "SELECT count(*) AS n FROM batches")
    assert row is not None
    return int(row["n"])


async def test_too_many_open_batches_is_a_429_and_creates_nothing(
    env: dict[str, str], database_url: str
) -> None:
    env = {**env, "JETBATCH_MAX_ACTIVE_BATCHES": "2"}
    async with running_system(env, start=()) as system:  # no worker: batches stay open
        file_id = await system.upload(chat_jsonl(3))
        for _ in range(2):
            await system.client.batches.create(
                input_file_id=file_id, endpoint=CHAT, completion_window="24h"
            )
        with pytest.raises(openai.RateLimitError) as refused:
            await system.client.batches.create(
                input_file_id=file_id, endpoint=CHAT, completion_window="24h"
            )
        assert refused.value.code == "too_many_active_batches"
        assert "2" in refused.value.message
        assert await batch_count(database_url) == 2
        # A cancelled batch no longer counts.
        first = (await system.client.batches.list()).data[-1]
        await system.client.batches.cancel(first.id)
        await system.client.batches.create(
            input_file_id=file_id, endpoint=CHAT, completion_window="24h"
        )


async def test_a_full_queue_is_a_429_and_creates_nothing(
    env: dict[str, str], database_url: str
) -> None:
    env = {**env, "JETBATCH_MAX_QUEUED_REQUESTS": "10"}
    async with running_system(env, start=()) as system:
        six = await system.upload(chat_jsonl(6))
        await system.client.batches.create(
            input_file_id=six, endpoint=CHAT, completion_window="24h"
        )
        with pytest.raises(openai.RateLimitError) as refused:
            await system.client.batches.create(
                input_file_id=six, endpoint=CHAT, completion_window="24h"
            )
        assert refused.value.code == "queue_full"
        assert await batch_count(database_url) == 1
        four = await system.upload(chat_jsonl(4))
        await system.client.batches.create(
            input_file_id=four, endpoint=CHAT, completion_window="24h"
        )


async def test_concurrent_creates_never_exceed_the_limit(
    env: dict[str, str], database_url: str
) -> None:
    env = {**env, "JETBATCH_MAX_ACTIVE_BATCHES": "3"}
    async with running_system(env, start=()) as system:
        file_id = await system.upload(chat_jsonl(2))

        async def create() -> bool:
            try:
                await system.client.batches.create(
                    input_file_id=file_id, endpoint=CHAT, completion_window="24h"
                )
                return True
            except openai.RateLimitError:
                return False

        outcomes = await asyncio.gather(*(create() for _ in range(8)))
    assert sum(outcomes) == 3
    assert await batch_count(database_url) == 3


async def test_batch_creation_needs_a_healthy_worker_when_required(
    env: dict[str, str], nats_url: str, database_url: str
) -> None:
    env = {**env, "JETBATCH_REQUIRE_HEALTHY_WORKER": "true", "JETBATCH_WORKER_STALE_S": "60"}
    nc = await nats.connect(nats_url)
    try:
        async with running_system(env, start=()) as system:
            kv = await bus.workers_kv(nc.jetstream())
            file_id = await system.upload(chat_jsonl(2))

            async def refused() -> openai.APIStatusError:
                with pytest.raises(openai.InternalServerError) as e:
                    await system.client.batches.create(
                        input_file_id=file_id, endpoint=CHAT, completion_window="24h"
                    )
                assert e.value.status_code == 503
                return e.value

            error = await refused()  # nobody there
            assert error.code == "no_healthy_worker" and CHAT_MODEL in error.message
            await kv.put("hot", heartbeat("hot", seen_at=time.time(), healthy=False))
            await refused()  # there, but its GPU is over a threshold
            await kv.put("gone", heartbeat("gone", seen_at=time.time() - 120))
            await refused()  # healthy, but not heard of for 2 minutes
            assert await batch_count(database_url) == 0
            await kv.put("ok", heartbeat("ok", seen_at=time.time()))
            created = await system.client.batches.create(
                input_file_id=file_id, endpoint=CHAT, completion_window="24h"
            )
            assert created.status == "validating"

            workers = await system.client.get("/workers", cast_to=object)
            by_id = {w["worker_id"]: w for w in workers["data"]}  # type: ignore[index]
            assert set(by_id) == {"hot", "gone", "ok"}
            assert by_id["gone"]["stale"] and by_id["gone"]["age_s"] >= 119
            assert not by_id["ok"]["stale"] and by_id["ok"]["healthy"]
            assert not by_id["hot"]["healthy"] and by_id["hot"]["gpu_temperature_c"] == 91
    finally:
        await nc.close()


async def test_a_batch_left_validating_by_a_crashed_api_is_re_driven(
    env: dict[str, str], database_url: str
) -> None:
    async with running_system(env) as system:
        file_id = await system.upload(chat_jsonl(5))
        pool = await connect_pool(database_url)
        try:
            # As a crashed api leaves it: the row, nothing validated or published.
            await store.insert_batch(
                pool,
                batch_id="batch_orphaned",
                endpoint=CHAT,
                input_file_id=file_id,
                completion_window="24h",
                created_at=int(time.time()),
                expires_at=int(time.time()) + 86_400,
                metadata=None,
                output_expires_after=None,
                project_id=DEFAULT_PROJECT_ID,
            )
        finally:
            await pool.close()
        batch = await system.wait_batch("batch_orphaned", {"completed"}, timeout_s=20)
    assert batch.request_counts.total == 5 and batch.request_counts.completed == 5


async def test_a_batch_without_progress_is_flagged_stalled_until_it_moves(
    env: dict[str, str],
) -> None:
    env = {**env, "JETBATCH_BATCH_STALL_S": "1"}
    async with running_system(env, start=("results_writer", "watchdog")) as system:
        batch_id = await system.create(chat_jsonl(2))  # no worker: nothing happens

        async def stalled() -> int | None:
            batch = await system.client.batches.retrieve(batch_id)
            return (batch.model_extra or {}).get("stalled_at")

        since = await wait_until(stalled, "the stalled flag")
        assert since <= time.time()
        system.start("worker:w1")
        await system.wait_batch(batch_id, {"completed"})

        async def cleared() -> bool:
            return await stalled() is None

        await wait_until(cleared, "the flag to clear")


class Readings(GpuMonitor):
    """A GPU that replays readings: hot until told otherwise."""

    def __init__(self) -> None:
        super().__init__(None)
        self.index = 0
        self.temperature_c = 93

    def read(self) -> GpuReading | None:
        return GpuReading(
            index=0,
            name="NVIDIA H100 80GB HBM3",
            memory_used_mb=73_400,
            memory_total_mb=81_559,
            temperature_c=self.temperature_c,
            utilization_pct=98,
        )


async def test_a_worker_with_a_hot_gpu_pulls_nothing_until_it_cools(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu = Readings()
    monkeypatch.setattr(inference, "GpuMonitor", lambda index: gpu)
    settings = config.load(
        {
            "JETBATCH_NATS_URL": nats_url,
            "JETBATCH_ENGINE": "instant",
            "JETBATCH_DATA_DIR": "/tmp/jetbatch-unused",
            "JETBATCH_HEARTBEAT_INTERVAL_S": "0.2",
            "JETBATCH_GPU_MAX_TEMPERATURE_C": "88",
        }
    )
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await bus.ensure_streams(js)
    kv = await bus.workers_kv(js)
    stop = asyncio.Event()
    task = asyncio.create_task(inference.run(settings, CHAT_MODEL, 0, stop, worker_id="w-hot"))
    try:

        async def beat() -> WorkerHeartbeat | None:
            try:
                entry = await kv.get("w-hot")
            except Exception:
                return None
            return msgspec.json.decode(entry.value or b"", type=WorkerHeartbeat)

        first = await wait_until(beat, "a heartbeat")
        assert not first.healthy and first.gpu_temperature_c == 93
        body = msgspec.Raw(b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}]}'
                           % CHAT_MODEL.encode())  # fmt: skip
        req = RequestMessage(batch_id="ext-gpu", line=0, custom_id="a", endpoint=CHAT,
                             model=CHAT_MODEL, body=body)  # fmt: skip
        await js.publish(RequestMessage.subject_for(CHAT_MODEL), msgspec.json.encode(req),
                         headers={bus.MSG_ID: req.msg_id})  # fmt: skip
        await asyncio.sleep(1.5)
        info = await js.stream_info(bus.REQUESTS.name)
        assert info.state.messages == 1  # still queued: the hot worker did not take it

        gpu.temperature_c = 70  # recovered (below 88 - 5)
        sub = await js.subscribe(ResultMessage.subject_for("ext-gpu"), ordered_consumer=True)
        result = msgspec.json.decode((await sub.next_msg(timeout=10)).data, type=ResultMessage)
        assert result.ok
        healthy = await wait_until(
            lambda: _healthy(beat()), "a healthy heartbeat"
        )  # fmt: skip
        assert healthy.gpu_temperature_c == 70
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await nc.close()


async def _healthy(beat):  # type: ignore[no-untyped-def]
    b = await beat
    return b if b is not None and b.healthy else None


def test_instant_engine_is_not_slowed_by_default() -> None:
    engine = InstantEngine(config.load({}).models[0])
    assert engine._delay_s == 0
