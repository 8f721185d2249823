"""services.api.children.SpareChild: a child started ahead, taken for one job, the next started."""

from __future__ import annotations

import asyncio
import gc
import io
import sys

import msgspec

from services.api.children import SpareChild, serve_one_job

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


class _Job(msgspec.Struct):
    n: int


def test_a_childs_main_freezes_its_start_up_heap_before_the_job(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Full collections in a child (80-165 ms measured in the publishing child) must not rescan
    its imports: serve_one_job freezes them before reading the job."""
    monkeypatch.setattr(sys, "argv", ["child"])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"n": 41}')))
    out = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out))
    seen: list[int] = []

    def run(job: _Job) -> dict[str, int]:
        seen.append(gc.get_freeze_count())
        return {"n": job.n + 1}

    gc.unfreeze()
    try:
        assert serve_one_job(_Job, run) == 0
    finally:
        gc.unfreeze()
    assert seen and seen[0] > 0
    assert msgspec.json.decode(out.getvalue()) == {"n": 42}
