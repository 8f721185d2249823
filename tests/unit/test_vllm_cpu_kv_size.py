"""On the CPU, a models file's `kv_cache_memory_bytes` sizes the KV cache: jetbatch's default
VLLM_CPU_KVCACHE_SPACE, which vLLM's CPU platform lets override that engine argument, is left
out then (bench/prefixes.py found 128 MiB asked for and 1 GiB given)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.inference import vllm_engine
from services.inference.vllm_engine import VllmEngine, cpu_env_defaults
from shared.config import ConfigError, load
from tests.unit.test_engine_args import _tiny_model

KV_SPACE = "VLLM_CPU_KVCACHE_SPACE"


def test_a_kv_cache_size_in_the_engine_settings_leaves_out_only_the_kv_space_default() -> None:
    env = cpu_env_defaults({"kv_cache_memory_bytes": 128 * 2**20, "max_num_seqs": 64})
    expected = dict(vllm_engine._CPU_ENV_DEFAULTS)
    del expected[KV_SPACE]
    assert env == expected


def test_without_a_kv_cache_size_every_cpu_default_applies() -> None:
    assert cpu_env_defaults({"max_num_seqs": 64}) == vllm_engine._CPU_ENV_DEFAULTS
    assert cpu_env_defaults({"kv_cache_memory_bytes": None}) == vllm_engine._CPU_ENV_DEFAULTS


async def test_the_engine_sets_no_kv_space_when_its_models_file_sizes_the_kv_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A context longer than the model's: vLLM refuses it after start() has set the environment,
    # before any engine process starts.
    table = "kv_cache_memory_bytes = 134217728\nmax_model_len = 4096\n"
    (tmp_path / "models.toml").write_text(f'[models."tiny"]\n{table}')
    model = _tiny_model(tmp_path / "tiny")
    settings = load(
        {"JETBATCH_MODELS": f"tiny={model}", "JETBATCH_MODELS_FILE": f"{tmp_path}/models.toml"}
    )
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *vllm_engine._CPU_ENV_DEFAULTS):
        monkeypatch.delenv(key, raising=False)  # start() sets them; restored after the test
    with pytest.raises(ConfigError, match="max_model_len"):
        await VllmEngine(settings, settings.models[0]).start()
    assert KV_SPACE not in os.environ
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
