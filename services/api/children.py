"""Python child processes started ahead of need.

Work moved out of a latency-sensitive process (the api's validation and publishing of a batch)
pays for the child's start-up on every job: the interpreter, then its imports (nats-py alone
pulls in aiohttp: ~0.3-0.5 s on the 2-core dev box). A `SpareChild` keeps one child started,
imported and waiting on its stdin for the job, and starts the next as soon as one is taken."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import msgspec

from shared.lane import freeze_heap, lower_process_priority

log = logging.getLogger(__name__)

T = TypeVar("T")

Child = asyncio.subprocess.Process
# A child's exit status for "the input file is gone".
FILE_GONE = 3


async def spawn(module: str, args: Sequence[str] = ()) -> Child:
    """`python -m module args...` with pipes on stdin, stdout and stderr, in a session of its
    own: the api's children do only batch work, and a session leader can lower its session's
    autogroup (shared.lane.lower_process_priority), which the api's own session must not be.
    A child still ends with its api: at the end of its stdin."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )


class SpareChild:
    def __init__(self, module: str, args: Sequence[str] = ()) -> None:
        self.module = module
        self.args = tuple(args)
        self._spare: asyncio.Task[Child] | None = None
        self._closed = False

    def start(self) -> None:
        """Start the spare (in the background; `take` waits for it if need be)."""
        if self._spare is None and not self._closed:
            self._spare = asyncio.ensure_future(spawn(self.module, self.args))

    async def take(self) -> Child:
        """A started child for one job (the caller owns it); the next spare starts meanwhile."""
        spare, self._spare = self._spare, None
        self.start()
        if spare is not None:
            with contextlib.suppress(Exception):
                child = await spare
                if child.returncode is None:
                    return child
        return await spawn(self.module, self.args)

    async def close(self) -> None:
        self._closed = True
        spare, self._spare = self._spare, None
        if spare is None:
            return
        with contextlib.suppress(Exception):
            child = await spare
            if child.returncode is None:
                child.kill()
            await child.wait()


@contextlib.contextmanager
def killed_on_error(child: Child) -> Iterator[None]:
    """Kill `child` when the block fails or is cancelled: it must not outlive its job."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        raise


def output_of(child: Child, out: bytes, err: bytes, what: str, path: str) -> bytes:
    """A finished child's stdout, or its failure as an exception: FileNotFoundError(path) for
    FILE_GONE, RuntimeError naming `what` with the end of its stderr for any other failure."""
    if child.returncode == FILE_GONE:
        raise FileNotFoundError(path)
    if child.returncode != 0:
        raise RuntimeError(
            f"{what} failed (exit {child.returncode}): {err.decode(errors='replace')[-2000:]}"
        )
    return out


def serve_one_job(job_type: type[T], run: Callable[[T], Any]) -> int:
    """A child's main: the niceness to add from argv, one job (JSON of `job_type`) from stdin,
    `run(job)`'s result (JSON) on stdout; the exit status (FILE_GONE when its file is gone)."""
    if len(sys.argv) > 1:
        lower_process_priority(int(sys.argv[1]))
    freeze_heap()  # its imports are done: no full collection during the job rescans them
    job = msgspec.json.decode(sys.stdin.buffer.read(), type=job_type)
    try:
        result = run(job)
    except FileNotFoundError:
        return FILE_GONE
    sys.stdout.buffer.write(msgspec.json.encode(result))
    return 0
