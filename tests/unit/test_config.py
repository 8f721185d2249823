import base64
from pathlib import Path
from typing import Annotated, ClassVar

import msgspec
import pytest
from msgspec import Meta

from shared import config, settings_env
from shared.usage_config import ModelPrice


def test_defaults_serve_the_two_offline_models() -> None:
    s = config.load({})
    assert [m.name for m in s.models] == ["SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"]
    chat, embed = s.model("SmolLM2-135M-Instruct"), s.model("all-MiniLM-L6-v2")
    assert chat is not None and embed is not None
    assert embed.endpoints == ("/v1/embeddings",)
    assert chat.endpoints == ("/v1/chat/completions", "/v1/completions")
    assert (s.api_host, s.api_port, s.engine) == ("127.0.0.1", 8000, "vllm")
    assert s.data_dir == Path(".jetbatch").resolve()
    assert s.models_dir == s.data_dir / "models"


def test_models_accept_paths_and_tasks() -> None:
    specs = config.parse_models("SmolLM2-135M-Instruct, qwen=/m/qwen@generate, e5=/m/e5@embed")
    assert [(m.name, m.path, m.task) for m in specs] == [
        ("SmolLM2-135M-Instruct", "", "generate"),
        ("qwen", "/m/qwen", "generate"),
        ("e5", "/m/e5", "embed"),
    ]


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"JETBATCH_API_PORT": "eighty"}, "JETBATCH_API_PORT"),
        ({"JETBATCH_API_PORT": "0"}, "JETBATCH_API_PORT"),
        ({"JETBATCH_ENGINE": "magic"}, "JETBATCH_ENGINE"),
        ({"JETBATCH_MODELS": "mine"}, "needs a path"),
        ({"JETBATCH_MODELS": "a=/x,a=/y"}, "twice"),
        ({"JETBATCH_MODELS": "a=/x@train"}, "generate or embed"),
        ({"JETBATCH_BATCH_NICE": "-5"}, "JETBATCH_BATCH_NICE"),
    ],
)
def test_bad_settings_fail_before_anything_starts(env: dict[str, str], needle: str) -> None:
    with pytest.raises(config.ConfigError, match=needle):
        config.load(env)


def test_limits_and_health_have_the_documented_defaults_and_can_be_set() -> None:
    s = config.load({})
    assert (s.limits.completion_window_s, s.limits.max_active_batches) == (86_400, 10)
    assert s.limits.max_queued_requests == 500_000 and s.max_batch_lines == 50_000
    assert (s.health.worker_stale_s, s.health.batch_stall_s) == (60, 1800)
    assert not s.health.require_healthy_worker
    assert s.batch_nice == 10 and config.load({"JETBATCH_BATCH_NICE": "0"}).batch_nice == 0
    s = config.load(
        {
            "JETBATCH_COMPLETION_WINDOW_S": "5",
            "JETBATCH_REQUIRE_HEALTHY_WORKER": "yes",
            "JETBATCH_GPU_MAX_TEMPERATURE_C": "0",
        }
    )
    assert s.limits.completion_window_s == 5 and s.health.require_healthy_worker
    assert s.health.gpu_max_temperature_c == 0


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"JETBATCH_COMPLETION_WINDOW_S": "0"}, "JETBATCH_COMPLETION_WINDOW_S"),
        ({"JETBATCH_MAX_ACTIVE_BATCHES": "many"}, "JETBATCH_MAX_ACTIVE_BATCHES"),
        ({"JETBATCH_REQUIRE_HEALTHY_WORKER": "perhaps"}, "true or false"),
        ({"JETBATCH_WORKER_STALE_S": "-1"}, "JETBATCH_WORKER_STALE_S"),
        ({"JETBATCH_CLOSE_GRACE_S": "-1"}, "JETBATCH_CLOSE_GRACE_S"),
    ],
)
def test_bad_lifecycle_settings_fail_before_anything_starts(
    env: dict[str, str], needle: str
) -> None:
    with pytest.raises(config.ConfigError, match=needle):
        config.load(env)


SECRET = "whsec_" + base64.b64encode(b"k" * 24).decode()

# Every variable jetbatch read before its settings were built from their types, with a value
# other than its default and what the field must then hold: a deployment's environment keeps
# meaning what it meant.
VARIABLES: dict[str, tuple[str, str, object]] = {
    "JETBATCH_DATA_DIR": ("data_dir", "/srv/jb", Path("/srv/jb")),
    "JETBATCH_SCRATCH_DIR": ("scratch_dir", "/var/tmp/jb", Path("/var/tmp/jb")),
    "JETBATCH_MODELS_DIR": ("models_cache_dir", "/srv/models", Path("/srv/models")),
    "JETBATCH_API_HOST": ("api_host", "0.0.0.0", "0.0.0.0"),
    "JETBATCH_API_PORT": ("api_port", "9000", 9000),
    "JETBATCH_API_KEY": ("api_key", "k", "k"),
    "JETBATCH_NATS_URL": ("nats_url", "nats://n:4222", "nats://n:4222"),
    "JETBATCH_NATS_REPLICAS": ("nats_replicas", "3", 3),
    "JETBATCH_DATABASE_URL": ("database_url", "postgresql://db/jb", "postgresql://db/jb"),
    "JETBATCH_ENGINE": ("engine", "instant", "instant"),
    "JETBATCH_MODELS": (
        "models",
        "e5=/m/e5@embed",
        (config.ModelSpec(name="e5", path="/m/e5", task="embed"),),
    ),
    "JETBATCH_MODELS_FILE": ("models_file", "/etc/jb/models.toml", Path("/etc/jb/models.toml")),
    "JETBATCH_MAX_FILE_BYTES": ("max_file_bytes", "1000", 1000),
    "JETBATCH_MAX_BATCH_LINES": ("max_batch_lines", "7", 7),
    "JETBATCH_LOG_LEVEL": ("log_level", "debug", "DEBUG"),
    "JETBATCH_TRACE_LINE_RATIO": ("observability.trace_line_ratio", "0.5", 0.5),
    "JETBATCH_LOG_FORMAT": ("observability.log_format", "json", "json"),
    "JETBATCH_LOG_FILE": ("observability.log_file", "/var/log/jb/a.log", Path("/var/log/jb/a.log")),
    "JETBATCH_LOG_FILE_MAX_BYTES": ("observability.log_file_max_bytes", "4096", 4096),
    "JETBATCH_LOG_FILE_BACKUPS": ("observability.log_file_backups", "2", 2),
    "JETBATCH_METRICS_PORT": ("observability.metrics_port", "9400", 9400),
    "JETBATCH_METRICS_HOST": ("observability.metrics_host", "0.0.0.0", "0.0.0.0"),
    "JETBATCH_METRICS_WORKER": ("observability.metrics_worker", "3", 3),
    "JETBATCH_MAX_IN_FLIGHT": ("max_in_flight", "32", 32),
    "JETBATCH_REQUEST_ACK_WAIT_S": ("request_ack_wait_s", "30", 30),
    "JETBATCH_REQUEST_MAX_DELIVER": ("request_max_deliver", "3", 3),
    "JETBATCH_HEARTBEAT_INTERVAL_S": ("heartbeat_interval_s", "0.2", 0.2),
    "JETBATCH_SYNC_TIMEOUT_S": ("sync_timeout_s", "0.3", 0.3),
    "JETBATCH_BATCH_NICE": ("batch_nice", "0", 0),
    "JETBATCH_INSTANT_DELAY_S": ("instant_delay_s", "1.5", 1.5),
    "JETBATCH_PRICES": (
        "usage.prices",
        "m=0.5/1.5,m=2/h",
        (ModelPrice(model="m", input_per_million=0.5, output_per_million=1.5, per_gpu_hour=2.0),),
    ),
    "JETBATCH_PRICES_CURRENCY": ("usage.currency", "eur", "eur"),
    "JETBATCH_WEBHOOK_SECRET": ("webhooks.secret", SECRET, SECRET),
    "JETBATCH_WEBHOOK_MAX_ATTEMPTS": ("webhooks.max_attempts", "7", 7),
    "JETBATCH_WEBHOOK_MAX_AGE_S": ("webhooks.max_age_s", "3600", 3600),
    "JETBATCH_WEBHOOK_BACKOFF_BASE_S": ("webhooks.backoff_base_s", "0.5", 0.5),
    "JETBATCH_WEBHOOK_BACKOFF_MAX_S": ("webhooks.backoff_max_s", "60", 60),
    "JETBATCH_WEBHOOK_TIMEOUT_S": ("webhooks.timeout_s", "2.5", 2.5),
    "JETBATCH_WEBHOOK_CONCURRENCY": ("webhooks.concurrency", "8", 8),
    "JETBATCH_WEBHOOK_CONCURRENCY_PER_HOST": ("webhooks.concurrency_per_host", "2", 2),
    "JETBATCH_WEBHOOK_ALLOWED_NETWORKS": (
        "webhooks.allowed_networks",
        "10.0.0.0/8, ::1",
        ("10.0.0.0/8", "::1/128"),
    ),
    "JETBATCH_COMPLETION_WINDOW_S": ("limits.completion_window_s", "5", 5),
    "JETBATCH_MAX_ACTIVE_BATCHES": ("limits.max_active_batches", "2", 2),
    "JETBATCH_MAX_QUEUED_REQUESTS": ("limits.max_queued_requests", "100", 100),
    "JETBATCH_MAX_SYNC_REQUESTS": ("limits.max_sync_requests", "8", 8),
    "JETBATCH_MAX_SYNC_REQUESTS_PER_KEY": ("limits.max_sync_requests_per_key", "2", 2),
    "JETBATCH_WORKER_STALE_S": ("health.worker_stale_s", "2", 2),
    "JETBATCH_BATCH_STALL_S": ("health.batch_stall_s", "3", 3),
    "JETBATCH_WATCHDOG_INTERVAL_S": ("health.watchdog_interval_s", "0.1", 0.1),
    "JETBATCH_REDRIVE_AFTER_S": ("health.redrive_after_s", "4", 4),
    "JETBATCH_VALIDATION_TIMEOUT_S": ("health.validation_timeout_s", "30", 30),
    "JETBATCH_CLOSE_GRACE_S": ("health.close_grace_s", "0", 0),
    "JETBATCH_DISPATCH_AHEAD_S": ("dispatch.ahead_s", "2.5", 2.5),
    "JETBATCH_DISPATCH_MIN_WINDOW": ("dispatch.min_window", "64", 64),
    "JETBATCH_REQUIRE_HEALTHY_WORKER": ("health.require_healthy_worker", "on", True),
    "JETBATCH_GPU_MAX_MEMORY_PCT": ("health.gpu_max_memory_pct", "0", 0),
    "JETBATCH_GPU_MAX_TEMPERATURE_C": ("health.gpu_max_temperature_c", "85", 85),
    "JETBATCH_DRAIN_TIMEOUT_S": ("health.drain_timeout_s", "1", 1),
}

# What load({}) gave before the settings were built from their types.
OLD_DEFAULTS: dict[str, object] = {
    "data_dir": Path(".jetbatch").resolve(),
    "models_cache_dir": None,
    "api_host": "127.0.0.1",
    "api_port": 8000,
    "api_key": None,
    "nats_url": None,
    "database_url": None,
    "engine": "vllm",
    "models": config.parse_models("SmolLM2-135M-Instruct,all-MiniLM-L6-v2"),
    "max_file_bytes": 200 * 1024 * 1024,
    "max_batch_lines": 50_000,
    "log_level": "INFO",
    "max_in_flight": 0,
    "request_ack_wait_s": 60,
    "request_max_deliver": 5,
    "heartbeat_interval_s": 5.0,
    "sync_timeout_s": 600.0,
    "batch_nice": 10,
    "instant_delay_s": 0.0,
    "webhooks.secret": None,
    "webhooks.max_attempts": 15,
    "webhooks.max_age_s": 72 * 3600,
    "webhooks.backoff_base_s": 10.0,
    "webhooks.backoff_max_s": 6 * 3600,
    "webhooks.timeout_s": 10.0,
    "webhooks.concurrency": 64,
    "webhooks.concurrency_per_host": 4,
    "webhooks.allowed_networks": (),
    "limits.completion_window_s": 86_400,
    "limits.max_active_batches": 10,
    "limits.max_queued_requests": 500_000,
    "health.worker_stale_s": 60.0,
    "health.batch_stall_s": 1800.0,
    "health.watchdog_interval_s": 5.0,
    "health.redrive_after_s": 60.0,
    "health.close_grace_s": 10.0,
    "health.require_healthy_worker": False,
    "health.gpu_max_memory_pct": 98.0,
    "health.gpu_max_temperature_c": 88.0,
    "health.drain_timeout_s": 30.0,
}


def value_of(settings: config.Settings, field: str) -> object:
    value: object = settings
    for name in field.split("."):
        value = getattr(value, name)
    return value


def test_defaults_are_the_ones_load_gave_before() -> None:
    s = config.load({})
    assert {field: value_of(s, field) for field in OLD_DEFAULTS} == OLD_DEFAULTS
    assert s == config.load({name: "" for name in VARIABLES})  # an empty variable is unset


def test_every_variable_is_still_read_into_its_field() -> None:
    assert sorted(v.name for v in settings_env.variables(config.Settings)) == sorted(VARIABLES)
    for name, (field, text, expected) in VARIABLES.items():
        assert value_of(config.load({name: text}), field) == expected, name
        assert config.variable(field) == name


def test_every_bad_setting_is_reported_in_one_error() -> None:
    with pytest.raises(config.ConfigError) as raised:
        config.load(
            {
                "JETBATCH_API_PORT": "abc",
                "JETBATCH_ENGINE": "magic",
                "JETBATCH_MODELS": "mine",
                "JETBATCH_WEBHOOK_TIMEOUT_S": "-1",
                "JETBATCH_WEBHOOK_CONCURRENCY": "2",  # below the per-host default, 4
                "JETBATCH_REQUIRE_HEALTHY_WORKER": "perhaps",
                "JETBATCH_INSTANT_DELAY_S": "soon",
            }
        )
    lines = str(raised.value).splitlines()
    assert lines[0] == "7 bad settings:"
    assert sorted(line.strip() for line in lines[1:]) == [
        "JETBATCH_API_PORT: expected an integer >= 1, got 'abc'",
        "JETBATCH_ENGINE: expected vllm or instant, got 'magic'",
        "JETBATCH_INSTANT_DELAY_S: expected a number >= 0, got 'soon'",
        "JETBATCH_MODELS: 'mine' needs a path: NAME=PATH",
        "JETBATCH_REQUIRE_HEALTHY_WORKER: expected true or false (also 1/0, yes/no, on/off),"
        " got 'perhaps'",
        "JETBATCH_WEBHOOK_CONCURRENCY_PER_HOST: expected at most JETBATCH_WEBHOOK_CONCURRENCY"
        " (2), got 4",
        "JETBATCH_WEBHOOK_TIMEOUT_S: expected a number > 0, got '-1'",
    ]


def test_per_host_concurrency_is_checked_against_concurrency_once_both_are_valid() -> None:
    with pytest.raises(config.ConfigError) as raised:
        config.load({"JETBATCH_WEBHOOK_CONCURRENCY": "2"})
    assert str(raised.value) == (
        "JETBATCH_WEBHOOK_CONCURRENCY_PER_HOST: expected at most JETBATCH_WEBHOOK_CONCURRENCY (2),"
        " got 4"
    )


class Telemetry(msgspec.Struct, frozen=True, kw_only=True):
    env_prefix: ClassVar[str] = "JETBATCH_TRACE_"

    service_name: Annotated[str, Meta(extra={"env": "OTEL_SERVICE_NAME"})] = "jetbatch"
    sample_ratio: Annotated[float, Meta(ge=0, le=1)] = 1.0


def test_a_field_can_name_its_own_variable() -> None:
    s = settings_env.load(
        Telemetry, {"OTEL_SERVICE_NAME": "api", "JETBATCH_TRACE_SERVICE_NAME": "ignored"}
    )
    assert s == Telemetry(service_name="api")
    with pytest.raises(config.ConfigError, match="JETBATCH_TRACE_SAMPLE_RATIO: expected a number"):
        settings_env.load(Telemetry, {"JETBATCH_TRACE_SAMPLE_RATIO": "2"})
    models = config.load({"JETBATCH_MODELS_DIR": "/m", "JETBATCH_MODELS_CACHE_DIR": "/ignored"})
    assert models.models_dir == Path("/m")


def test_require_names_every_missing_variable_at_once() -> None:
    s = config.load({"JETBATCH_API_KEY": "k"})
    with pytest.raises(config.ConfigError) as raised:
        config.require(s, "results_writer", "database_url", "api_key", "nats_url")
    assert str(raised.value) == "results_writer needs JETBATCH_DATABASE_URL, JETBATCH_NATS_URL"
    with pytest.raises(
        config.ConfigError, match="^webhook_notifier needs JETBATCH_WEBHOOK_SECRET$"
    ):
        config.require(s, "webhook_notifier", "webhooks.secret")
    config.require(config.load({"JETBATCH_NATS_URL": "nats://n"}), "inference", "nats_url")


def test_readme_configuration_table_is_generated_from_the_settings() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert settings_env.with_table(readme, config.markdown_table()) == readme, "run `just docs`"


def test_docs_rewrite_only_the_table_between_the_markers(tmp_path: Path) -> None:
    doc = tmp_path / "README.md"
    doc.write_text(f"intro\n{settings_env.START}\n| old |\n{settings_env.END}\nafter\n")
    assert config.main([str(doc)]) == 0
    assert doc.read_text() == (
        f"intro\n{settings_env.START}\n{config.markdown_table()}{settings_env.END}\nafter\n"
    )
