"""Warning-and-worse log records onto stream LOGS (`jetbatch.logs.<service>`), so operators read
every service's problems through the api (`GET /v1/logs`) on machines that share no disk.

The logging handler never blocks and never waits on NATS: it puts each record (the structured
fields of shared.logs, never a body or a traceback) into a bounded queue; a task on the
service's existing connection publishes what is queued. A full queue drops the record and
counts it (`dropped`); a record logged while a record is being shipped (nats-py's own, say) is
not shipped, so a NATS that is down can never feed a loop. One shipper per process: a second
service in the same process (tests) shares the first's."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import queue
import threading
from collections.abc import AsyncIterator

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from shared import bus
from shared.logs import ContextFilter, JsonRecord

log = logging.getLogger(__name__)

MAX_QUEUED = 1_000
PUBLISH_EVERY_S = 0.2
MAX_MESSAGE_CHARS = 2_000
SUBJECT = "jetbatch.logs.{service}"
READ_FETCH = 1_000
READ_TIMEOUT_S = 2.0

_encoder = msgspec.json.Encoder()


def record_of(record: logging.LogRecord, service: str) -> JsonRecord:
    when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
    try:
        message = record.getMessage()
    except Exception:  # a bad %-format: the template is still worth reading
        message = str(record.msg)
    return JsonRecord(
        time=when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        level=record.levelname,
        service=str(getattr(record, "service", None) or service),
        logger=record.name,
        message=message[:MAX_MESSAGE_CHARS],
        batch_id=getattr(record, "batch_id", None),
        custom_id=getattr(record, "custom_id", None),
    )


class LogShipper(logging.Handler):
    def __init__(self, service: str, max_queued: int = MAX_QUEUED) -> None:
        super().__init__(logging.WARNING)
        self.service = service
        self.subject = SUBJECT.format(service=service)
        self.queue: queue.Queue[bytes] = queue.Queue(max_queued)
        self.dropped = 0
        self.shipped = 0
        self._inside = threading.local()
        self.addFilter(ContextFilter(service))

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._inside, "active", False) or record.name.startswith("nats"):
            return
        self._inside.active = True
        try:
            self.queue.put_nowait(_encoder.encode(record_of(record, self.service)))
        except queue.Full:
            self.dropped += 1
        except Exception:
            self.dropped += 1
        finally:
            self._inside.active = False

    def take(self) -> list[bytes]:
        out: list[bytes] = []
        with contextlib.suppress(queue.Empty):
            while True:
                out.append(self.queue.get_nowait())
        return out

    async def publish(self, nc: NATS) -> None:
        """Publish what is queued (core publishes into the stream: no waiting for acks)."""
        self._inside.active = True
        try:
            for data in self.take():
                try:
                    await nc.publish(self.subject, data)
                    self.shipped += 1
                except Exception:
                    self.dropped += 1
        finally:
            self._inside.active = False

    async def run(self, nc: NATS, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PUBLISH_EVERY_S)
            await self.publish(nc)


_current: LogShipper | None = None


@contextlib.asynccontextmanager
async def shipping(nc: NATS, service: str, replicas: int = 1) -> AsyncIterator[LogShipper | None]:
    """Ship this process's warning-and-worse records on `nc` while the block runs."""
    global _current
    if _current is not None:  # another service of this process ships already
        yield _current
        return
    try:
        await bus.ensure_streams(nc.jetstream(), (bus.LOGS,), replicas=replicas)
    except Exception as e:  # logs still go to stderr and the file
        log.warning("stream %s unavailable (%r): log records are not shipped", bus.LOGS.name, e)
        yield None
        return
    shipper = _current = LogShipper(service)
    root = logging.getLogger()
    root.addHandler(shipper)
    stop = asyncio.Event()
    task = asyncio.create_task(shipper.run(nc, stop), name="logship")
    try:
        yield shipper
    finally:
        root.removeHandler(shipper)
        _current = None
        stop.set()
        with contextlib.suppress(Exception):
            await task
        if shipper.dropped:
            log.info("log records not shipped: %d", shipper.dropped)


async def read_stream(js: JetStreamContext, service: str | None) -> list[tuple[int, bytes]]:
    """Every record in LOGS (of `service`) as (stream sequence, data), oldest first: an
    ephemeral pull without acks (the stream holds at most LOGS.max_msgs)."""
    try:
        info = await js.stream_info(bus.LOGS.name)
    except NotFoundError:
        return []
    if not info.state.messages:
        return []
    sub = await js.pull_subscribe(
        SUBJECT.format(service=service) if service else "jetbatch.logs.>",
        stream=bus.LOGS.name,
        config=ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.ALL,
            inactive_threshold=30,
            mem_storage=True,
            num_replicas=1,
        ),
    )
    out: list[tuple[int, bytes]] = []
    try:
        while True:
            try:
                msgs = await sub.fetch(READ_FETCH, timeout=READ_TIMEOUT_S)
            except nats.errors.TimeoutError:
                break
            out += [(m.metadata.sequence.stream, m.data) for m in msgs]
            if not msgs or msgs[-1].metadata.num_pending == 0:
                break
    finally:
        try:
            await sub.unsubscribe()
        except Exception as e:  # the consumer goes away on its own once inactive
            log.debug("log reader not unsubscribed: %r", e)
    return out
