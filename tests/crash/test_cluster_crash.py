"""A batch on a real 3-node NATS cluster (3 replicas) while the node that leads REQUESTS is
SIGKILLed mid-batch, then, once it is back and caught up, the node that leads RESULTS: the batch
completes with every custom_id exactly once, and the killed nodes rejoin."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from shared import bus
from shared.embedded import EmbeddedNatsCluster
from tests.crash.test_crash import FAST_RECOVERY, check_batch, client, create, done
from tests.harness import Harness
from tests.helpers import wait_until_sync

pytestmark = [pytest.mark.slow, pytest.mark.crash, pytest.mark.cluster]


async def _stream_state(url: str, stream: str) -> tuple[str, bool]:
    """The stream's leader, and whether every other replica is current."""
    nc = await bus.connect(url, "crash-test")
    try:
        info = await nc.jetstream().stream_info(stream)
        assert info.cluster is not None and info.cluster.leader is not None
        peers = info.cluster.replicas or []
        return info.cluster.leader, len(peers) == 2 and all(p.current for p in peers)
    finally:
        await nc.close()


def stream_state(url: str, stream: str) -> tuple[str, bool]:
    return asyncio.run(_stream_state(url, stream))


def kill_leader_and_bring_it_back(
    cluster: EmbeddedNatsCluster,
    stream: str,
    progress: Callable[[], object],
) -> str:
    leader, _ = stream_state(cluster.url, stream)
    cluster.node(leader).kill()
    progress()  # work goes on through the two nodes left
    cluster.node(leader).start()
    wait_until_sync(
        lambda: stream_state(cluster.url, stream)[1],
        f"{leader} to rejoin {stream} and catch up",
        timeout_s=60,
        interval_s=0.5,
        retry_on=(Exception,),
    )
    return leader


def test_a_batch_finishes_exactly_once_when_stream_leaders_are_killed(
    database_url: str, tmp_path: Path
) -> None:
    cluster = EmbeddedNatsCluster(tmp_path / "cluster").start()
    h = Harness(
        tmp_path / "harness",
        dict(FAST_RECOVERY, JETBATCH_NATS_REPLICAS="3"),
        nats=cluster,
        database_url=database_url,
    )
    try:
        asyncio.run(bus.wait_for_jetstream(cluster.url))
        h.start_servers()
        for name in ("api", "results_writer", "watchdog", "worker-1"):
            h.start(name)
        h.wait_api()
        c = client(h)
        n = 3_000  # ~8 s of work at full speed: both kills land mid-batch
        batch_id = create(c, n, "k")

        def at_least(k: int):  # type: ignore[no-untyped-def]
            return lambda: wait_until_sync(
                lambda: done(c, batch_id) >= k, f"{k} lines done", timeout_s=120,
                interval_s=0.2, retry_on=(Exception,),
            )  # fmt: skip

        wait_until_sync(lambda: done(c, batch_id) >= 50, "work started", timeout_s=120,
                        interval_s=0.1, retry_on=(Exception,))  # fmt: skip
        kill_leader_and_bring_it_back(cluster, "REQUESTS", at_least(500))
        kill_leader_and_bring_it_back(cluster, "RESULTS", at_least(1_500))
        check_batch(h, c, batch_id, n, "k", {"completed"})
    finally:
        h.stop_all()
        cluster.stop()
