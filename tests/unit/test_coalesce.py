"""The Coalescer groups what arrives together, keeps each caller's result and cancellation its
own, and stops a group nobody waits for."""

from __future__ import annotations

import asyncio

import pytest

from services.inference.coalesce import Coalescer


class Recorder:
    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.groups: list[list[str]] = []
        self.cancelled = 0
        self.delay_s = delay_s
        self.fail = fail

    async def __call__(self, items: list[str]) -> list[str]:
        self.groups.append(items)
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail:
            raise ValueError("engine said no")
        return [item.upper() for item in items]


async def test_requests_started_together_run_as_one_group_per_key() -> None:
    run = Recorder()
    lines = Coalescer(run, window_s=0.01, max_size=100)
    keys = ["a", "b", "a", "a", "b"]
    results = await asyncio.gather(*(lines.submit(k, f"{k}{i}") for i, k in enumerate(keys)))
    assert results == ["A0", "B1", "A2", "A3", "B4"]
    assert sorted(run.groups) == [["a0", "a2", "a3"], ["b1", "b4"]]
    assert lines.groups_run == 2


async def test_a_full_group_runs_without_waiting_for_the_window() -> None:
    run = Recorder()
    lines = Coalescer(run, window_s=60, max_size=3)
    results = await asyncio.wait_for(
        asyncio.gather(*(lines.submit("k", str(i)) for i in range(6))), 5
    )
    assert results == [str(i) for i in range(6)]
    assert run.groups == [["0", "1", "2"], ["3", "4", "5"]]


async def test_a_cancelled_caller_leaves_its_group_running_for_the_others() -> None:
    run = Recorder(delay_s=0.05)
    lines = Coalescer(run, window_s=0.001, max_size=100)
    tasks = [asyncio.create_task(lines.submit("k", f"x{i}")) for i in range(3)]
    await asyncio.sleep(0.02)  # the group is in run_group now
    tasks[1].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert done[0] == "X0" and done[2] == "X2"
    assert isinstance(done[1], asyncio.CancelledError)
    assert run.cancelled == 0


async def test_a_caller_cancelled_before_its_group_runs_is_left_out() -> None:
    run = Recorder()
    lines = Coalescer(run, window_s=0.02, max_size=100)
    tasks = [asyncio.create_task(lines.submit("k", f"x{i}")) for i in range(3)]
    await asyncio.sleep(0)
    tasks[0].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert done[1:] == ["X1", "X2"]
    assert run.groups == [["x1", "x2"]]


async def test_a_group_whose_callers_all_left_is_cancelled() -> None:
    run = Recorder(delay_s=10)
    lines = Coalescer(run, window_s=0.001, max_size=100)
    tasks = [asyncio.create_task(lines.submit("k", f"x{i}")) for i in range(2)]
    await asyncio.sleep(0.02)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0)
    assert run.cancelled == 1


async def test_a_failing_group_fails_each_of_its_callers() -> None:
    lines = Coalescer(Recorder(fail=True), window_s=0.001, max_size=100)
    done = await asyncio.gather(*(lines.submit("k", "x") for _ in range(2)), return_exceptions=True)
    assert all(isinstance(d, ValueError) for d in done)


async def test_close_cancels_waiting_and_running_groups() -> None:
    run = Recorder(delay_s=10)
    lines = Coalescer(run, window_s=0.001, max_size=100)
    running = asyncio.create_task(lines.submit("a", "x"))
    await asyncio.sleep(0.02)
    lines.window_s = 60
    waiting = asyncio.create_task(lines.submit("b", "y"))
    await asyncio.sleep(0)
    await lines.close()
    for task in (running, waiting):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert run.cancelled == 1
