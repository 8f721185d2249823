"""jetbatch as on several hosts: two api replicas, a results writer, an inference worker and a
watchdog, each its own process with its own data dir and working directory (mode 0700) and an
environment that holds only its own settings, sharing nothing but NATS and PostgreSQL. A file
uploaded through one api runs as a batch created through the other, and its output and error
files read the same through either; no service dir ever holds a file's bytes (they live in the
files bucket)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import openai
import pytest

from schemas.openai import OutputLine
from shared.embedded import EmbeddedNats, free_port
from tests.helpers import API_KEY, CHAT, CHAT_MODEL, chat_line, stored_keys, wait_until_sync

N = 40  # lines that succeed; one more fails


@dataclass
class Host:
    """One service process as on a machine of its own: `root/` (0700) holds its working
    directory `work/` and its data dir `data/` (both 0700); HOME and TMPDIR point there too."""

    name: str
    command: list[str]
    root: Path
    settings: dict[str, str]
    logs: Path
    proc: subprocess.Popen[bytes] | None = None
    api_port: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def start(self) -> Host:
        for d in (self.root, self.work, self.data):
            d.mkdir(mode=0o700)
            d.chmod(0o700)  # whatever the umask
        # Only what a unit file on that host would set: no variable of the test run leaks in.
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(self.root),
            "TMPDIR": str(self.root / "work"),
            "JETBATCH_DATA_DIR": str(self.data),
            **self.settings,
        }
        with open(self.logs / f"{self.name}.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", *self.command],
                cwd=self.work, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}/v1"

    def log_tail(self, n: int = 30) -> str:
        path = self.logs / f"{self.name}.log"
        return (
            "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""
        )

    def wait_api(self, timeout_s: float = 60) -> None:
        assert self.proc is not None and self.api_port is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited:\n{self.log_tail()}")
            with (
                suppress(Exception),
                urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/healthz", timeout=1),
            ):
                return
            time.sleep(0.1)
        raise AssertionError(f"{self.name} is not up after {timeout_s}s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 20) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


@pytest.fixture
def hosts(
    nats_server: EmbeddedNats, database_url: str, tmp_path: Path
) -> Iterator[dict[str, Host]]:
    logs = tmp_path / "logs"  # the journal: outside every host's dir
    logs.mkdir()
    shared = {
        "JETBATCH_NATS_URL": nats_server.url,
        "JETBATCH_DATABASE_URL": database_url,
        "JETBATCH_ENGINE": "instant",
        "JETBATCH_MODELS": CHAT_MODEL,
        "JETBATCH_LOG_LEVEL": "INFO",
        "JETBATCH_WATCHDOG_INTERVAL_S": "0.5",
    }
    made: dict[str, Host] = {}

    def host(name: str, command: list[str], api: bool = False) -> Host:
        settings = dict(shared)
        port = None
        if api:
            port = free_port()
            settings |= {"JETBATCH_API_PORT": str(port), "JETBATCH_API_KEY": API_KEY}
        made[name] = Host(name, command, tmp_path / name, settings, logs, api_port=port)
        return made[name]

    host("api-a", ["services.api"], api=True)
    host("api-b", ["services.api"], api=True)
    host("results-writer", ["services.results_writer"])
    host("worker", ["services.inference", "--model", CHAT_MODEL, "--worker-id", "w1"])
    host("watchdog", ["services.watchdog"])
    try:
        for h in made.values():
            h.start()
        made["api-a"].wait_api()
        made["api-b"].wait_api()
        yield made
    finally:
        for h in made.values():
            h.stop()


def client(h: Host) -> openai.OpenAI:
    return openai.OpenAI(base_url=h.base_url, api_key=API_KEY, max_retries=0, timeout=30)


def decoded(data: bytes) -> list[OutputLine]:
    return [msgspec.json.decode(x, type=OutputLine) for x in data.splitlines()]


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() or p.is_symlink())


def test_services_on_separate_hosts_share_files_only_through_nats(
    hosts: dict[str, Host], nats_server: EmbeddedNats
) -> None:
    a, b = client(hosts["api-a"]), client(hosts["api-b"])
    marker = f"marker-{uuid.uuid4().hex}"  # found in no file but the ones this test uploads
    content = b"".join(chat_line(f"ok-{i}", f"{marker} line {i}") for i in range(N))
    # The engine refuses a negative temperature (as vLLM does): an error line, not a failure.
    content += chat_line("bad", f"{marker} bad", temperature=-1)

    uploaded = a.files.create(file=("hosts.jsonl", content), purpose="batch")
    assert b.files.retrieve(uploaded.id).bytes == len(content)
    assert b.files.content(uploaded.id).read() == content
    batch = b.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    done: Any = wait_until_sync(
        lambda: (
            x if (x := a.batches.retrieve(batch.id)).status in ("completed", "failed") else None
        ),
        f"batch {batch.id} to finish",
        timeout_s=60,
        interval_s=0.2,
    )
    logs = "\n".join(f"--- {h.name}\n{h.log_tail(10)}" for h in hosts.values())
    assert done.status == "completed", (done, logs)
    assert (done.request_counts.completed, done.request_counts.failed) == (N, 1)
    assert done.output_file_id and done.error_file_id

    # Each api reads the files the results writer stored, byte for byte the same.
    output = a.files.content(done.output_file_id).read()
    errors = a.files.content(done.error_file_id).read()
    assert b.files.content(done.output_file_id).read() == output
    assert b.files.content(done.error_file_id).read() == errors
    ok, failed = decoded(output), decoded(errors)
    assert sorted(x.custom_id for x in ok) == sorted(f"ok-{i}" for i in range(N))
    assert all(x.response is not None and x.response.status_code == 200 for x in ok)
    [bad] = failed
    assert bad.custom_id == "bad" and bad.response is not None
    assert bad.response.status_code == 400
    assert {uploaded.id, done.output_file_id, done.error_file_id} <= asyncio.run(
        stored_keys(nats_server.url)
    )

    # Stopped cleanly, every host dir is still private and holds no file's bytes: not the
    # upload, not the api's working copy for validation, not the output (which echoes the
    # marker back). Nothing was written to the shared temp dir either.
    codes = {h.name: h.stop() for h in hosts.values()}
    assert codes == dict.fromkeys(hosts, 0), (codes, logs)
    for h in hosts.values():
        for d in (h.root, h.work, h.data):
            assert d.stat().st_mode & 0o777 == 0o700, d
        for path in files_under(h.root):
            assert marker.encode() not in path.read_bytes(), f"{path} holds file bytes"
    assert not [
        p
        for p in Path(tempfile.gettempdir()).glob("jetbatch-*")
        if uploaded.id in p.name or batch.id in p.name
    ]
    leftovers = {h.name: files_under(h.root) for h in hosts.values()}
    assert leftovers == {h.name: [] for h in hosts.values()}, leftovers
