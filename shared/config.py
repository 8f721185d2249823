"""Settings, one frozen Struct per concern, loaded once from the environment (README: Configuration).

Loading fails before any connection opens: a bad value is a clear ConfigError naming the variable.
"""

from __future__ import annotations

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
    request_ack_wait_s: int = 600
    request_max_deliver: int = 5
    heartbeat_interval_s: float = 5.0
    sync_timeout_s: float = 600.0

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
        request_ack_wait_s=_int(env, "JETBATCH_REQUEST_ACK_WAIT_S", 600, minimum=1),
        request_max_deliver=_int(env, "JETBATCH_REQUEST_MAX_DELIVER", 5, minimum=1),
        heartbeat_interval_s=_float(env, "JETBATCH_HEARTBEAT_INTERVAL_S", 5.0),
        sync_timeout_s=_float(env, "JETBATCH_SYNC_TIMEOUT_S", 600.0),
    )
