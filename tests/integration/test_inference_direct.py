"""Other services skip HTTP: publish a RequestMessage straight to JetStream, read the
ResultMessage back from RESULTS. This is the README's "Publishing to JetStream directly" recipe,
run against a real nats-server and a real inference worker (instant engine)."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgspec
import nats
import pytest
from nats.js.api import ConsumerConfig
from nats.js.errors import KeyNotFoundError

from schemas.messages import (
    DIRECT,
    DISPATCHED,
    DeadLetterMessage,
    InteractiveRequest,
    RequestMessage,
    ResultMessage,
    WorkerHeartbeat,
)
from schemas.projects import DEFAULT_PROJECT_ID
from services.inference import service as inference
from shared import bus, config
from shared.embedded import EmbeddedNats
from shared.lane import Lane
from shared.nats_auth import NatsAuth, publisher_user
from tests.helpers import wait_until

CHAT = "SmolLM2-135M-Instruct"
PROJECT = "proj_orders"


def settings_for(nats_url: str, **extra: str) -> config.Settings:
    env = {
        "JETBATCH_NATS_URL": nats_url,
        "JETBATCH_ENGINE": "instant",
        "JETBATCH_DATA_DIR": "/tmp/jetbatch-unused",
        "JETBATCH_HEARTBEAT_INTERVAL_S": "0.2",
    }
    env.update(extra)
    return config.load(env)


@contextlib.asynccontextmanager
async def running_worker(settings: config.Settings, model: str):
    stop = asyncio.Event()
    task = asyncio.create_task(inference.run(settings, model, None, stop, worker_id="w-test"))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def read_results(
    js, batch_id: str, n: int, timeout_s: float = 20, project: str = DEFAULT_PROJECT_ID
) -> list[ResultMessage]:
    sub = await js.subscribe(
        ResultMessage.subject_for(batch_id, project),
        ordered_consumer=True,
        # Named, so the filter travels in the create subject: a publisher's role allows only
        # its own project's results there.
        config=ConsumerConfig(name=f"results-{batch_id}"),
    )
    decoder = msgspec.json.Decoder(ResultMessage)
    results = []
    try:
        while len(results) < n:
            msg = await sub.next_msg(timeout=timeout_s)
            results.append(decoder.decode(msg.data))
    finally:
        await sub.unsubscribe()
    return results


@pytest.fixture
def server(scratch_dir: Path) -> Iterator[EmbeddedNats]:
    """A nats-server that admits jetbatch's roles and an external publisher of PROJECT."""
    store = Path(tempfile.mkdtemp(prefix="nats-", dir=scratch_dir))
    server = EmbeddedNats(store, auth=NatsAuth.generate((PROJECT,))).start()
    try:
        yield server
    finally:
        server.stop()


def chat_request(i: int, **fields: str) -> RequestMessage:
    body = {"model": CHAT, "messages": [{"role": "user", "content": f"hi {i}"}]}
    return RequestMessage(
        batch_id="ext-orders-1",
        line=i,
        custom_id=f"order-{i}",
        endpoint="/v1/chat/completions",
        model=CHAT,
        body=msgspec.Raw(msgspec.json.encode(body)),
        **fields,  # type: ignore[arg-type]
    )


async def test_request_published_to_jetstream_comes_back_as_a_result(
    server: EmbeddedNats,
) -> None:
    """README's recipe, as an external publisher of its own project, the worker as `inference`."""
    settings = settings_for(server.url_for("inference"))
    setup = await nats.connect(server.url)
    await bus.ensure_streams(setup.jetstream())
    nc = await bus.connect(server.url_for(publisher_user(PROJECT)), "orders")
    js = nc.jetstream()
    async with running_worker(settings, CHAT):
        requests = [chat_request(i, project=PROJECT) for i in range(5)]
        for req in requests:
            await js.publish(
                RequestMessage.subject_for(req.model, project=req.project),
                msgspec.json.encode(req),
                headers={"Nats-Msg-Id": req.msg_id},
            )
        results = await read_results(js, "ext-orders-1", 5, project=PROJECT)
    assert sorted(r.custom_id for r in results) == [f"order-{i}" for i in range(5)]
    for r in results:
        assert r.ok and r.status_code == 200 and r.project == PROJECT
        body = msgspec.json.decode(r.response_body)
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["role"] == "assistant"
    # The work queue is empty: every request was acked after its result was stored.
    sjs = setup.jetstream()

    async def drained() -> bool:
        return (await sjs.stream_info("REQUESTS")).state.messages == 0

    await wait_until(drained, "the work queue to empty", timeout_s=10)
    await nc.close()
    await setup.close()


async def test_a_request_naming_another_project_than_its_subject_is_rejected(
    server: EmbeddedNats,
) -> None:
    """A publisher may publish under its own project token only; a body that names another
    project would put its result in that project's batch: the worker dead-letters it."""
    settings = settings_for(server.url_for("inference"))
    admin = await nats.connect(server.url)
    await bus.ensure_streams(admin.jetstream())
    nc = await bus.connect(server.url_for(publisher_user(PROJECT)), "orders")
    async with running_worker(settings, CHAT):
        forged = chat_request(0, project="proj_victim")
        await nc.jetstream().publish(
            RequestMessage.subject_for(CHAT, project=PROJECT), msgspec.json.encode(forged)
        )
        ajs = admin.jetstream()
        for _ in range(200):
            if (await ajs.stream_info("DEADLETTERS")).state.messages:
                break
            await asyncio.sleep(0.1)
        stored = await ajs.get_msg("DEADLETTERS", 1)
        letter = msgspec.json.decode(stored.data or b"", type=DeadLetterMessage)
    assert "project" in letter.error
    assert (await admin.jetstream().stream_info("RESULTS")).state.messages == 0
    await nc.close()
    await admin.close()


async def test_request_the_engine_rejects_comes_back_as_an_error_result(nats_url: str) -> None:
    settings = settings_for(nats_url)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await bus.ensure_streams(js)
    async with running_worker(settings, "SmolLM2-135M-Instruct"):
        bad = RequestMessage(
            batch_id="ext-bad",
            line=0,
            custom_id="bad-0",
            endpoint="/v1/chat/completions",
            model="SmolLM2-135M-Instruct",
            body=msgspec.Raw(b'{"model": "SmolLM2-135M-Instruct"}'),
        )
        await js.publish(
            RequestMessage.subject_for(bad.model),
            msgspec.json.encode(bad),
            headers={"Nats-Msg-Id": bad.msg_id},
        )
        [result] = await read_results(js, "ext-bad", 1)
    assert not result.ok
    assert 400 <= result.status_code < 500
    assert "error" in msgspec.json.decode(result.response_body)
    await nc.close()


async def test_an_upgraded_worker_splits_the_old_consumer_and_loses_no_request(
    nats_url: str,
) -> None:
    """Before the classes, one durable read the whole model and the api published on `.batch`:
    the new worker narrows that durable to the dispatched class, creates the direct one, and
    every request already queued (old subjects, before-projects ones too) comes back once."""
    settings = settings_for(nats_url)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await bus.ensure_streams(js)
    durables = RequestMessage.class_durables(CHAT)
    await js.add_consumer(
        bus.REQUESTS.name,
        ConsumerConfig(
            durable_name=durables[DISPATCHED], filter_subject=f"jetbatch.requests.{CHAT}.>"
        ),
    )
    subjects = [
        RequestMessage.subject_for(CHAT, DIRECT),  # the api's, before
        RequestMessage.legacy_subject.format(model=CHAT, priority="batch"),  # before projects
        RequestMessage.subject_for(CHAT, DISPATCHED),  # the api's, now
    ]
    for i in range(9):
        req = chat_request(i)
        await js.publish(
            subjects[i % 3], msgspec.json.encode(req), headers={"Nats-Msg-Id": req.msg_id}
        )
    async with running_worker(settings, CHAT):
        results = await read_results(js, "ext-orders-1", 9)
        narrowed = await js.consumer_info(bus.REQUESTS.name, durables[DISPATCHED])
        direct = await js.consumer_info(bus.REQUESTS.name, durables[DIRECT])
    assert sorted(r.custom_id for r in results) == [f"order-{i}" for i in range(9)]
    assert narrowed.config.filter_subject == RequestMessage.class_filters(CHAT)[DISPATCHED][0]
    assert direct.config.filter_subjects == list(RequestMessage.class_filters(CHAT)[DIRECT])
    await nc.close()


async def test_worker_heartbeats_into_the_workers_bucket(nats_url: str) -> None:
    settings = settings_for(nats_url)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    async with running_worker(settings, "all-MiniLM-L6-v2"):
        kv = None
        for _ in range(100):
            with contextlib.suppress(Exception):
                kv = await js.key_value(bus.WORKERS_BUCKET)
                entry = await kv.get("w-test")
                beat = msgspec.json.decode(entry.value, type=WorkerHeartbeat)
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("no heartbeat within 10 s")
    assert beat.model == "all-MiniLM-L6-v2"
    assert beat.endpoints == ["/v1/embeddings"]
    assert beat.capacity > 0
    assert beat.gpu_name is None  # no GPU here: NVML degrades cleanly
    # A stopped worker removes its heartbeat.
    assert kv is not None
    with pytest.raises(KeyNotFoundError):
        await kv.get("w-test")
    await nc.close()


async def test_a_sync_request_is_answered_while_the_workers_main_loop_is_blocked(
    nats_url: str,
) -> None:
    """Synchronous requests are served on the worker's fast lane (shared.lane): not even a
    blocked main event loop, where batch work runs, holds them up."""
    settings = settings_for(nats_url)
    model = "SmolLM2-135M-Instruct"
    request = InteractiveRequest(
        request_id="req_lane",
        endpoint="/v1/chat/completions",
        model=model,
        body=msgspec.Raw(
            msgspec.json.encode({"model": model, "messages": [{"role": "user", "content": "hi"}]})
        ),
    )
    client = Lane("test-client")
    client.start()
    try:
        async with running_worker(settings, model):
            nc = await client.call(nats.connect(nats_url))

            async def ask() -> ResultMessage:
                for _ in range(200):
                    try:
                        reply = await nc.request(
                            InteractiveRequest.subject_for(model),
                            msgspec.json.encode(request),
                            timeout=2,
                        )
                        return msgspec.json.decode(reply.data, type=ResultMessage)
                    except nats.errors.NoRespondersError:
                        await asyncio.sleep(0.05)
                raise AssertionError("the worker never subscribed")

            assert (await client.call(ask())).status_code == 200  # the worker is up
            # Waiting synchronously blocks this thread, whose event loop the worker's main
            # loop is: the answer must come from elsewhere.
            result = client.submit(ask()).result(timeout=5)
            assert result.status_code == 200 and result.request_id == "req_lane"
            await client.call(nc.close())
    finally:
        client.stop()
