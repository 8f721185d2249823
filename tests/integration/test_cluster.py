"""Streams and buckets on a real 3-node NATS cluster on loopback (and on a single server): the
replica count comes from one setting, is never lowered, limits an operator changed are kept,
work goes on when the node that leads REQUESTS is SIGKILLed, and without a quorum uploads answer
503 (retryable) until it is back."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import openai
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StreamConfig

from services.api.service import running
from shared import bus, config
from shared.bus import objects
from shared.bus.streams import ReplicasUnavailable
from shared.embedded import EmbeddedNats, EmbeddedNatsCluster, free_port
from tests.helpers import API_KEY, chat_line, wait_until

pytestmark = pytest.mark.cluster


@pytest.fixture
def cluster(scratch_dir: Path) -> Iterator[EmbeddedNatsCluster]:
    nodes = EmbeddedNatsCluster(Path(tempfile.mkdtemp(prefix="cluster-", dir=scratch_dir)))
    nodes.start()
    try:
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture
async def cluster_js(cluster: EmbeddedNatsCluster) -> AsyncIterator[tuple[NATS, JetStreamContext]]:
    await bus.wait_for_jetstream(cluster.url)
    nc = await bus.connect(cluster.url, "cluster-test")
    js = nc.jetstream()
    yield nc, js
    await nc.close()


async def replicas(js: JetStreamContext, stream: str) -> int:
    return (await js.stream_info(stream)).config.num_replicas or 1


def test_a_comma_separated_url_is_every_server_of_a_cluster() -> None:
    assert bus.streams.server_list("nats://a:4222, nats://b:4222,") == [
        "nats://a:4222",
        "nats://b:4222",
    ]


async def test_every_stream_and_bucket_gets_three_replicas_and_a_restart_never_lowers_them(
    cluster_js: tuple[NATS, JetStreamContext],
) -> None:
    _, js = cluster_js
    await bus.ensure_streams(js, replicas=3)
    await bus.workers_kv(js, 3)
    await bus.cancelled_kv(js, 3)
    await bus.files_bucket(js, 3)
    names = [s.name for s in bus.STREAMS] + [
        f"KV_{bus.WORKERS_BUCKET}",
        f"KV_{bus.CANCELLED_BUCKET}",
        f"OBJ_{objects.FILES_BUCKET}",
    ]
    assert [await replicas(js, n) for n in names] == [3] * len(names)
    # A service started with the default (1) finds them replicated and leaves them so.
    await bus.ensure_streams(js)
    await bus.workers_kv(js)
    await bus.files_bucket(js)
    assert [await replicas(js, n) for n in names] == [3] * len(names)


async def test_a_stream_under_the_setting_is_raised_to_it(
    cluster_js: tuple[NATS, JetStreamContext],
) -> None:
    _, js = cluster_js
    await bus.ensure_streams(js, (bus.RESULTS,), replicas=1)
    assert await replicas(js, "RESULTS") == 1
    await bus.ensure_streams(js, (bus.RESULTS,), replicas=3)
    assert await replicas(js, "RESULTS") == 3


async def test_work_goes_on_when_the_node_leading_requests_is_killed(
    cluster: EmbeddedNatsCluster, cluster_js: tuple[NATS, JetStreamContext]
) -> None:
    _, js = cluster_js
    await bus.ensure_streams(js, (bus.REQUESTS,), replicas=3)
    publisher = bus.Publisher(js)
    for i in range(600):
        await publisher.publish("jetbatch.requests.m.batch", str(i).encode(), f"b:{i}")
    await publisher.flush()
    pull = await bus.durable_fast_pull(
        js, bus.REQUESTS, "inference-m", "jetbatch.requests.m.>",
        ack_wait_s=2, max_deliver=-1, max_ack_pending=10_000,
    )  # fmt: skip
    seen: set[bytes] = set()
    for msg in await pull.fetch(300, 2):
        seen.add(msg.data)
        await msg.ack()
    leader = (await js.stream_info("REQUESTS")).cluster.leader
    cluster.node(leader).kill()

    async def drained() -> bool:
        try:
            for msg in await pull.fetch(300, 0.5):
                seen.add(msg.data)
                await msg.ack()
            return (await js.stream_info("REQUESTS")).state.messages == 0
        except Exception:  # the election is still on: ask again
            return False

    await wait_until(drained, "the rest of the work through the new leader", timeout_s=60)
    assert seen == {str(i).encode() for i in range(600)}
    # The killed node comes back on its store and catches up.
    cluster.node(leader).start()

    async def caught_up() -> bool:
        info = await js.stream_info("REQUESTS")
        peers = info.cluster.replicas or []
        return len(peers) == 2 and all(p.current for p in peers)

    await wait_until(caught_up, f"{leader} to rejoin and catch up", timeout_s=60)


async def test_three_replicas_on_a_single_server_fail_naming_the_setting(
    nats_server: EmbeddedNats,
) -> None:
    nc = await bus.connect(nats_server.url, "single")
    try:
        with pytest.raises(ReplicasUnavailable, match="JETBATCH_NATS_REPLICAS=3"):
            await bus.ensure_streams(nc.jetstream(), replicas=3)
    finally:
        await nc.close()


async def test_an_operators_limits_are_kept_and_a_declared_subject_replaces_the_one_it_covers(
    nats_server: EmbeddedNats,
) -> None:
    nc = await bus.connect(nats_server.url, "single")
    js = nc.jetstream()
    try:
        # As an earlier release created it, then an operator kept dead letters 90 days.
        await js.add_stream(
            StreamConfig(
                name="DEADLETTERS",
                subjects=[
                    "jetbatch.deadletters.>",
                    "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.REQUESTS.*",
                ],
                retention=RetentionPolicy.WORK_QUEUE,
                max_age=90 * 86_400,
            )
        )
        await bus.ensure_streams(js, (bus.DEADLETTERS,))
        config = (await js.stream_info("DEADLETTERS")).config
        assert sorted(config.subjects or []) == sorted(bus.DEADLETTERS.subjects)
        assert config.max_age == 90 * 86_400
        assert msgspec.json.encode(sorted(config.subjects or []))  # a plain list of strings
    finally:
        await nc.close()


async def test_without_a_quorum_uploads_answer_503_and_succeed_once_it_is_back(
    cluster: EmbeddedNatsCluster,
    database_url: str,
    scratch_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(objects, "ELECTION_WAIT_S", 3.0)  # the in-process api's wait, shortened
    await bus.wait_for_jetstream(cluster.url)
    env = {
        "JETBATCH_DATA_DIR": tempfile.mkdtemp(prefix="api-", dir=scratch_dir),
        "JETBATCH_DATABASE_URL": database_url,
        "JETBATCH_NATS_URL": cluster.url,
        "JETBATCH_NATS_REPLICAS": "3",
        "JETBATCH_API_KEY": API_KEY,
        "JETBATCH_API_PORT": str(free_port()),
    }
    content = b"".join(chat_line(f"r{i}") for i in range(200))
    async with running(config.load(env)) as base_url:
        client = openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0)
        kept = await client.files.create(file=("a.jsonl", content), purpose="batch")
        cluster.node("n1").kill()
        cluster.node("n2").kill()  # one node of three left: no quorum
        with pytest.raises(openai.InternalServerError) as down:
            await client.files.create(file=("b.jsonl", content), purpose="batch")
        assert down.value.status_code == 503
        assert down.value.body["code"] == "jetstream_unavailable"  # type: ignore[index]
        assert down.value.response.headers["retry-after"] == "5"
        cluster.node("n1").start()
        cluster.node("n2").start()

        async def uploaded() -> bool:
            try:
                await client.files.create(file=("b.jsonl", content), purpose="batch")
            except openai.InternalServerError:
                return False
            return True

        await wait_until(uploaded, "an upload once the quorum is back", timeout_s=60)

        async def kept_content() -> bytes | None:
            # Each stream elects its leader on its own time: the files bucket's may come later.
            try:
                return (await client.files.content(kept.id)).read()
            except openai.InternalServerError:
                return None

        assert await wait_until(kept_content, "the file kept", timeout_s=60) == content
