"""shared.children.SpareChild: a child started ahead, taken for one job, the next started."""

from __future__ import annotations

import asyncio

from shared.children import SpareChild

# Reads its job from stdin, answers with its arguments and the job.
ECHO = "json.tool"


async def test_a_taken_child_was_started_ahead_and_the_next_one_starts_at_once() -> None:
    spare = SpareChild(ECHO)
    spare.start()
    try:
        await asyncio.sleep(0.2)
        first = await spare.take()
        assert first.returncode is None  # running, waiting on stdin for its job
        assert spare._spare is not None  # the next one is on its way
        out, _ = await first.communicate(b'{"job": 1}')
        assert first.returncode == 0 and b'"job": 1' in out
        second = await spare.take()
        assert second.pid != first.pid
        out, _ = await second.communicate(b"[2]")
        assert second.returncode == 0 and b"2" in out
    finally:
        await spare.close()


async def test_a_spare_that_died_is_replaced_by_a_fresh_child() -> None:
    spare = SpareChild(ECHO)
    spare.start()
    try:
        assert spare._spare is not None
        dead = await spare._spare
        dead.kill()
        await dead.wait()
        child = await spare.take()
        assert child.pid != dead.pid and child.returncode is None
        await child.communicate(b"{}")
    finally:
        await spare.close()


async def test_closing_kills_the_waiting_spare() -> None:
    spare = SpareChild(ECHO)
    spare.start()
    assert spare._spare is not None
    child = await spare._spare
    await spare.close()
    assert child.returncode is not None
    spare.start()  # closed: starts nothing
    assert spare._spare is None
