"""The raw JetStream ceiling: publish N request messages to a work-queue stream and pull them back
once (acking each), on a nats-server of its own configured as `jetbatch up` configures it, by the
fastest client paths we have. jetbatch moves every line through JetStream twice (request and
result) plus PostgreSQL, so end to end it can only be a fraction of this."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nats
import psutil
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from bench.common import scratch
from bench.sampling import cpu_delta, cpu_seconds
from schemas.messages import RequestMessage
from shared import bus
from shared.bus import nats_private
from shared.embedded import EmbeddedNats

STREAM = "RAWBENCH"
SUBJECT = "rawbench.requests.model.batch"


@dataclass
class Message:
    payload: bytes
    msg_id: str


def request_messages(path: Path, batch_id: str = "batch_raw") -> list[Message]:
    """One RequestMessage per line of a batch input file, exactly as the api would publish it."""
    decoder = msgspec.json.Decoder()
    out = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f):
            line = decoder.decode(raw)
            msg = RequestMessage(
                batch_id=batch_id,
                line=line_no,
                custom_id=line["custom_id"],
                endpoint=line["url"],
                model=line["body"]["model"],
                body=msgspec.Raw(msgspec.json.encode(line["body"])),
            )
            out.append(Message(msgspec.json.encode(msg), msg.msg_id))
    return out


async def _core_publish(nc: nats.NATS, messages: Sequence[Message], subject: str) -> float:
    """Core publishes with a reply subject per message, every PubAck counted off one wildcard
    subscription after the last publish (no future, timer or callback per message)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(f"{inbox}.*", pending_msgs_limit=1_000_000)
    queue = nats_private.pending_queue(sub)
    started = time.perf_counter()
    for i, m in enumerate(messages):
        await nc.publish(subject, m.payload, reply=f"{inbox}.{i}", headers={bus.MSG_ID: m.msg_id})
    acked = errors = 0
    while acked + errors < len(messages):
        ack = await asyncio.wait_for(queue.get(), 30)
        nats_private.taken(sub, ack)
        if b'"error"' in ack.data:
            errors += 1
        else:
            acked += 1
    elapsed = time.perf_counter() - started
    await sub.unsubscribe()
    if errors:
        raise RuntimeError(f"{errors} publishes were refused")
    return elapsed


async def _publisher(nc: nats.NATS, messages: Sequence[Message], subject: str) -> float:
    """jetbatch's bus.Publisher (what the api uses: core publishes too, PubAcks drained in bulk
    as they come), flushed every 2,000 as the api does."""
    js = nc.jetstream()
    publisher = bus.Publisher(js)
    started = time.perf_counter()
    for i, m in enumerate(messages, 1):
        await publisher.publish(subject, m.payload, m.msg_id)
        if i % 2_000 == 0:
            await publisher.flush()
    await publisher.flush()
    return time.perf_counter() - started


async def _fast_pull(nc: nats.NATS, n: int, durable: str, batch: int = 1_000) -> float:
    pull = await bus.FastPull.bind(nc.jetstream(), STREAM, durable)
    got = 0
    started = time.perf_counter()
    while got < n:
        msgs = await pull.fetch(batch, 1.0)
        if not msgs:
            raise RuntimeError(f"FastPull: only {got} of {n} messages came back")
        for msg in msgs:
            await msg.ack()
        got += len(msgs)
    await nc.flush()
    elapsed = time.perf_counter() - started
    await pull.unsubscribe()
    return elapsed


async def _nats_py_fetch(nc: nats.NATS, n: int, durable: str, batch: int = 1_000) -> float:
    sub = await nc.jetstream().pull_subscribe_bind(durable, stream=STREAM)
    got = 0
    started = time.perf_counter()
    while got < n:
        try:
            msgs = await sub.fetch(batch, timeout=1.0)
        except (TimeoutError, nats.errors.TimeoutError):
            msgs = []
        if not msgs:
            raise RuntimeError(f"fetch(): only {got} of {n} messages came back")
        for msg in msgs:
            await msg.ack()
        got += len(msgs)
    await nc.flush()
    elapsed = time.perf_counter() - started
    await sub.unsubscribe()
    return elapsed


async def _setup(js, durable: str) -> None:  # type: ignore[no-untyped-def]
    try:
        await js.delete_stream(STREAM)
    except Exception:
        pass
    await js.add_stream(
        StreamConfig(
            name=STREAM,
            subjects=["rawbench.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=120,
        )
    )
    await js.add_consumer(
        STREAM,
        ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            filter_subject="rawbench.>",
            max_ack_pending=-1,
            max_waiting=512,
            ack_wait=600,
        ),
    )


async def measure(messages: Sequence[Message], *, with_reference: bool = True) -> dict[str, float]:
    """Seconds for each path; the ceiling is the fastest publish plus the fastest pull."""
    store = scratch("raw")
    server = EmbeddedNats(store / "nats").start()
    n = len(messages)
    out: dict[str, float] = {}
    try:
        nc = await bus.connect(server.url, "bench-raw")
        js = nc.jetstream()
        # The fastest paths always (the ceiling every run is compared with); the slower
        # references only when asked, so that every ceiling of a run is measured the same way.
        publishes: list[tuple[str, Callable]] = [("publisher", _publisher)]
        pulls: list[tuple[str, Callable]] = [("fast_pull", _fast_pull)]
        if with_reference:
            publishes.append(("core_publish", _core_publish))
            pulls.append(("nats_py_fetch", _nats_py_fetch))
        assert server.proc is not None
        # This process is the client; the nats-server is its child, so no children counted.
        watched = {"client": psutil.Process(), "nats_server": psutil.Process(server.proc.pid)}
        for i, ((pub_name, publish), (pull_name, pull)) in enumerate(
            zip(publishes, pulls, strict=True)
        ):
            await _setup(js, "raw")
            cpu_before = cpu_seconds(watched, children=False)
            out[f"{pub_name}_s"] = await publish(nc, messages, SUBJECT)
            out[f"{pull_name}_s"] = await pull(nc, n, "raw")
            if i == 0:  # the fastest pair: what the ceiling costs in CPU (client and server)
                cpu = cpu_delta(cpu_before, cpu_seconds(watched, children=False))
                out["cpu_client_s"], out["cpu_nats_server_s"] = cpu["client"], cpu["nats_server"]
        await nc.close()
    finally:
        server.stop()
        shutil.rmtree(store, ignore_errors=True)
    publish_s = min(v for k, v in out.items() if k in ("core_publish_s", "publisher_s"))
    pull_s = min(v for k, v in out.items() if k in ("fast_pull_s", "nats_py_fetch_s"))
    out["ceiling_s"] = publish_s + pull_s
    out["ceiling_lines_per_s"] = n / out["ceiling_s"]
    for key in list(out):
        if key.endswith("_s") and not key.startswith(("ceiling", "cpu_")):
            out[key.removesuffix("_s") + "_per_s"] = n / out[key]
    return out
