from pathlib import Path

import pytest

from shared import config


def test_defaults_serve_the_two_offline_models() -> None:
    s = config.load({})
    assert [m.name for m in s.models] == ["SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"]
    assert s.model("all-MiniLM-L6-v2").endpoints == ("/v1/embeddings",)
    assert s.model("SmolLM2-135M-Instruct").endpoints == ("/v1/chat/completions", "/v1/completions")
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
