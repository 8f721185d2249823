"""Pass 2 of a batch's ingestion: one RequestMessage per line of a file pass 1 found valid, to
REQUESTS `jetbatch.requests.<model>.<project>.batch`, msg id `<batch_id>:<line>`, pipelined
(shared.bus.Publisher).

The api runs it in a child process (`publish_in_child`, `python -m services.api.publishing`)
with a NATS connection of its own: publishing 50,000 lines is seconds of CPU, and in the api's
process every synchronous request, upload and status poll would wait for it (measured, bench
interactive: while a batch was published, p90 of a synchronous request 35-55 ms against 10-15 ms
once it was out). Tests may run it in-process (`PublishJob.run`).

Child protocol: a PublishJob (JSON) on stdin, a PublishOutcome (JSON) on stdout, exit 0; exit 3
when the input file is gone. SIGTERM asks it to stop early (its batch was cancelled): it stops
at the next check, waits for the PubAcks of what it sent, and reports `stopped`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
from nats.js import JetStreamContext

from schemas.messages import RequestMessage
from schemas.projects import DEFAULT_PROJECT_ID
from services.api.children import Child, killed_on_error, output_of, serve_one_job, spawn
from services.api.validation import iter_requests
from shared import bus, process, tracing

log = logging.getLogger(__name__)

# Lines read, parsed and published per turn of the child's event loop (it only has PubAcks to
# read meanwhile).
CHILD_SLICE_LINES = 500
# The in-process publisher asks whether the batch still runs this often (a query); the child
# is asked to stop by its parent, which looks every CHECK_CANCEL_S.
CHECK_CANCEL_EVERY = 2_000
CHECK_CANCEL_S = 0.5
PARENT_CHECK_S = 0.5

_encoder = msgspec.json.Encoder()


class PublishOutcome(msgspec.Struct, frozen=True):
    published: int
    stopped: bool = False  # asked to stop before the end of the file
    # The sampled lines' publish spans, for the api to record (the child exports nothing).
    traced: list[tracing.MintedSpan] = []


class PublishJob(msgspec.Struct, frozen=True, kw_only=True):
    """A pass 2 to run: in-process (`run`) or in a child process (`publish_in_child`)."""

    path: str
    batch_id: str
    model: str
    endpoint: str
    max_line_bytes: int
    headers: dict[str, str] | None = None  # trace context, on every message
    project: str = DEFAULT_PROJECT_ID  # the batch's: a token of the subject, a field of each
    trace_line_ratio: float = 0.0  # lines whose messages start a trace (shared.tracing)
    priority: int = 0  # the batch's (README: Scheduling), a field of each message

    @property
    def subject(self) -> str:
        return RequestMessage.subject_for(self.model, "batch", project=self.project)

    async def run(
        self,
        js: JetStreamContext,
        keep_going: Callable[[], Awaitable[bool]],
        slice_lines: Callable[[], int],
    ) -> PublishOutcome:
        """Publish every line, `slice_lines()` per turn of the event loop, asking `keep_going`
        every CHECK_CANCEL_EVERY lines; returns once the stream holds every message sent
        (raises when a publish failed)."""
        subject = self.subject
        publisher = bus.Publisher(js)
        published = 0
        sampler = tracing.LineSampler(self.trace_line_ratio)
        lines = iter_requests(Path(self.path), self.max_line_bytes)
        with contextlib.closing(lines):
            while chunk := list(itertools.islice(lines, slice_lines())):
                for index, request in chunk:
                    message = RequestMessage(
                        batch_id=self.batch_id,
                        line=index,
                        custom_id=request.custom_id,
                        endpoint=self.endpoint,
                        model=self.model,
                        body=request.body,
                        project=self.project,
                        priority=self.priority,
                    )
                    line_headers = sampler.start(index, request.custom_id)
                    headers = {**(self.headers or {}), **line_headers} if line_headers else None
                    await publisher.publish(
                        subject, _encoder.encode(message), message.msg_id, headers or self.headers
                    )
                    if line_headers:
                        sampler.end()
                published += len(chunk)
                await asyncio.sleep(0)
                if published % CHECK_CANCEL_EVERY < len(chunk) and not await keep_going():
                    await publisher.flush()
                    return PublishOutcome(published=published, stopped=True, traced=sampler.minted)
        await publisher.flush()
        return PublishOutcome(published=published, traced=sampler.minted)


async def publish_in_child(
    job: PublishJob,
    nats_url: str,
    keep_going: Callable[[], Awaitable[bool]],
    child: Child | None = None,
    *,
    check_every_s: float = CHECK_CANCEL_S,
) -> PublishOutcome:
    """`job.run()` in a child process (`python -m services.api.publishing [NICE]`; `child`, one
    started ahead, or a new one); `keep_going` is asked every `check_every_s`, and once it says
    no the child is told to stop (SIGTERM). The URL travels on stdin, never in argv."""
    if child is None:
        child = await spawn(CHILD_MODULE)
    request = msgspec.json.encode(_ChildInput(job=job, nats_url=nats_url))
    talk = asyncio.ensure_future(child.communicate(request))
    stopping = False
    with killed_on_error(child):
        try:
            while not talk.done():
                await asyncio.wait({talk}, timeout=check_every_s)
                if not talk.done() and not stopping and not await keep_going():
                    stopping = True
                    with contextlib.suppress(ProcessLookupError):
                        child.send_signal(signal.SIGTERM)
            out, err = await talk
        finally:
            talk.cancel()  # a no-op once it is done
    if stopping and child.returncode == -signal.SIGTERM:
        return PublishOutcome(published=0, stopped=True)  # stopped before it could listen
    out = output_of(child, out, err, f"publishing batch {job.batch_id}", job.path)
    return msgspec.json.decode(out, type=PublishOutcome)


CHILD_MODULE = "services.api.publishing"


class _ChildInput(msgspec.Struct, frozen=True):
    job: PublishJob
    nats_url: str


async def _child(given: _ChildInput) -> PublishOutcome:
    stop = asyncio.Event()
    with process.on_signals(lambda _sig: stop.set()):
        return await _publish(given, stop)


async def _publish(given: _ChildInput, stop: asyncio.Event) -> PublishOutcome:
    parent = os.getppid()

    async def orphaned() -> None:
        # An api killed mid-batch leaves its batch to be re-driven; its child must not go on.
        while not stop.is_set():
            if os.getppid() != parent:
                log.warning("batch %s: the api is gone, stopping", given.job.batch_id)
                stop.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PARENT_CHECK_S)

    watch = asyncio.create_task(orphaned())

    async def keep_going() -> bool:
        return not stop.is_set()

    nc = await bus.connect(given.nats_url, name=f"jetbatch-api-publish:{given.job.batch_id}")
    try:
        return await given.job.run(nc.jetstream(), keep_going, lambda: CHILD_SLICE_LINES)
    finally:
        watch.cancel()
        await nc.drain()


def _child_main() -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return serve_one_job(_ChildInput, lambda given: asyncio.run(_child(given)))


if __name__ == "__main__":
    sys.exit(_child_main())
