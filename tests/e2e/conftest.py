"""The whole system, started the way a user starts it (`jetbatch up`), once per test session,
with the real vLLM engine on the CPU and both default models; driven through the `openai` SDK."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from openai.types import Batch

from shared.embedded import free_port
from tests.helpers import API_KEY, CHAT, wait_until_sync
from tests.otlp_receiver import Receiver

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 600
METRICS_PORTS = 14  # the results writer, notifier and watchdog at +0..+2, workers from +10


@dataclass
class System:
    base_url: str
    api_key: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, n: int = 80) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


def _get(url: str, key: str) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def start_system(
    data_dir: Path, engine: str, log_name: str, *args: str, env: dict[str, str] | None = None
) -> System:
    port = free_port()
    overrides = env or {}
    env = dict(os.environ)
    env.update(
        {
            "JETBATCH_DATA_DIR": str(data_dir),
            "JETBATCH_MODELS_DIR": str(REPO / ".jetbatch" / "models"),
            "JETBATCH_API_PORT": str(port),
            "JETBATCH_API_KEY": API_KEY,
            "JETBATCH_ENGINE": engine,
            "JETBATCH_HEARTBEAT_INTERVAL_S": "1",
        }
    )
    for name in ("JETBATCH_NATS_URL", "JETBATCH_DATABASE_URL"):
        env.pop(name, None)
    env.update(overrides)
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / log_name
    log_file = open(log_path, "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", *args],
        cwd=REPO,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    system = System(f"http://127.0.0.1:{port}/v1", API_KEY, data_dir, proc, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jetbatch up exited with {proc.returncode}:\n{system.log_tail()}")
        try:
            models = _get(f"{system.base_url}/models", API_KEY)["data"]
            if models and all(m["live_workers"] >= 1 for m in models):
                return system
        except Exception:
            pass
        time.sleep(1)
    stop_system(system)
    raise TimeoutError(f"workers not live after {START_TIMEOUT_S}s:\n{system.log_tail()}")


def stop_system(system: System) -> int:
    if system.proc.poll() is None:
        system.proc.send_signal(signal.SIGTERM)
        try:
            system.proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(system.proc.pid, signal.SIGKILL)
            system.proc.wait()
    return system.proc.returncode


@pytest.fixture(scope="session")
def otlp() -> Iterator[Receiver]:
    """A real OTLP/HTTP receiver the session's system exports its traces to."""
    receiver = Receiver().start()
    yield receiver
    receiver.stop()


def free_port_range(n: int) -> int:
    """A base port whose next `n` ports are all free now (the services' metrics ports)."""
    for _ in range(100):
        base = random.randrange(20_000, 40_000)
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {n} free ports in a row")


@pytest.fixture(scope="session")
def system(scratch_dir: Path, otlp: Receiver) -> Iterator[System]:
    """jetbatch up with vLLM (CPU) serving SmolLM2-135M-Instruct and all-MiniLM-L6-v2, exporting
    traces (each batch's line 0 at the default ratio) and serving a metrics port per service,
    as an operator runs it."""
    system = start_system(
        scratch_dir / "e2e-vllm",
        "vllm",
        "up.log",
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "JETBATCH_METRICS_PORT": str(free_port_range(METRICS_PORTS)),
        },
    )
    yield system
    stop_system(system)


@pytest.fixture
def client(system: System):
    import openai

    return openai.OpenAI(base_url=system.base_url, api_key=system.api_key, max_retries=0)


def run_batch(client: openai.OpenAI, data: bytes, name: str = "batch.jsonl") -> Batch:
    """Upload `data`, create a chat batch of it and wait for it to complete."""
    f = client.files.create(file=(name, data), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    wait_until_sync(
        lambda: client.batches.retrieve(batch.id).status == "completed",
        f"batch {batch.id} to complete",
        timeout_s=60,
        interval_s=0.2,
    )
    return client.batches.retrieve(batch.id)
