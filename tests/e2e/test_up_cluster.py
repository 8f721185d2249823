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
from shared.nats_auth import NatsAuth
from tests.e2e.conftest import run_batch, start_system, stop_system
from tests.helpers import chat_jsonl

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
        batch = run_batch(client, chat_jsonl(20, "c"), "c.jsonl")
        assert batch.request_counts is not None and batch.request_counts.completed == 20
        url = re.search(r"3-node NATS cluster at (\S+)", system.log_path.read_text())
        assert url is not None, system.log_tail()
        # The services' credentials, generated on first start and kept in the data dir.
        auth = NatsAuth.load_or_create(data_dir / "nats-cluster" / "nats-auth.json")
        admin = auth.url(url.group(1), "admin")
        assert set(asyncio.run(stream_replicas(admin)).values()) == {3}
    finally:
        code = stop_system(system)
    assert code == 0, system.log_tail()
