"""`jetbatch up --cluster`: the whole system on a local 3-node NATS cluster, every stream and
bucket with 3 replicas, a batch through the `openai` SDK. Instant engine: about NATS, not the
model."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import openai
import psutil
import pytest

from shared import bus
from tests.e2e.conftest import start_system, stop_system
from tests.helpers import CHAT, chat_jsonl, wait_until_sync

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]


async def stream_replicas(url: str) -> dict[str, int]:
    nc = await bus.connect(url, "up-cluster-test")
    try:
        js = nc.jetstream()
        names = [s.name for s in bus.STREAMS] + [f"KV_{bus.WORKERS_BUCKET}"]
        return {n: (await js.stream_info(n)).config.num_replicas or 1 for n in names}
    finally:
        await nc.close()


def test_up_with_a_cluster_replicates_every_stream_and_runs_a_batch(scratch_dir: Path) -> None:
    data_dir = scratch_dir / "e2e-cluster"
    system = start_system(data_dir, "instant", "up.log", "--cluster")
    try:
        nats = [
            p
            for p in psutil.Process(system.proc.pid).children(recursive=True)
            if "nats-server" in p.name()
        ]
        assert len(nats) == 3
        client = openai.OpenAI(base_url=system.base_url, api_key=system.api_key, max_retries=0)
        f = client.files.create(file=("c.jsonl", chat_jsonl(20, "c")), purpose="batch")
        batch = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
        wait_until_sync(
            lambda: client.batches.retrieve(batch.id).status == "completed",
            f"batch {batch.id} to complete",
            timeout_s=60,
            interval_s=0.2,
        )
        assert client.batches.retrieve(batch.id).request_counts.completed == 20
        url = re.search(r"3-node NATS cluster at (\S+)", system.log_path.read_text())
        assert url is not None, system.log_tail()
        assert set(asyncio.run(stream_replicas(url.group(1))).values()) == {3}
    finally:
        code = stop_system(system)
    assert code == 0, system.log_tail()
