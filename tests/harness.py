"""jetbatch as separate OS processes that can be killed and restarted one by one: each service
(`python -m services.<name>`) on an embedded nats-server and PostgreSQL (or ones given), with the
instant engine. For the crash tests (tests/crash/) and the soak benchmark (bench/soak.py); jetbatch
itself runs under `jetbatch up` (services/supervisor.py) or a process manager.

Nothing here knows about batches: it starts, signals and restarts processes, and stops and
restarts the nats-server on the same store and port (as after a crash of the server)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from shared import db
from shared.embedded import EmbeddedNats, EmbeddedNatsCluster, EmbeddedPostgres, free_port

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
CHAT_MODEL = "SmolLM2-135M-Instruct"
API_KEY = "sk-harness"

COMMANDS = {
    "api": ["services.api"],
    "results_writer": ["services.results_writer"],
    "watchdog": ["services.watchdog"],
    "webhook_notifier": ["services.webhook_notifier"],
}


def role_for(name: str) -> str:
    """The NATS user a service connects as (shared.nats_auth): each only what its role may."""
    return "inference" if name.startswith("worker") else name


def command_for(name: str) -> list[str]:
    """`worker-<n>` is an inference worker for the chat model with that worker id."""
    if name.startswith("worker"):
        return ["services.inference", "--model", CHAT_MODEL, "--worker-id", name]
    return COMMANDS[name]


@dataclass
class Harness:
    root: Path
    env_overrides: dict[str, str] = field(default_factory=dict)
    nats: EmbeddedNats | EmbeddedNatsCluster | None = None  # a cluster: its nodes' URLs
    database_url: str | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _own_pg: EmbeddedPostgres | None = None
    _own_nats: bool = False

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        self.api_port = free_port()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}/v1"

    # -- servers --------------------------------------------------------------------------------

    def start_servers(self) -> None:
        if self.nats is None:
            self.nats = EmbeddedNats(self.root / "nats").start()
            self._own_nats = True
        if self.database_url is None:
            self._own_pg = EmbeddedPostgres(self.root / "pg").start()
            self.database_url = self._own_pg.url
        asyncio.run(db.migrate(self.database_url))

    def kill_nats(self) -> None:
        assert isinstance(self.nats, EmbeddedNats)
        self.nats.kill()

    def restart_nats(self) -> None:
        """The same store and port, as after a crash of the server."""
        assert isinstance(self.nats, EmbeddedNats)
        self.nats.start()

    # -- services -------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        assert self.nats is not None and self.database_url is not None
        env = dict(os.environ)
        env.update(
            {
                "JETBATCH_NATS_URL": self.nats.url,
                "JETBATCH_DATABASE_URL": self.database_url,
                "JETBATCH_DATA_DIR": str(self.root / "data"),
                "JETBATCH_API_KEY": API_KEY,
                "JETBATCH_API_PORT": str(self.api_port),
                "JETBATCH_ENGINE": "instant",
                "JETBATCH_MODELS": CHAT_MODEL,
                "JETBATCH_LOG_LEVEL": "INFO",
            }
        )
        env.update(self.env_overrides)
        return env

    def start(self, name: str, **extra_env: str) -> subprocess.Popen[bytes]:
        if name in self.procs and self.procs[name].poll() is None:
            raise RuntimeError(f"{name} is already running")
        log_file = open(self.root / "logs" / f"{name}.log", "ab")  # noqa: SIM115
        assert self.nats is not None
        own = {"JETBATCH_NATS_URL": self.nats.url_for(role_for(name))}
        proc = subprocess.Popen(
            [sys.executable, "-m", *command_for(name)],
            cwd=REPO,
            env={**self.env(), **own, **extra_env},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log_file.close()
        self.procs[name] = proc
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)

    def wait(self, name: str, timeout_s: float) -> int:
        return self.procs[name].wait(timeout_s)

    def restart(self, name: str, **extra_env: str) -> subprocess.Popen[bytes]:
        """Start again a process that was killed (waits for the old one to be gone)."""
        old = self.procs.get(name)
        if old is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                old.wait(10)
        return self.start(name, **extra_env)

    def wait_api(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            proc = self.procs.get("api")
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"the api exited with {proc.returncode}:\n{self.log_tail('api')}"
                )
            with (
                contextlib.suppress(Exception),
                urllib.request.urlopen(self.base_url.removesuffix("/v1") + "/healthz", timeout=1),
            ):
                return
            time.sleep(0.1)
        raise TimeoutError(f"the api is not up after {timeout_s}s:\n{self.log_tail('api')}")

    def log_tail(self, name: str, n: int = 40) -> str:
        path = self.root / "logs" / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])

    def stop_all(self, timeout_s: float = 30) -> dict[str, int | None]:
        """SIGTERM every service, wait, SIGKILL what is left; then the servers we started."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        codes: dict[str, int | None] = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                codes[name] = None
        if self._own_nats and self.nats is not None:
            self.nats.stop()
        if self._own_pg is not None:
            self._own_pg.stop()
        return codes
