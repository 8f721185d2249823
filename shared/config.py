"""Settings: one frozen Struct per concern, read once from the environment (README: Configuration).

A field says everything about its setting: its type and Meta what it accepts and what it means,
its default the default, its name the variable (`JETBATCH_` + the Struct's prefix + the name
upper-case; `shared/settings_env.py`). Loading fails before any connection opens, with one
ConfigError naming every bad variable. `python -m shared.config` prints the README's table.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import msgspec
from msgspec import Meta

from shared import settings_env
from shared.config_sections import (
    DispatchSettings,
    HealthSettings,
    LimitSettings,
    WebhookSettings,
)
from shared.observability_config import ObservabilitySettings
from shared.settings_env import ConfigError, Parse
from shared.usage_config import UsageSettings

DEFAULT_CHAT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_EMBED_MODEL = "all-MiniLM-L6-v2"
CHAT_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
EMBED_ENDPOINTS = ("/v1/embeddings",)


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


def _log_level(name: str, value: str) -> str:
    if value.strip().upper() not in logging.getLevelNamesMapping():
        raise ValueError(value)
    return value.strip().upper()


MODELS = Parse(
    lambda _, text: parse_models(text),
    "NAME[=PATH][@generate|@embed], comma-separated",
    show=_models_text,
)
LOG_LEVEL = Parse(_log_level, "a log level: DEBUG, INFO, WARNING, ERROR or CRITICAL")


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
            " work (the results writer, the watchdog, the webhook notifier, the api's validation"
            " and publishing children, each in a session of its own), and of their session"
            " autogroups where the kernel groups by session, so on a busy machine they yield the"
            " CPU to synchronous requests and the engine; `0` = off",
        ),
    ] = 10
    webhooks: WebhookSettings = msgspec.field(default_factory=WebhookSettings)
    limits: LimitSettings = msgspec.field(default_factory=LimitSettings)
    health: HealthSettings = msgspec.field(default_factory=HealthSettings)
    dispatch: DispatchSettings = msgspec.field(default_factory=DispatchSettings)
    observability: ObservabilitySettings = msgspec.field(default_factory=ObservabilitySettings)
    usage: UsageSettings = msgspec.field(default_factory=UsageSettings)
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
