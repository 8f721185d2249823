"""`jetbatch up` as an operator sees it: restarts a service that dies, and stops everything it
started on SIGTERM. Runs on the instant engine: this is about processes, not the model."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
from pathlib import Path
from urllib.parse import urlsplit

import nats
import openai
import psutil
import pytest

from shared.lane import AUTOGROUP, autogroup_nice
from shared.nats_auth import url_user
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
        check_locked_doors(system.proc.pid, system.data_dir)
        check_batch_work_yields(system.proc.pid)
    finally:
        code = stop_system(system)
    assert code == 0, system.log_tail()
    leftovers = [p for p in everything if alive(p)]
    assert leftovers == [], [p.pid for p in leftovers]


ROLES = {
    "services.api": "api",
    "services.results_writer": "results_writer",
    "services.webhook_notifier": "webhook_notifier",
    "services.watchdog": "watchdog",
    "services.inference": "inference",
}


def check_locked_doors(pid: int, data_dir: Path) -> None:
    """Each service is its own NATS user, the embedded NATS refuses anyone else (and none of the
    services was refused anything), the data dir is private and every secret in it 0600."""
    for module, role in ROLES.items():
        for proc in children_named(pid, module):
            assert url_user(proc.environ()["JETBATCH_NATS_URL"]) == role
    log = (data_dir / "nats" / "nats-server.log").read_text()
    assert "Violation" not in log, log[-3000:]  # "Publish Violation", "Subscription Violation"
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        port = urlsplit(children_named(pid, "services.api")[0].environ()["JETBATCH_NATS_URL"]).port
        asyncio.run(nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False))
    assert stat.S_IMODE(data_dir.stat().st_mode) & 0o077 in (0, 0o001)  # o+x for PostgreSQL
    for secret in ("api-key", "webhook-secret", "postgres-password", "nats/nats-auth.json"):
        path = data_dir / secret
        if path.exists():  # the api key and webhook secret came from the environment
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, secret


BATCH_ONLY = ("services.results_writer", "services.watchdog", "services.webhook_notifier")


def _autogroup_nice(pid: int) -> int | None:
    return autogroup_nice(f"/proc/{pid}/autogroup")  # a kernel that groups by session


def check_batch_work_yields(pid: int) -> None:
    """The services that do only batch work run niced (JETBATCH_BATCH_NICE, default 10), each in
    a session of its own whose autogroup is niced too; those that serve synchronous requests
    (the api, the workers) are not."""
    base, grouped = psutil.Process(pid).nice(), Path(AUTOGROUP).exists()
    for module in (*BATCH_ONLY, "services.api", "services.inference"):
        found = [p for p in children_named(pid, module) if p.ppid() == pid]  # one per model
        assert found, module
        lowered = module in BATCH_ONLY
        for proc in found:
            assert proc.nice() == (min(19, base + 10) if lowered else base), module
            if grouped:  # each service's session has a fresh group, which starts at 0
                assert _autogroup_nice(proc.pid) == (10 if lowered else 0), module
    # The api's batch-only children (the spare validator, the publishing child, started by the
    # batch run above) leave its session, so their work does not count against the api's group.
    # The api itself, not one of its children (their command lines name services.api too).
    (api,) = [p for p in children_named(pid, "services.api") if p.ppid() == pid]
    for module in ("services.api.validation", "services.api.publishing"):
        found = [p for p in children_named(api.pid, module) if p.ppid() == api.pid]
        assert found, module
        for proc in found:
            assert proc.nice() == min(19, base + 10), module
            assert os.getsid(proc.pid) == proc.pid, module
            if grouped:
                assert _autogroup_nice(proc.pid) == 10, module


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
