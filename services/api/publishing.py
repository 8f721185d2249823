"""Pass 2 of a batch's ingestion, a grant at a time: lines `start .. start+count` of a file pass 1
found valid, one RequestMessage each, to REQUESTS `jetbatch.requests.<model>.<project>.dispatched`,
msg id `<batch_id>:<line>`, pipelined (shared.bus.Publisher). The dispatcher
(services/api/dispatcher.py) decides which batch gets how many lines when (README: Scheduling).

Lines that share a prompt prefix (the system message, or the leading text of the prompt) are
published next to each other, a block of the file (BLOCK_LINES) at a time, so the engine's prefix
cache finds what the previous line left; each line keeps its line number, so the output file's
order does not change.

The api runs it in one long-lived child process (`PublishingChild`, `python -m
services.api.publishing [NICE]`) with a NATS connection of its own: publishing is seconds of CPU
per 50,000 lines, and in the api's process every synchronous request, upload and status poll
would wait for it (measured, bench interactive: while a batch was published, p90 of a
synchronous request 35-55 ms against 10-15 ms once it was out). Tests may publish in-process
(`LinePublisher`).

Child protocol: one `_ChildStart` (JSON line) on stdin, then `Grant` and `Drop` lines; for each
grant, one `GrantDone` line on stdout once the stream holds its messages. The child keeps each
batch's file open between grants. It ends at the end of its stdin (its api is gone) or on
SIGTERM, after the grant it is on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import itertools
import logging
import sys
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
from nats.js import JetStreamContext

from schemas.messages import DISPATCHED, RequestMessage
from schemas.openai import RequestLine
from schemas.projects import DEFAULT_PROJECT_ID
from services.api.children import Child, spawn
from services.api.validation import iter_requests
from shared import bus, process, tracing
from shared.lane import freeze_heap, lower_process_priority

log = logging.getLogger(__name__)

# Lines read, parsed and published per turn of the child's event loop (it only has PubAcks to
# read meanwhile).
CHILD_SLICE_LINES = 500
# How much of a prompt's text keys its prefix group when it has no system message.
PREFIX_CHARS = 512

_encoder = msgspec.json.Encoder()


class PublishJob(msgspec.Struct, frozen=True, kw_only=True):
    """A batch being dispatched: where its lines are and what their messages carry."""

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
        return RequestMessage.subject_for(self.model, DISPATCHED, project=self.project)


class Grant(msgspec.Struct, frozen=True, tag=True):
    """Publish `count` lines of `job`'s file from line `start` (0-based, blank lines aside)."""

    job: PublishJob
    start: int
    count: int


class Drop(msgspec.Struct, frozen=True, tag=True):
    """Forget a batch's open file (it is done, cancelled or handed over)."""

    batch_id: str


class GrantDone(msgspec.Struct, frozen=True):
    batch_id: str
    start: int
    published: int
    eof: bool = False  # the file ended before `count` lines
    error: str | None = None  # "file_gone", or why nothing is known to be published
    # The sampled lines' publish spans, for the api to record (the child exports nothing).
    traced: list[tracing.MintedSpan] = []


FILE_GONE = "file_gone"


_NULL = msgspec.Raw(b"null")


class _Message(msgspec.Struct):
    role: str = ""
    content: msgspec.Raw = _NULL  # kept raw: hashed, never decoded


class _Head(msgspec.Struct):
    """What a body's prefix key is read from (chat: messages; completions: prompt)."""

    messages: list[_Message] | None = None
    prompt: msgspec.Raw = _NULL


_head_decoder = msgspec.json.Decoder(_Head)


def prefix_key(body: msgspec.Raw) -> bytes:
    """A digest of what a request's rendered prompt starts with: its system (or developer)
    messages when it has them, else the leading PREFIX_CHARS bytes of its first message or
    prompt (as JSON). Lines with the same key share their prompt's first tokens."""
    try:
        head = _head_decoder.decode(body)
    except msgspec.DecodeError:
        return b""
    digest = hashlib.blake2b(digest_size=8)
    if head.messages:
        system = [bytes(m.content) for m in head.messages if m.role in ("system", "developer")]
        for content in system or [bytes(head.messages[0].content)[:PREFIX_CHARS]]:
            digest.update(content + b"\0")
    elif bytes(head.prompt) != b"null":
        digest.update(bytes(head.prompt)[:PREFIX_CHARS])
    else:
        return b""
    return digest.digest()


def grouped_by_prefix(
    chunk: list[tuple[int, RequestLine]], endpoint: str
) -> list[tuple[int, RequestLine]]:
    """`chunk` with lines of the same prefix key together, groups in order of first appearance,
    lines in file order within a group. Embeddings have no prompt cache to share: as they are."""
    if endpoint == "/v1/embeddings" or len(chunk) < 2:
        return chunk
    groups: dict[bytes, list[tuple[int, RequestLine]]] = {}
    for item in chunk:
        groups.setdefault(prefix_key(item[1].body), []).append(item)
    return list(itertools.chain.from_iterable(groups.values()))


@dataclass
class _OpenFile:
    """A batch's file in dispatch order: blocks of up to BLOCK_LINES lines (BLOCK_BYTES of
    bodies) read in file order, each reordered by grouped_by_prefix. The order is a function of
    the file alone, so a cursor (how many lines were dispatched) means the same lines after a
    re-drive, whatever the grants' sizes were."""

    lines: Generator[tuple[int, RequestLine], None, None]
    endpoint: str
    sampler: tracing.LineSampler = field(default_factory=lambda: tracing.LineSampler(0.0))
    block: list[tuple[int, RequestLine]] = field(default_factory=list)
    block_start: int = 0  # the dispatch position of the block's first line
    next: int = 0  # the dispatch position of the line it gives next

    def _read_block(self) -> bool:
        self.block_start += len(self.block)
        block: list[tuple[int, RequestLine]] = []
        size = 0
        for item in self.lines:
            block.append(item)
            size += len(item[1].body)
            if len(block) >= BLOCK_LINES or size >= BLOCK_BYTES:
                break
        self.block = grouped_by_prefix(block, self.endpoint)
        return bool(block)

    def take(self, count: int) -> list[tuple[int, RequestLine]]:
        """The next `count` lines in dispatch order (fewer at the end of the file)."""
        taken: list[tuple[int, RequestLine]] = []
        while len(taken) < count:
            at = self.next - self.block_start
            if at >= len(self.block) and not self._read_block():
                break
            at = self.next - self.block_start
            part = self.block[at : at + count - len(taken)]
            taken += part
            self.next += len(part)
        return taken


# Lines of a batch grouped by prefix together: a block of its file at a time.
BLOCK_LINES = 4_096
BLOCK_BYTES = 32 * 1024 * 1024


class LinePublisher:
    """Publishes the grants' lines, keeping each batch's file open from one grant to the next."""

    def __init__(self, js: JetStreamContext, slice_lines: Callable[[], int]) -> None:
        self._publisher = bus.Publisher(js)
        self._slice_lines = slice_lines
        self._open: dict[str, _OpenFile] = {}

    def _file(self, grant: Grant) -> _OpenFile:
        job = grant.job
        f = self._open.get(job.batch_id)
        if f is not None and f.next == grant.start:
            return f
        self.drop(job.batch_id)
        lines = iter_requests(Path(job.path), job.max_line_bytes)
        f = _OpenFile(lines, job.endpoint, tracing.LineSampler(job.trace_line_ratio))
        f.take(grant.start)  # a re-drive resumes at its cursor
        self._open[job.batch_id] = f
        return f

    def drop(self, batch_id: str) -> None:
        f = self._open.pop(batch_id, None)
        if f is not None:
            f.lines.close()

    def close(self) -> None:
        for batch_id in list(self._open):
            self.drop(batch_id)

    async def run(self, grant: Grant) -> GrantDone:
        """Publish the grant's lines; returns once the stream holds them (raises when a publish
        failed: nothing of the grant is then counted as published)."""
        job = grant.job
        try:
            f = self._file(grant)
            chunk = f.take(grant.count)
        except FileNotFoundError:
            self.drop(job.batch_id)
            return GrantDone(job.batch_id, grant.start, 0, error=FILE_GONE)
        subject, sampler, step = job.subject, f.sampler, max(1, self._slice_lines())
        for n, (index, request) in enumerate(chunk, 1):
            message = RequestMessage(
                batch_id=job.batch_id,
                line=index,
                custom_id=request.custom_id,
                endpoint=job.endpoint,
                model=job.model,
                body=request.body,
                project=job.project,
                priority=job.priority,
            )
            line_headers = sampler.start(index, request.custom_id)
            headers = {**(job.headers or {}), **line_headers} if line_headers else job.headers
            await self._publisher.publish(
                subject, _encoder.encode(message), message.msg_id, headers
            )
            if line_headers:
                sampler.end()
            if n % step == 0:
                await asyncio.sleep(0)
        await self._publisher.flush()
        traced, sampler.minted = sampler.minted, []
        eof = len(chunk) < grant.count
        if eof:
            self.drop(job.batch_id)
        return GrantDone(job.batch_id, grant.start, len(chunk), eof=eof, traced=traced)


CHILD_MODULE = "services.api.publishing"
# A grant (at most the dispatcher's MAX_GRANT lines) answered within this, or the child is
# taken for hung (its PubAcks time out after 30 s).
GRANT_TIMEOUT_S = 60.0


class _ChildStart(msgspec.Struct, frozen=True):
    nats_url: str


_done_decoder = msgspec.json.Decoder(GrantDone)
_order_decoder = msgspec.json.Decoder(Grant | Drop)


class PublishingChild:
    """The api's publishing child process: grants in, `GrantDone`s out, one grant at a time.
    A child that dies, or does not answer within GRANT_TIMEOUT_S, fails the grant it was on
    (RuntimeError, the child killed); the next grant starts a new one, and the dispatcher
    re-grants from its cursor. What the child logs is logged here (its stderr is read all along,
    so a chatty child never blocks on a full pipe)."""

    def __init__(self, nats_url: str, nice: int = 0) -> None:
        self._nats_url = nats_url
        self._args = [str(nice)]
        self._child: Child | None = None
        self._lock = asyncio.Lock()
        self._stderr: collections.deque[str] = collections.deque(maxlen=20)
        self._reader: asyncio.Task[None] | None = None

    async def _started(self) -> Child:
        child = self._child
        if child is None or child.returncode is not None:
            child = self._child = await spawn(CHILD_MODULE, self._args)
            assert child.stdin is not None and child.stderr is not None
            self._reader = asyncio.create_task(self._read_stderr(child.stderr))
            child.stdin.write(_encoder.encode(_ChildStart(self._nats_url)) + b"\n")
        return child

    async def _read_stderr(self, stderr: asyncio.StreamReader) -> None:
        while line := await stderr.readline():
            text = line.decode(errors="replace").rstrip()
            self._stderr.append(text)
            log.warning("publishing child: %s", text)

    async def run(self, grant: Grant) -> GrantDone:
        async with self._lock:
            child = await self._started()
            assert child.stdin is not None and child.stdout is not None
            try:
                child.stdin.write(_encoder.encode(grant) + b"\n")
                await child.stdin.drain()
                line = await asyncio.wait_for(child.stdout.readline(), GRANT_TIMEOUT_S)
            except BaseException:
                self._kill()  # its answer to this grant would be read as the next one's
                raise
            if not line:
                self._kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(child.wait(), 5)
                raise RuntimeError(
                    f"the publishing child died (exit {child.returncode}): "
                    + " | ".join(self._stderr)
                )
            return _done_decoder.decode(line)

    async def drop(self, batch_id: str) -> None:
        async with self._lock:
            child = self._child
            if child is not None and child.returncode is None and child.stdin is not None:
                with contextlib.suppress(ConnectionError):
                    child.stdin.write(_encoder.encode(Drop(batch_id)) + b"\n")
                    await child.stdin.drain()

    def _kill(self) -> None:
        child, self._child = self._child, None
        if child is not None and child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.kill()

    async def close(self) -> None:
        async with self._lock:
            child, self._child = self._child, None
        if child is None:
            return
        if child.stdin is not None:
            child.stdin.close()  # the child ends at the end of its stdin
        try:
            await asyncio.wait_for(child.wait(), 5)
        except TimeoutError:
            child.kill()
            await child.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)


async def _serve(reader: asyncio.StreamReader, stop: asyncio.Event) -> None:
    start = msgspec.json.decode(await reader.readline(), type=_ChildStart)
    nc = await bus.connect(start.nats_url, name="jetbatch-api-publish")
    publisher = LinePublisher(nc.jetstream(), lambda: CHILD_SLICE_LINES)
    out = sys.stdout.buffer
    try:
        while not stop.is_set() and (line := await reader.readline()):
            order = _order_decoder.decode(line)
            if isinstance(order, Drop):
                publisher.drop(order.batch_id)
                continue
            try:
                done = await publisher.run(order)
            except Exception as e:  # noqa: BLE001 - reported to the api, which re-grants
                log.warning("batch %s: publishing failed: %s", order.job.batch_id, e)
                publisher.drop(order.job.batch_id)
                done = GrantDone(order.job.batch_id, order.start, 0, error=repr(e))
            out.write(_encoder.encode(done) + b"\n")
            out.flush()
    finally:
        publisher.close()
        await nc.drain()


async def _child() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=16 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    stop = asyncio.Event()
    with process.on_signals(lambda _sig: stop.set()):
        await _serve(reader, stop)


def _child_main() -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if len(sys.argv) > 1:
        lower_process_priority(int(sys.argv[1]))
    freeze_heap()  # its imports are done: no full collection during the work rescans them
    asyncio.run(_child())
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
