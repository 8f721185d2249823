"""`jetbatch up`: the whole system on one machine. Starts the embedded nats-server and PostgreSQL
(unless JETBATCH_NATS_URL / JETBATCH_DATABASE_URL name servers to use), applies migrations,
prepares the default models, then runs every service as its own process and restarts any that
dies. SIGINT/SIGTERM stops everything it started, services first, servers last."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

from services.logs_cli import log_path
from services.migrate import migrate
from services.publisher_cli import ARCHIVED_CHECK_S, revoke_archived
from shared import bus, config, config_sections, metrics, nats_auth, process
from shared.embedded import EmbeddedNats, EmbeddedNatsCluster, EmbeddedPostgres, private_dir
from shared.nats_auth import write_private

log = logging.getLogger(__name__)

RESTART_BACKOFF_MAX_S = 30.0


@dataclass
class Child:
    name: str
    argv: list[str]
    role: str = ""  # its NATS user (shared.nats_auth)
    env: dict[str, str] = field(default_factory=dict)  # its own, over the shared environment
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = 0.5
    next_start: float = field(default=0.0)

    def start(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(self.argv, env={**env, **self.env}, start_new_session=True)
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.proc.pid)


def ensure_api_key(settings: config.Settings) -> str:
    """The configured key, or the one generated on an earlier run, or a new one (saved 0600)."""
    if settings.api_key:
        return settings.api_key
    path = settings.data_dir / "api-key"
    if path.exists() and path.read_text().strip():
        return path.read_text().strip()
    key = "sk-jetbatch-" + secrets.token_urlsafe(24)
    write_private(path, key + "\n")
    return key


def ensure_webhook_secret(settings: config.Settings) -> str:
    """JETBATCH_WEBHOOK_SECRET, or the whsec_ one generated on an earlier run, or a new one
    (saved 0600 in <data dir>/webhook-secret): signs deliveries to batches' metadata.webhook_url."""
    if settings.webhooks.secret:
        return settings.webhooks.secret
    path = settings.data_dir / "webhook-secret"
    if path.exists() and path.read_text().strip():
        return config_sections.check_webhook_secret(str(path), path.read_text().strip())
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    write_private(path, secret + "\n")
    return secret


def service_children(settings: config.Settings) -> list[Child]:
    py = [sys.executable, "-m"]
    children = [
        Child("api", [*py, "services.api"], nats_auth.API),
        Child("results-writer", [*py, "services.results_writer"], nats_auth.RESULTS_WRITER),
        Child("webhook-notifier", [*py, "services.webhook_notifier"], nats_auth.WEBHOOK_NOTIFIER),
        Child("watchdog", [*py, "services.watchdog"], nats_auth.WATCHDOG),
    ]
    for index, spec in enumerate(settings.models):
        argv = [*py, "services.inference", "--model", spec.name]
        # Its metrics port: JETBATCH_METRICS_PORT + 10 + index, apart from the other workers'.
        worker = {"JETBATCH_METRICS_WORKER": str(index)}
        children.append(Child(f"inference[{spec.name}]", argv, nats_auth.INFERENCE, worker))
    return children


def own_identities(
    children: list[Child], nats_server: EmbeddedNats | EmbeddedNatsCluster | None
) -> None:
    """On the embedded NATS, each service connects as its own role (its credentials in its
    JETBATCH_NATS_URL); on a NATS given by JETBATCH_NATS_URL, as that URL says."""
    if nats_server is not None:
        for child in children:
            child.env["JETBATCH_NATS_URL"] = nats_server.url_for(child.role)


def log_files(children: list[Child], settings: config.Settings) -> None:
    """Each service logs to its own rotating file, `<data dir>/logs/<service>.log` (read by
    `jetbatch logs`); one inference worker per model, so each its own file."""
    for child in children:
        child.env["JETBATCH_LOG_FILE"] = str(log_path(settings.data_dir, child.name))


def wait_healthy(url: str, timeout_s: float, children: list[Child]) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return True
        time.sleep(0.25)
    return False


def service_env(
    settings: config.Settings, nats_url: str, database_url: str, api_key: str, webhook_secret: str
) -> dict[str, str]:
    """The environment every service process starts with: this one's, plus the servers and
    secrets `up` settled on."""
    env = dict(os.environ)
    env.update(
        {
            "JETBATCH_NATS_URL": nats_url,
            "JETBATCH_DATABASE_URL": database_url,
            "JETBATCH_API_KEY": api_key,
            "JETBATCH_WEBHOOK_SECRET": webhook_secret,
            # A receiver on this machine works out of the box; other private ranges stay refused.
            "JETBATCH_WEBHOOK_ALLOWED_NETWORKS": os.environ.get(
                "JETBATCH_WEBHOOK_ALLOWED_NETWORKS", config_sections.LOOPBACK_NETWORKS
            ),
            "JETBATCH_DATA_DIR": str(settings.data_dir),
            "JETBATCH_ENGINE": settings.engine,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
    )
    return env


def announce_when_healthy(
    settings: config.Settings, api_key: str, children: list[Child], admin_key: str | None = None
) -> None:
    host = "127.0.0.1" if settings.api_host in ("0.0.0.0", "::") else settings.api_host
    base = f"http://{host}:{settings.api_port}"
    if wait_healthy(f"{base}/healthz", 120, children):
        print(f"jetbatch is up: base URL {base}/v1", flush=True)
        print(f"API key: {api_key} (saved in {settings.data_dir / 'api-key'})", flush=True)
        if admin_key:  # the first admin key: projects and their keys (README: Projects and keys)
            print(
                f"admin key: {admin_key} (saved in {settings.data_dir / 'admin-key'})", flush=True
            )
        if not settings.webhooks.secret:
            print(f"webhook secret: in {settings.data_dir / 'webhook-secret'}", flush=True)
        for url in metrics.up_urls(settings, base):  # README: Metrics
            print(f"metrics: {url}", flush=True)
    else:
        log.error("the api did not become healthy; see the logs above")


def restart_exited(children: list[Child], env: dict[str, str]) -> None:
    """One pass over the children: schedule a restart of each that exited, start each that is due."""
    now = time.monotonic()
    for child in children:
        if child.proc is not None and child.proc.poll() is not None:
            code = child.proc.returncode
            # A process that ran a while earns a fast restart; a crash loop backs off.
            if now - child.started_at > 60:
                child.backoff_s = 0.5
            log.warning("%s exited with %s; restarting in %.1fs", child.name, code, child.backoff_s)
            child.proc = None
            child.next_start = now + child.backoff_s
            child.backoff_s = min(RESTART_BACKOFF_MAX_S, child.backoff_s * 2)
            child.restarts += 1
        elif child.proc is None and now >= child.next_start:
            child.start(env)


def stop_children(children: list[Child]) -> None:
    """SIGTERM to all at once, then up to 45 s in all for them to exit; the rest are killed."""
    for child in children:
        if child.proc is not None and child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 45
    for child in children:
        if child.proc is None:
            continue
        try:
            child.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in time; killing it", child.name)
            child.proc.kill()
            child.proc.wait()


def revoke_publishers_of_archived(settings: config.Settings, database_url: str) -> None:
    """An archived project's NATS publisher goes with its keys (services/publisher_cli.py)."""
    try:
        for project in revoke_archived(settings.data_dir, database_url):
            log.info("project %s is archived: its NATS publisher is revoked", project)
    except Exception:  # the next look tries again; `jetbatch up` itself goes on
        log.exception("could not check for publishers of archived projects")


def start_nats(settings: config.Settings, cluster: bool) -> EmbeddedNats | EmbeddedNatsCluster:
    """The embedded nats-server, or a local 3-node cluster whose JetStream has elected its
    leader (the services create their streams with JETBATCH_NATS_REPLICAS replicas)."""
    if not cluster:
        server = EmbeddedNats(settings.data_dir / "nats").start()
        log.info("embedded nats-server at %s", server.anonymous_url)
        return server
    nodes = EmbeddedNatsCluster(settings.data_dir / "nats-cluster").start()
    asyncio.run(bus.wait_for_jetstream(nodes.url))
    log.info("embedded 3-node NATS cluster at %s", ",".join(n.anonymous_url for n in nodes.nodes))
    return nodes


def up(settings: config.Settings, *, cluster: bool = False) -> int:
    private_dir(settings.data_dir)
    settings.data_dir.chmod(0o700)  # one made by an older version (its secrets are 0600 already)
    stopping = False

    def on_signal(_sig: int) -> None:
        nonlocal stopping
        stopping = True

    process.on_signals_blocking(on_signal)

    nats_server: EmbeddedNats | EmbeddedNatsCluster | None = None
    pg_server: EmbeddedPostgres | None = None
    children: list[Child] = []
    try:
        nats_url = settings.nats_url
        if not nats_url:
            nats_server = start_nats(settings, cluster)
            nats_url = nats_server.url
        database_url = settings.database_url
        if not database_url:
            pg_server = EmbeddedPostgres(settings.data_dir / "postgres").start()
            database_url = pg_server.url
            log.info("embedded PostgreSQL at %s", database_url)
        asyncio.run(migrate(settings, database_url, nats_url))
        if settings.engine == "vllm":
            from services.inference.models import prepare_models

            prepare_models(settings)
        api_key = ensure_api_key(settings)
        env = service_env(
            settings, nats_url, database_url, api_key, ensure_webhook_secret(settings)
        )
        children = service_children(settings)
        own_identities(children, nats_server)
        log_files(children, settings)
        log.info("service logs in %s (`jetbatch logs`)", settings.data_dir / "logs")
        for child in children:
            child.start(env)
        from services.api.keys_cli import first_admin_key

        admin_key = asyncio.run(first_admin_key(database_url, settings.data_dir))
        announce_when_healthy(settings, api_key, children, admin_key)
        publishers_checked = time.monotonic()
        while not stopping:
            restart_exited(children, env)
            if nats_server is not None and time.monotonic() - publishers_checked > ARCHIVED_CHECK_S:
                publishers_checked = time.monotonic()
                revoke_publishers_of_archived(settings, database_url)
            time.sleep(0.2)
        return 0
    finally:
        log.info("stopping")
        stop_children(children)
        if pg_server is not None:
            pg_server.stop()
        if nats_server is not None:
            nats_server.stop()
        log.info("stopped")
