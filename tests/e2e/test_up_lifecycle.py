"""`jetbatch up` as an operator sees it: restarts a service that dies, and stops everything it
started on SIGTERM. Runs on the instant engine: this is about processes, not the model."""

from __future__ import annotations

import signal
from pathlib import Path

import openai
import psutil
import pytest

from tests.e2e.conftest import run_batch, start_system, stop_system
from tests.helpers import chat_line, wait_until_sync

pytestmark = pytest.mark.e2e


def children_named(pid: int, module: str) -> list[psutil.Process]:
    found = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if module in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:  # gone or a zombie not yet reaped by the supervisor
            continue
    return found


def test_up_restarts_a_killed_service_and_stops_cleanly(scratch_dir: Path) -> None:
    system = start_system(scratch_dir / "e2e-lifecycle", "instant", "up.log")
    try:
        client = openai.OpenAI(base_url=system.base_url, api_key=system.api_key, max_retries=0)
        started = children_named(system.proc.pid, "services.results_writer")
        assert len(started) == 1
        started[0].send_signal(signal.SIGKILL)

        def restarted() -> bool:
            now = children_named(system.proc.pid, "services.results_writer")
            return bool(now) and now[0].pid != started[0].pid

        wait_until_sync(restarted, "the results writer to restart", timeout_s=30, interval_s=0.2)

        # The system still works end to end after the restart.
        run_batch(client, chat_line("a", "hi"), "a.jsonl")

        everything = psutil.Process(system.proc.pid).children(recursive=True)
        assert len(everything) >= 8  # 6 services + nats-server + postgres (+ its workers)
    finally:
        code = stop_system(system)
    assert code == 0, system.log_tail()
    leftovers = [p for p in everything if alive(p)]
    assert leftovers == [], [p.pid for p in leftovers]


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
