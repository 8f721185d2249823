"""shared.lane: an event loop on a thread of its own, and lowering a thread's CPU priority."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from shared.lane import (
    AUTOGROUP,
    SWITCH_INTERVAL_S,
    Lane,
    autogroup_nice,
    lower_priority,
    on_loop,
)


async def thread_name() -> str:
    await asyncio.sleep(0)
    return threading.current_thread().name


async def test_a_coroutine_called_on_a_lane_runs_on_its_thread() -> None:
    lane = Lane("lane-under-test")
    lane.start()
    try:
        assert await lane.call(thread_name()) == "lane-under-test"
        assert sys.getswitchinterval() <= SWITCH_INTERVAL_S
    finally:
        lane.stop()


async def test_the_lane_answers_while_the_calling_loop_is_blocked() -> None:
    lane = Lane("lane-under-test")
    lane.start()
    try:
        future = lane.submit(thread_name())
        # Blocking here blocks this event loop; the lane's loop goes on.
        assert future.result(timeout=5) == "lane-under-test"
    finally:
        lane.stop()


async def test_on_loop_runs_a_coroutine_on_the_other_threads_loop_and_awaits_it() -> None:
    lane = Lane("lane-under-test")
    lane.start()
    here = asyncio.get_running_loop()

    async def back_home() -> str:
        assert asyncio.get_running_loop() is lane.loop
        return await on_loop(here, thread_name())

    try:
        assert await lane.call(back_home()) == threading.current_thread().name
    finally:
        lane.stop()


async def test_stopping_a_lane_cancels_what_still_runs_on_it() -> None:
    lane = Lane("lane-under-test")
    lane.start()
    future = lane.submit(asyncio.sleep(3600))
    lane.stop()
    assert future.cancelled()
    with pytest.raises(RuntimeError):
        lane.loop  # noqa: B018


def test_lower_priority_raises_the_calling_threads_niceness_only() -> None:
    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: dict[str, int] = {}

    def lowered() -> None:
        seen["before"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        lower_priority(5)
        seen["after"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    thread = threading.Thread(target=lowered)
    thread.start()
    thread.join()
    assert seen["after"] == min(19, seen["before"] + 5)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before


_REPORT = """
import os
from shared.lane import autogroup_nice, lower_process_priority
lower_process_priority(5)
group = autogroup_nice()
print(os.getpriority(os.PRIO_PROCESS, 0), -1 if group is None else group)
"""


def _lowered(new_session: bool) -> tuple[int, int]:
    """(thread niceness, autogroup niceness or -1) of a child that lowered its priority by 5."""
    out = subprocess.run(
        [sys.executable, "-c", _REPORT], capture_output=True, text=True, check=True,
        start_new_session=new_session, cwd=Path(__file__).parents[2],
    ).stdout.split()  # fmt: skip
    return int(out[0]), int(out[1])


def test_a_batch_only_session_leader_lowers_its_sessions_autogroup_and_nobody_elses() -> None:
    # Where the kernel has no autogroups (the file is missing), only the thread yields. A new
    # session gets a fresh group at niceness 0, even where pytest's is the root group (which
    # the kernel shows as an empty file).
    grouped = Path(AUTOGROUP).exists()
    mine = autogroup_nice()
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert _lowered(new_session=True) == (min(19, base + 5), 5 if grouped else -1)
    # In this session (pytest's, a shell's): the thread yields, the session's group does not.
    assert _lowered(new_session=False) == (min(19, base + 5), -1 if mine is None else mine)
    assert autogroup_nice() == mine


def test_autogroup_nice_reads_a_group_and_knows_none(tmp_path: Path) -> None:
    shown = tmp_path / "autogroup"
    shown.write_text("/autogroup-95038 nice 7\n")
    assert autogroup_nice(str(shown)) == 7
    shown.write_text("")  # the root group: the kernel shows nothing
    assert autogroup_nice(str(shown)) is None
    shown.write_text("/autogroup-95038 nice \n")
    assert autogroup_nice(str(shown)) is None
    assert autogroup_nice(str(tmp_path / "missing")) is None  # a kernel without autogroups
