"""`Coalescer`: requests that arrive together, with the same key, run as one group.

The intake starts every request of a slice in the same turn of the event loop, each in its own
task; an engine that is much faster on many inputs at once (an embedding model) hands them to a
Coalescer, which waits `window_s` for the rest of the group (or until `max_size` are in hand) and
runs them with one call. Each caller still awaits its own result and may be cancelled on its own:
the others of its group are not disturbed, and a group whose callers all went away is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _Group(Generic[T, R]):
    def __init__(self) -> None:
        self.items: list[T] = []
        self.futures: list[asyncio.Future[R]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None


class Coalescer(Generic[T, R]):
    """`run_group(items)` returns one result per item, in order; if it raises, every caller of
    the group gets the exception."""

    def __init__(
        self,
        run_group: Callable[[list[T]], Awaitable[list[R]]],
        *,
        window_s: float,
        max_size: int,
    ) -> None:
        self._run_group = run_group
        self.window_s = window_s
        self.max_size = max_size
        self._pending: dict[Hashable, _Group[T, R]] = {}
        self._running: set[asyncio.Task[None]] = set()
        self.groups_run = 0  # groups handed to run_group (tests, logs)

    async def submit(self, key: Hashable, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        group = self._pending.get(key)
        if group is None:
            group = self._pending[key] = _Group()
            group.timer = loop.call_later(self.window_s, self._flush, key)
        group.items.append(item)
        group.futures.append(future)
        future.add_done_callback(lambda _: self._caller_gone(group))
        if len(group.items) >= self.max_size:
            self._flush(key)
        # Cancelling the caller cancels `future` only: the group runs on for the others.
        return await future

    def _flush(self, key: Hashable) -> None:
        group = self._pending.pop(key, None)
        if group is None:
            return
        if group.timer is not None:
            group.timer.cancel()
        group.task = asyncio.create_task(self._run(group))
        self._running.add(group.task)
        group.task.add_done_callback(self._running.discard)

    async def _run(self, group: _Group[T, R]) -> None:
        live = [
            (item, f) for item, f in zip(group.items, group.futures, strict=True) if not f.done()
        ]
        if not live:
            return
        self.groups_run += 1
        try:
            results = await self._run_group([item for item, _ in live])
        except asyncio.CancelledError:
            for _, future in live:
                future.cancel()
            raise
        except BaseException as exc:
            for _, future in live:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(live, results, strict=True):
            if not future.done():
                future.set_result(result)

    def _caller_gone(self, group: _Group[T, R]) -> None:
        """A group none of whose callers waits any more stops (in vLLM: its requests abort)."""
        if group.task is not None and not group.task.done():
            if all(f.cancelled() for f in group.futures):
                group.task.cancel()

    async def close(self) -> None:
        """Cancels the groups waiting and running (their callers see the cancellation)."""
        for group in self._pending.values():
            if group.timer is not None:
                group.timer.cancel()
            for future in group.futures:
                future.cancel()
        self._pending.clear()
        tasks = list(self._running)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
