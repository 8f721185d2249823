"""Settings, one frozen Struct per concern, loaded once from the environment (README: Configuration).

Loading fails before any connection opens: a bad value is a clear ConfigError naming the variable.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
from pathlib import Path
from typing import Literal

import msgspec

DEFAULT_CHAT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_EMBED_MODEL = "all-MiniLM-L6-v2"
CHAT_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
EMBED_ENDPOINTS = ("/v1/embeddings",)


class ConfigError(ValueError):
    pass


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A model jetbatch serves: its public name, where its weights are, and what it does."""

    name: str
    path: str  # "" = the built-in default location for a default model
    task: Literal["generate", "embed"]

    @property
    def endpoints(self) -> tuple[str, ...]:
        return EMBED_ENDPOINTS if self.task == "embed" else CHAT_ENDPOINTS


# What `jetbatch up` allows when JETBATCH_WEBHOOK_ALLOWED_NETWORKS is unset: a local receiver.
LOOPBACK_NETWORKS = "127.0.0.0/8,::1/128"


class WebhookSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The webhook notifier's delivery policy (README: Webhooks)."""

    # Signs deliveries to a batch's own metadata.webhook_url (endpoints have their own secrets).
    secret: str | None = None
    max_attempts: int = 15
    # Past this age (from the event) a failing delivery is dead-lettered: OpenAI's 72 hours.
    max_age_s: float = 72 * 3600
    # Full jitter: the wait before attempt n+1 is uniform in [0, min(max, base * 2**(n-1))].
    backoff_base_s: float = 10.0
    backoff_max_s: float = 6 * 3600
    timeout_s: float = 10.0  # one attempt, connect to last byte read
    concurrency: int = 64  # attempts in flight, per notifier process
    concurrency_per_host: int = 4  # so one slow receiver cannot take every slot
    # Destinations resolving to non-public addresses (loopback, private, link-local, ...) are
    # refused unless inside one of these networks (CIDR strings, normalized).
    allowed_networks: tuple[str, ...] = ()


class LimitSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What one deployment accepts at once (README: Limits). Over a limit, batch creation is
    refused with 429 and nothing is created."""

    # Seconds a batch has to finish once created. OpenAI's "24h"; operators may shorten it (tests
    # use seconds). The API still only accepts completion_window "24h".
    completion_window_s: int = 86_400
    max_active_batches: int = 10  # batches validating or in progress (cancelling ones included)
    max_queued_requests: int = 500_000  # requests of open batches without a result yet


class HealthSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Watchdog timings and health thresholds (README: Operations)."""

    worker_stale_s: float = 60.0  # a heartbeat older than this is a stale worker
    batch_stall_s: float = 1800.0  # an open batch without progress this long is flagged stalled
    watchdog_interval_s: float = 5.0  # how often the watchdog looks
    # A batch left in `validating` (or in_progress but not fully published) this long without
    # progress is re-driven: the api re-runs its idempotent validate-and-publish.
    redrive_after_s: float = 60.0
    # A cancelled or expired batch waits this long for workers to report what they were running
    # before every line still without a result becomes a batch_cancelled/batch_expired line.
    close_grace_s: float = 10.0
    # Refuse batch creation (503) when no healthy worker for the model was seen within
    # worker_stale_s. Off by default: in development workers start after the api.
    require_healthy_worker: bool = False
    # A worker stops pulling while its GPU is above either threshold (0 = no threshold). vLLM
    # takes 90% of GPU memory by design, so only more than that means someone else is using it.
    gpu_max_memory_pct: float = 98.0
    gpu_max_temperature_c: float = 88.0
    # On SIGTERM, how long a worker lets in-flight requests finish before handing them back.
    drain_timeout_s: float = 30.0


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    data_dir: Path
    # Where converted default models are cached (default <data dir>/models); several data dirs
    # (tests, benchmarks) can share one.
    models_cache_dir: Path | None = None
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_key: str | None = None
    nats_url: str | None = None  # None = embedded nats-server (jetbatch up)
    database_url: str | None = None  # None = embedded PostgreSQL (jetbatch up)
    engine: Literal["vllm", "instant"] = "vllm"
    models: tuple[ModelSpec, ...] = ()
    max_file_bytes: int = 200 * 1024 * 1024
    max_batch_lines: int = 50_000
    log_level: str = "INFO"
    # Inference
    max_in_flight: int = 0  # 0 = sized from the engine
    # A killed worker's requests go back to the queue after this; a live one extends it every
    # third of it while it works, however long a request takes.
    request_ack_wait_s: int = 60
    request_max_deliver: int = 5
    heartbeat_interval_s: float = 5.0
    sync_timeout_s: float = 600.0
    # Added to the CPU niceness of the processes that only do batch work (the results writer,
    # the api's validation and publishing children), so on a busy machine they yield the CPU to
    # synchronous requests; 0 = off.
    batch_nice: int = 10
    webhooks: WebhookSettings = msgspec.field(default_factory=WebhookSettings)
    limits: LimitSettings = msgspec.field(default_factory=LimitSettings)
    health: HealthSettings = msgspec.field(default_factory=HealthSettings)
    # Instant engine only (tests, benchmarks): seconds each request takes, abortable.
    instant_delay_s: float = 0.0

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def models_dir(self) -> Path:
        return self.models_cache_dir or self.data_dir / "models"

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)


def parse_models(value: str) -> tuple[ModelSpec, ...]:
    """`NAME[=PATH][@generate|@embed]`, comma-separated. The two defaults need no path."""
    specs: list[ModelSpec] = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        task: str | None = None
        if "@" in item.rsplit("=", 1)[-1]:
            item, task = item.rsplit("@", 1)
        name, _, path = item.partition("=")
        name = name.strip()
        if not name:
            raise ConfigError(f"JETBATCH_MODELS: empty model name in {value!r}")
        if task is None:
            task = "embed" if name == DEFAULT_EMBED_MODEL or "embed" in name.lower() else "generate"
        if task not in ("generate", "embed"):
            raise ConfigError(f"JETBATCH_MODELS: task of {name!r} must be generate or embed")
        if not path and name not in (DEFAULT_CHAT_MODEL, DEFAULT_EMBED_MODEL):
            raise ConfigError(f"JETBATCH_MODELS: {name!r} needs a path: NAME=PATH")
        specs.append(ModelSpec(name=name, path=path.strip(), task=task))  # type: ignore[arg-type]
    if len({s.name for s in specs}) != len(specs):
        raise ConfigError("JETBATCH_MODELS: a model is named twice")
    return tuple(specs)


def _int(env: dict[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None


def parse_networks(name: str, value: str) -> tuple[str, ...]:
    networks: list[str] = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ConfigError(f"{name}: {item!r} is not a network (e.g. 10.0.0.0/8)") from None
    return tuple(networks)


def check_webhook_secret(name: str, value: str) -> str:
    """A Standard Webhooks secret: `whsec_` + base64 of 24..64 random bytes."""
    if not value.startswith("whsec_"):
        raise ConfigError(f"{name} must start with whsec_")
    try:
        key = base64.b64decode(value.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{name}: the part after whsec_ must be base64") from None
    if not 24 <= len(key) <= 64:
        raise ConfigError(f"{name}: the key must be 24 to 64 bytes, got {len(key)}")
    return value


def _positive(env: dict[str, str], name: str, default: float) -> float:
    value = _float(env, name, default)
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")
    return value


def load_webhooks(env: dict[str, str]) -> WebhookSettings:
    secret = env.get("JETBATCH_WEBHOOK_SECRET") or None
    settings = WebhookSettings(
        secret=check_webhook_secret("JETBATCH_WEBHOOK_SECRET", secret) if secret else None,
        max_attempts=_int(env, "JETBATCH_WEBHOOK_MAX_ATTEMPTS", 15, minimum=1),
        max_age_s=_positive(env, "JETBATCH_WEBHOOK_MAX_AGE_S", 72 * 3600),
        backoff_base_s=_positive(env, "JETBATCH_WEBHOOK_BACKOFF_BASE_S", 10.0),
        backoff_max_s=_positive(env, "JETBATCH_WEBHOOK_BACKOFF_MAX_S", 6 * 3600),
        timeout_s=_positive(env, "JETBATCH_WEBHOOK_TIMEOUT_S", 10.0),
        concurrency=_int(env, "JETBATCH_WEBHOOK_CONCURRENCY", 64, minimum=1),
        concurrency_per_host=_int(env, "JETBATCH_WEBHOOK_CONCURRENCY_PER_HOST", 4, minimum=1),
        allowed_networks=parse_networks(
            "JETBATCH_WEBHOOK_ALLOWED_NETWORKS", env.get("JETBATCH_WEBHOOK_ALLOWED_NETWORKS", "")
        ),
    )
    if settings.concurrency_per_host > settings.concurrency:
        raise ConfigError(
            "JETBATCH_WEBHOOK_CONCURRENCY_PER_HOST must be <= JETBATCH_WEBHOOK_CONCURRENCY"
        )
    return settings


def _bool(env: dict[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _non_negative(env: dict[str, str], name: str, default: float) -> float:
    value = _float(env, name, default)
    if value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")
    return value


def load_limits(env: dict[str, str]) -> LimitSettings:
    return LimitSettings(
        completion_window_s=_int(env, "JETBATCH_COMPLETION_WINDOW_S", 86_400, minimum=1),
        max_active_batches=_int(env, "JETBATCH_MAX_ACTIVE_BATCHES", 10, minimum=1),
        max_queued_requests=_int(env, "JETBATCH_MAX_QUEUED_REQUESTS", 500_000, minimum=1),
    )


def load_health(env: dict[str, str]) -> HealthSettings:
    return HealthSettings(
        worker_stale_s=_positive(env, "JETBATCH_WORKER_STALE_S", 60.0),
        batch_stall_s=_positive(env, "JETBATCH_BATCH_STALL_S", 1800.0),
        watchdog_interval_s=_positive(env, "JETBATCH_WATCHDOG_INTERVAL_S", 5.0),
        redrive_after_s=_positive(env, "JETBATCH_REDRIVE_AFTER_S", 60.0),
        close_grace_s=_non_negative(env, "JETBATCH_CLOSE_GRACE_S", 10.0),
        require_healthy_worker=_bool(env, "JETBATCH_REQUIRE_HEALTHY_WORKER", False),
        gpu_max_memory_pct=_non_negative(env, "JETBATCH_GPU_MAX_MEMORY_PCT", 98.0),
        gpu_max_temperature_c=_non_negative(env, "JETBATCH_GPU_MAX_TEMPERATURE_C", 88.0),
        drain_timeout_s=_non_negative(env, "JETBATCH_DRAIN_TIMEOUT_S", 30.0),
    )


def load(env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ if env is None else env)
    engine = env.get("JETBATCH_ENGINE", "vllm") or "vllm"
    if engine not in ("vllm", "instant"):
        raise ConfigError(f"JETBATCH_ENGINE must be vllm or instant, got {engine!r}")
    return Settings(
        data_dir=Path(env.get("JETBATCH_DATA_DIR") or "./.jetbatch").resolve(),
        models_cache_dir=(
            Path(env["JETBATCH_MODELS_DIR"]).resolve() if env.get("JETBATCH_MODELS_DIR") else None
        ),
        api_host=env.get("JETBATCH_API_HOST") or "127.0.0.1",
        api_port=_int(env, "JETBATCH_API_PORT", 8000, minimum=1),
        api_key=env.get("JETBATCH_API_KEY") or None,
        nats_url=env.get("JETBATCH_NATS_URL") or None,
        database_url=env.get("JETBATCH_DATABASE_URL") or None,
        engine=engine,  # type: ignore[arg-type]
        models=parse_models(
            env.get("JETBATCH_MODELS") or f"{DEFAULT_CHAT_MODEL},{DEFAULT_EMBED_MODEL}"
        ),
        max_file_bytes=_int(env, "JETBATCH_MAX_FILE_BYTES", 200 * 1024 * 1024, minimum=1),
        max_batch_lines=_int(env, "JETBATCH_MAX_BATCH_LINES", 50_000, minimum=1),
        log_level=(env.get("JETBATCH_LOG_LEVEL") or "INFO").upper(),
        max_in_flight=_int(env, "JETBATCH_MAX_IN_FLIGHT", 0),
        request_ack_wait_s=_int(env, "JETBATCH_REQUEST_ACK_WAIT_S", 60, minimum=1),
        request_max_deliver=_int(env, "JETBATCH_REQUEST_MAX_DELIVER", 5, minimum=1),
        heartbeat_interval_s=_float(env, "JETBATCH_HEARTBEAT_INTERVAL_S", 5.0),
        sync_timeout_s=_float(env, "JETBATCH_SYNC_TIMEOUT_S", 600.0),
        batch_nice=_int(env, "JETBATCH_BATCH_NICE", 10, minimum=0),
        webhooks=load_webhooks(env),
        limits=load_limits(env),
        health=load_health(env),
        instant_delay_s=_non_negative(env, "JETBATCH_INSTANT_DELAY_S", 0.0),
    )
