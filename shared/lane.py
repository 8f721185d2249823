"""A fast lane: an asyncio event loop on a thread of its own, for latency-sensitive work (a
synchronous request) in a process whose main loop is busy with bulk work (a batch).

Why a thread and not a task: on a loaded machine the kernel schedules threads, not event-loop
tasks. A process's busy main thread uses up its share of the CPU, and a task on that loop waits
for it (and for every slice of bulk work queued ahead). A thread that mostly sleeps keeps its
own claim on the CPU and runs as soon as its socket wakes it; it then waits only for the GIL,
which the bulk thread hands over within the switch interval set here.

Beside it, the other two things a process does for its latency-sensitive work, light enough for
the api's child processes to import: `lower_priority` and `lower_process_priority` (batch-only
work yields the CPU) and `freeze_heap` (full garbage collections skip start-up objects)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import os
import sys
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# How long a thread holding the GIL keeps it while another wants it (CPython's default: 5 ms).
# Costs nothing while the lane sleeps; while it runs, the bulk thread pauses within this.
SWITCH_INTERVAL_S = 0.0005


def freeze_heap() -> None:
    """Move every object alive now (modules, classes, what start-up built) out of the garbage
    collector's sight. Full collections otherwise rescan them all and, under load, stall the
    event loop for 20-130 ms each (measured on the api and inference processes during a
    50,000-line batch: bench/interactive.py; 80-165 ms in the api's publishing child). Call
    once start-up is done, and again after a big import (vLLM)."""
    gc.collect()
    gc.freeze()


def lower_priority(nice: int) -> None:
    """Add `nice` to the calling thread's CPU niceness (and so to the threads and processes it
    starts later), so it yields the CPU to latency-sensitive work. Linux schedules threads, and
    niceness is per thread there. Best effort: a no-op where unsupported."""
    if nice <= 0:
        return
    with contextlib.suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))


AUTOGROUP = "/proc/self/autogroup"


def autogroup_nice(path: str = AUTOGROUP) -> int | None:
    """The niceness of a process's session autogroup, or None where it has none: the kernel has
    no autogroups (no file), or the process is still in the boot session's root group, which
    the kernel shows as an empty file (a container's first session, for one)."""
    try:
        with open(path) as f:
            _, found, nice = f.read().partition(" nice ")
        return int(nice) if found else None
    except (OSError, ValueError):  # unreadable, or not the kernel's "/autogroup-N nice K"
        return None


def lower_process_priority(nice: int) -> None:
    """`lower_priority` for a process that does only batch work, and for its scheduling group.
    Where the kernel groups processes by session (CONFIG_SCHED_AUTOGROUP with
    kernel.sched_autogroup_enabled=1, the default of many distributions), CPU time is shared
    between sessions first and niceness only orders the threads inside one: a niced service
    in a session of its own (`jetbatch up` starts each so, as systemd does) still took a full
    session's share from synchronous requests. So a session leader also raises its session's
    autogroup niceness, which needs no privilege. A process that is not its session's leader
    leaves it alone: its session holds other processes (a shell, the api with its children)."""
    lower_priority(nice)
    if nice <= 0 or os.getsid(0) != os.getpid():
        return
    now = autogroup_nice()
    if now is None:  # no autogroup of its own to lower
        return
    with contextlib.suppress(OSError):
        with open(AUTOGROUP, "w") as f:
            f.write(str(min(19, now + nice)))


class Lane:
    def __init__(self, name: str) -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError(f"lane {self.name} is not running")
        return self._loop

    def start(self) -> None:
        if self._thread is not None:
            return
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
            finally:
                with contextlib.suppress(Exception):
                    loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        self._thread = threading.Thread(target=main, name=self.name, daemon=True)
        self._thread.start()
        ready.wait()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run `coro` on the lane; callable from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the lane and await its result from another event loop."""
        return await on_loop(self.loop, coro)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Cancel what still runs on the lane, stop its loop and join its thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.submit(cancel_all()).result(timeout_s)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        self._thread = self._loop = None


async def on_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on `loop` (another thread's) and await its result here."""
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))
