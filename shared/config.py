"""Settings: one frozen Struct per concern, read once from the environment (README: Configuration).

A field says everything about its setting: its type and Meta what it accepts and what it means,
its default the default, its name the variable (`JETBATCH_` + the Struct's prefix + the name
upper-case; `shared/settings_env.py`). Loading fails before any connection opens, with one
ConfigError naming every bad variable. `python -m shared.config` prints the README's table.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import msgspec
from msgspec import Meta

from shared import settings_env
from shared.settings_env import AtMost, ConfigError, Parse

DEFAULT_CHAT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_EMBED_MODEL = "all-MiniLM-L6-v2"
CHAT_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
EMBED_ENDPOINTS = ("/v1/embeddings",)
# What `jetbatch up` allows when JETBATCH_WEBHOOK_ALLOWED_NETWORKS is unset: a local receiver.
LOOPBACK_NETWORKS = "127.0.0.0/8,::1/128"


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A model jetbatch serves: its public name, where its weights are, and what it does."""

    name: str
    path: str  # "" = the built-in default location for a default model
    task: Literal["generate", "embed"]

    @property
    def endpoints(self) -> tuple[str, ...]:
        return EMBED_ENDPOINTS if self.task == "embed" else CHAT_ENDPOINTS


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


def _models_text(specs: tuple[ModelSpec, ...]) -> str:
    return ",".join(s.name if not s.path else f"{s.name}={s.path}@{s.task}" for s in specs)


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


def _log_level(name: str, value: str) -> str:
    if value.strip().upper() not in logging.getLevelNamesMapping():
        raise ValueError(value)
    return value.strip().upper()


MODELS = Parse(
    lambda _, text: parse_models(text),
    "NAME[=PATH][@generate|@embed], comma-separated",
    show=_models_text,
)
NETWORKS = Parse(parse_networks, "comma-separated networks in CIDR notation (e.g. 10.0.0.0/8)")
WEBHOOK_SECRET = Parse(check_webhook_secret, "whsec_ + base64 of 24 to 64 bytes")
LOG_LEVEL = Parse(_log_level, "a log level: DEBUG, INFO, WARNING, ERROR or CRITICAL")


class WebhookSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The webhook notifier's delivery policy (README: Webhooks)."""

    env_prefix: ClassVar[str] = "WEBHOOK_"

    secret: Annotated[
        str | None,
        Meta(
            description="signs deliveries to a batch's own `metadata.webhook_url` (endpoints have"
            " their own secrets). `jetbatch up` generates one when unset and writes it to `<data"
            " dir>/webhook-secret`; without one, such deliveries are dead letters",
            extra={"unset": "generated by `jetbatch up`"},
        ),
        WEBHOOK_SECRET,
    ] = None
    max_attempts: Annotated[
        int, Meta(ge=1, description="attempts of one delivery before it is a dead letter")
    ] = 15
    max_age_s: Annotated[
        float,
        Meta(
            gt=0,
            description="how long (OpenAI's 72 h, from the event) a failing delivery is retried"
            " before it is a dead letter",
        ),
    ] = 72 * 3600
    backoff_base_s: Annotated[
        float,
        Meta(
            gt=0,
            description="backoff after the first failed attempt (full jitter: the wait before"
            " attempt n+1 is uniform in [0, min(max, base * 2**(n-1))])",
        ),
    ] = 10.0
    backoff_max_s: Annotated[float, Meta(gt=0, description="ceiling of the backoff (6 h)")] = (
        6 * 3600
    )
    timeout_s: Annotated[
        float, Meta(gt=0, description="one attempt, from DNS to the last byte read")
    ] = 10.0
    concurrency: Annotated[
        int, Meta(ge=1, description="attempts in flight per notifier process")
    ] = 64
    concurrency_per_host: Annotated[
        int,
        Meta(
            ge=1,
            description="attempts in flight to one host:port per notifier process, so one slow"
            " receiver cannot take every slot",
        ),
        AtMost("concurrency"),
    ] = 4
    allowed_networks: Annotated[
        tuple[str, ...],
        Meta(
            description="networks that webhook destinations may resolve to although not public"
            " (loopback, private, link-local, ...); others are refused",
            extra={"unset": f"none; `jetbatch up`: `{LOOPBACK_NETWORKS}`"},
        ),
        NETWORKS,
    ] = ()


class LimitSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What one deployment accepts at once (README: Limits). Over a limit, batch creation is
    refused with 429 and nothing is created."""

    env_prefix: ClassVar[str] = ""

    completion_window_s: Annotated[
        int,
        Meta(
            ge=1,
            description="how long a batch's `24h` completion window really lasts before it expires"
            " (operators may shorten it, tests use seconds; the API still only accepts `24h`)",
        ),
    ] = 86_400
    max_active_batches: Annotated[
        int,
        Meta(
            ge=1,
            description="batches validating or in progress at once per project (cancelling ones"
            " included); more is a 429",
        ),
    ] = 10
    max_queued_requests: Annotated[
        int,
        Meta(
            ge=1,
            description="requests of a project's open batches without a result yet; a batch that"
            " would exceed it is a 429",
        ),
    ] = 500_000
    max_sync_requests: Annotated[
        int, Meta(ge=1, description="synchronous requests one api process runs at once; more is"
                  " a 429 with `retry-after`")
    ] = 256  # fmt: skip
    max_sync_requests_per_key: Annotated[
        int,
        Meta(
            ge=1,
            description="the same for one project's requests (one key's, for an"
            " admin key or an api without keys)",
        ),
    ] = 64


class HealthSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Watchdog timings and health thresholds (README: Operations)."""

    env_prefix: ClassVar[str] = ""

    worker_stale_s: Annotated[
        float,
        Meta(
            gt=0,
            description="a worker whose last heartbeat is older is stale (`GET /v1/workers`,"
            " watchdog log)",
        ),
    ] = 60.0
    batch_stall_s: Annotated[
        float, Meta(gt=0, description="an open batch without progress this long gets `stalled_at`")
    ] = 1800.0
    watchdog_interval_s: Annotated[
        float, Meta(gt=0, description="how often the watchdog looks")
    ] = 5.0
    redrive_after_s: Annotated[
        float,
        Meta(
            gt=0,
            description="a batch still validating (or in progress but not fully published) this"
            " long without progress is re-driven: the api re-runs its idempotent"
            " validate-and-publish",
        ),
    ] = 60.0
    validation_timeout_s: Annotated[
        float, Meta(gt=0, description="a batch still validating this long after it was created"
                    " fails (`validation_timeout`) instead of being re-driven again")
    ] = 3600.0  # fmt: skip
    close_grace_s: Annotated[
        float,
        Meta(
            ge=0,
            description="how long a cancelled or expired batch waits for workers to report what"
            " they were running before its unanswered lines are closed out",
        ),
    ] = 10.0
    require_healthy_worker: Annotated[
        bool,
        Meta(
            description="refuse batch creation (503) unless a healthy worker for the model was"
            " heard from within `JETBATCH_WORKER_STALE_S` (off for development, where workers"
            " start after the api)"
        ),
    ] = False
    gpu_max_memory_pct: Annotated[
        float,
        Meta(
            ge=0,
            description="a worker whose GPU memory use is above this pulls no new requests until it"
            " is 2 points under (0 = no limit; vLLM itself takes 90%, so only more means someone"
            " else is using the GPU)",
        ),
    ] = 98.0
    gpu_max_temperature_c: Annotated[
        float,
        Meta(ge=0, description="the same for GPU temperature, resuming 5 C under (0 = no limit)"),
    ] = 88.0
    drain_timeout_s: Annotated[
        float,
        Meta(
            ge=0,
            description="on SIGTERM, how long a worker lets in-flight requests finish before"
            " handing them back",
        ),
    ] = 30.0


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    env_prefix: ClassVar[str] = "JETBATCH_"

    data_dir: Annotated[
        Path,
        Meta(
            description="the embedded servers' state (`nats/`, `postgres/`) and local secrets (the"
            " api key, the webhook secret); relative to the working directory. File bytes live in"
            " JetStream (bucket `jetbatch_files`); a `files/` folder left by an older version is"
            " moved there by `jetbatch migrate`"
        ),
    ] = Path(".jetbatch")
    scratch_dir: Annotated[
        Path | None,
        Meta(
            description="where the api keeps its private working copy of a batch's input file"
            " while it validates and publishes it (deleted right after); never shared",
            extra={"unset": "the system's temporary directory"},
        ),
    ] = None
    models_cache_dir: Annotated[
        Path | None,
        Meta(
            description="cache of the converted default models; several data dirs (tests,"
            " benchmarks) can share one",
            extra={"env": "JETBATCH_MODELS_DIR", "unset": "`<data dir>/models`"},
        ),
    ] = None
    api_host: Annotated[str, Meta(description="address the API binds to")] = "127.0.0.1"
    api_port: Annotated[int, Meta(ge=1, description="API port")] = 8000
    api_key: Annotated[
        str | None,
        Meta(
            description="an admin key of the default project (README: Projects and keys). Unset:"
            " `jetbatch up` generates one into `<data dir>/api-key`; a lone `jetbatch api` serves"
            " without auth (and warns) while no key was ever created",
            extra={"unset": "generated by `jetbatch up`"},
        ),
    ] = None
    nats_url: Annotated[
        str | None,
        Meta(
            description="use this NATS server instead of starting one (`jetbatch up`); a"
            " cluster's servers as a comma-separated list, reconnected across",
            extra={"unset": "embedded"},
        ),
    ] = None
    nats_replicas: Annotated[
        int,
        Meta(
            ge=1,
            le=5,
            description="replicas of every stream and KV bucket: 1 on a single server, 3 in a"
            " cluster; start-up creates what is missing with it and raises what is under it,"
            " never lowers one, and keeps limits an operator changed",
        ),
    ] = 1
    database_url: Annotated[
        str | None,
        Meta(
            description="use this PostgreSQL instead of starting one (`jetbatch up`)",
            extra={"unset": "embedded"},
        ),
    ] = None
    engine: Annotated[
        Literal["vllm", "instant"],
        Meta(
            description="`vllm`, or `instant`: a fake engine that answers at once, **for tests and"
            " benchmarks only**"
        ),
    ] = "vllm"
    models: Annotated[
        tuple[ModelSpec, ...],
        Meta(
            description="served models (PATH: a local Hugging Face model directory; the two"
            " defaults need none)"
        ),
        MODELS,
    ] = (
        ModelSpec(name=DEFAULT_CHAT_MODEL, path="", task="generate"),
        ModelSpec(name=DEFAULT_EMBED_MODEL, path="", task="embed"),
    )
    models_file: Annotated[
        Path | None,
        Meta(
            description='TOML file of vLLM engine settings per served model (`[models."NAME"]`,'
            " keys named as vLLM's engine arguments: `tensor_parallel_size`, `max_model_len`,"
            " `gpu_memory_utilization`, ...; README: Engine settings per model); an unknown key"
            " or a bad value stops the inference worker, naming it",
            extra={"unset": "jetbatch's defaults for the device"},
        ),
    ] = None
    max_file_bytes: Annotated[int, Meta(ge=1, description="largest upload (200 MB)")] = (
        200 * 1024 * 1024
    )
    max_batch_lines: Annotated[int, Meta(ge=1, description="most requests in one batch")] = 50_000
    log_level: Annotated[str, Meta(description="log level"), LOG_LEVEL] = "INFO"
    # Inference
    max_in_flight: Annotated[
        int,
        Meta(
            ge=0,
            description="requests one worker keeps in its engine, 0 = sized from the engine"
            " (finished ones waiting for their result to be stored do not count; up to 2,048 of"
            " those more)",
        ),
    ] = 0
    request_ack_wait_s: Annotated[
        int,
        Meta(
            ge=1,
            description="JetStream ack wait of a request: a killed worker's requests go back to the"
            " queue after it (a live worker extends it every third of it while it works, however"
            " long a request takes)",
        ),
    ] = 60
    request_max_deliver: Annotated[
        int,
        Meta(
            ge=1,
            description="deliveries of a request before its engine failure becomes an error line",
        ),
    ] = 5
    heartbeat_interval_s: Annotated[float, Meta(gt=0, description="worker heartbeat period")] = 5.0
    sync_timeout_s: Annotated[
        float, Meta(gt=0, description="how long a synchronous request waits for its answer")
    ] = 600.0
    batch_nice: Annotated[
        int,
        Meta(
            ge=0,
            description="added to the CPU niceness (`nice`) of the processes that do only batch"
            " work (the results writer, the api's validation and publishing children), so on a"
            " busy machine they yield the CPU to synchronous requests; `0` = off",
        ),
    ] = 10
    webhooks: WebhookSettings = msgspec.field(default_factory=WebhookSettings)
    limits: LimitSettings = msgspec.field(default_factory=LimitSettings)
    health: HealthSettings = msgspec.field(default_factory=HealthSettings)
    instant_delay_s: Annotated[
        float,
        Meta(
            ge=0,
            description="instant engine only (tests, benchmarks): seconds each request takes,"
            " abortable",
        ),
    ] = 0.0

    @property
    def legacy_files_dir(self) -> Path:
        """Where versions before the files bucket kept file bytes (`jetbatch migrate` empties it)."""
        return self.data_dir / "files"

    @property
    def models_dir(self) -> Path:
        return self.models_cache_dir or self.data_dir / "models"

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)


def load(env: dict[str, str] | None = None) -> Settings:
    """The settings from `env` (default: the process environment); an empty variable is unset."""
    return settings_env.load(Settings, dict(os.environ if env is None else env))


def variable(field: str) -> str:
    """The variable of a field of Settings: `"nats_url"` -> `JETBATCH_NATS_URL`,
    `"webhooks.secret"` -> `JETBATCH_WEBHOOK_SECRET`."""
    names = {".".join(v.path): v.name for v in settings_env.variables(Settings)}
    if field not in names:
        raise KeyError(f"Settings has no field {field!r}")
    return names[field]


def require(settings: Settings, service: str, *fields: str) -> None:
    """Fail, naming every missing variable, unless each of `fields` ("nats_url",
    "webhooks.secret") is set. A service calls it first, with the settings it cannot run without."""
    missing = []
    for field in fields:
        value: object = settings
        for name in field.split("."):
            value = getattr(value, name)
        if value is None or value == "":
            missing.append(variable(field))
    if missing:
        raise ConfigError(f"{service} needs {', '.join(missing)}")


def markdown_table() -> str:
    """README's table of every variable (README: Configuration)."""
    return settings_env.markdown_table(Settings)


def main(argv: list[str]) -> int:
    """`python -m shared.config` prints the table; with a file (README.md), rewrites the table in
    it between its `<!-- config-table:start -->` and `<!-- config-table:end -->` markers."""
    if not argv:
        print(markdown_table(), end="")
        return 0
    path = Path(argv[0])
    document = path.read_text()
    updated = settings_env.with_table(document, markdown_table())
    if updated != document:
        path.write_text(updated)
        print(f"{path}: configuration table rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
