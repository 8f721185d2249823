"""Engine settings per model: jetbatch's defaults for the device, the models file checked with
vLLM's own types, `--gpu` to tensor parallelism, and admission sized from the KV cache.

No GPU here: the GPU path is the argument building with the device given (`on_cpu=False`), parsed
by vLLM's own `vllm serve` parser into vLLM's own AsyncEngineArgs."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest

from schemas.messages import WorkerHeartbeat
from services.inference import engine_args, vllm_engine
from services.inference.gpu import GpuMonitor
from services.inference.instant_engine import InstantEngine
from services.inference.service import Worker
from services.inference.vllm_engine import (
    TYPICAL_LINE_TOKENS,
    EngineSizing,
    VllmEngine,
    admission_capacity,
)
from shared.config import DEFAULT_CHAT_MODEL, DEFAULT_EMBED_MODEL, ConfigError, ModelSpec, load

REPO = Path(__file__).resolve().parents[2]
CHAT = f'[models."{DEFAULT_CHAT_MODEL}"]\n'


def settings_with(tmp_path: Path, toml: str, **env: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "models.toml"
    path.write_text(toml)
    return load(
        {
            "JETBATCH_DATA_DIR": str(tmp_path),
            "JETBATCH_MODELS": f"{DEFAULT_CHAT_MODEL},{DEFAULT_EMBED_MODEL},big={tmp_path}",
            "JETBATCH_MODELS_FILE": str(path),
            **env,
        }
    )


def table(tmp_path: Path, toml: str, model: str = DEFAULT_CHAT_MODEL) -> dict:
    settings = settings_with(tmp_path, toml)
    spec = settings.model(model)
    assert spec is not None
    return engine_args.from_models_file(settings, spec)


# -- the models file ----------------------------------------------------------------------------


def test_models_file_gives_each_model_its_own_engine_settings(tmp_path: Path) -> None:
    toml = (
        f"{CHAT}max_model_len = 4096\ngpu_memory_utilization = 0.85\n"
        '[models."big"]\ntensor_parallel_size = 2\ndtype = "bfloat16"\nquantization = "fp8"\n'
        "max_num_seqs = 128\nenforce_eager = true\n"
    )
    assert table(tmp_path, toml) == {"max_model_len": 4096, "gpu_memory_utilization": 0.85}
    assert table(tmp_path, toml, "big") == {
        "tensor_parallel_size": 2,
        "dtype": "bfloat16",
        "quantization": "fp8",
        "max_num_seqs": 128,
        "enforce_eager": True,
    }
    assert table(tmp_path, toml, DEFAULT_EMBED_MODEL) == {}


def test_without_a_models_file_there_is_nothing_to_add(tmp_path: Path) -> None:
    settings = load({"JETBATCH_DATA_DIR": str(tmp_path)})
    assert settings.models_file is None
    spec = settings.model(DEFAULT_CHAT_MODEL)
    assert spec is not None
    assert engine_args.from_models_file(settings, spec) == {}


def test_unknown_key_stops_the_worker_naming_file_model_and_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        table(tmp_path, f"{CHAT}max_num_seq = 32\n")
    message = str(e.value)
    assert str(tmp_path / "models.toml") in message
    assert f'[models."{DEFAULT_CHAT_MODEL}"]' in message
    assert "max_num_seq is not one of vLLM's engine arguments (did you mean max_num_seqs?)" in (
        message
    )


def test_a_mistake_in_another_models_table_stops_this_worker_too(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r'\[models."big"\]: gpu_memory_util '):
        table(tmp_path, f'{CHAT}max_num_seqs = 8\n[models."big"]\ngpu_memory_util = 0.5\n')


@pytest.mark.parametrize(
    "setting, vllm_says",
    [
        # vLLM's own constraints (CacheConfig, ParallelConfig, SchedulerConfig, ModelConfig).
        ("gpu_memory_utilization = 1.5", "Input should be less than or equal to 1"),
        ("tensor_parallel_size = 0", "Input should be greater than or equal to 1"),
        ("max_num_seqs = 0", "Input should be greater than or equal to 1"),
        ('dtype = "float8"', "Input should be 'auto', 'half', 'float16', 'bfloat16'"),
        ('max_model_len = "long"', "Input should be a valid integer"),
        ('enforce_eager = "maybe"', "Input should be a valid boolean"),
        ('quantization = "zip"', "Unknown quantization method; vLLM knows awq"),
        # A nested config, checked by vLLM's AsyncEngineArgs building its CompilationConfig.
        ("compilation_config = { no_such_option = 1 }", "no_such_option: Unexpected keyword"),
    ],
)
def test_bad_value_stops_the_worker_with_vllms_message(
    tmp_path: Path, setting: str, vllm_says: str
) -> None:
    key = setting.split(" =")[0]
    with pytest.raises(ConfigError) as e:
        table(tmp_path, f"{CHAT}{setting}\n")
    assert f'[models."{DEFAULT_CHAT_MODEL}"]: {key} = ' in str(e.value)
    assert vllm_says in str(e.value)


@pytest.mark.parametrize("key", ["model", "served_model_name", "runner", "scheduling_policy"])
def test_settings_jetbatch_gives_vllm_itself_are_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError, match=f"{key} is set by jetbatch"):
        table(tmp_path, f'{CHAT}{key} = "x"\n')


@pytest.mark.parametrize(
    "toml, says",
    [
        ('[models."SmolLM2"]\nmax_num_seqs = 8\n', "JETBATCH_MODELS serves no model 'SmolLM2'"),
        ("max_num_seqs = 8\n", "unknown top-level key(s) max_num_seqs; engine settings go in"),
        (f"{CHAT}max_num_seqs = \n", "not valid TOML"),
        (f'models."{DEFAULT_CHAT_MODEL}" = 3\n', "must be a table of engine settings"),
    ],
)
def test_a_models_file_of_the_wrong_shape_is_refused(tmp_path: Path, toml: str, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        table(tmp_path, toml)
    assert says in str(e.value)


def test_a_missing_models_file_is_refused_naming_the_variable(tmp_path: Path) -> None:
    settings = load({"JETBATCH_MODELS_FILE": str(tmp_path / "nowhere.toml")})
    spec = settings.model(DEFAULT_CHAT_MODEL)
    assert spec is not None
    with pytest.raises(ConfigError, match="JETBATCH_MODELS_FILE .*nowhere.toml: cannot read it"):
        engine_args.from_models_file(settings, spec)


def test_a_bad_models_file_stops_the_worker_with_exit_2_before_it_connects(
    tmp_path: Path,
) -> None:
    (tmp_path / "models.toml").write_text(f"{CHAT}gpu_memory_utilization = 2\n")
    env = {
        **os.environ,
        "JETBATCH_DATA_DIR": str(tmp_path),
        "JETBATCH_MODELS_FILE": str(tmp_path / "models.toml"),
        "JETBATCH_NATS_URL": "nats://127.0.0.1:1",  # never reached
        "JETBATCH_ENGINE": "vllm",
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.inference", "--model", DEFAULT_CHAT_MODEL],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "gpu_memory_utilization = 2: Input should be less than or equal to 1" in done.stderr


# -- defaults for the device ---------------------------------------------------------------------


def spec(task: str = "generate", name: str = DEFAULT_CHAT_MODEL, path: str = "") -> ModelSpec:
    return ModelSpec(name=name, path=path, task=task)  # type: ignore[arg-type]


def test_on_the_cpu_the_engine_runs_eager_with_todays_settings() -> None:
    assert engine_args.defaults(spec(), on_gpu=False, gpus=0, native_half=True) == {
        "enforce_eager": True,
        "max_num_seqs": 64,
        "max_model_len": 2048,
    }
    # Embedding models run in fp32 on any CPU (their default fp16 is emulated even with bf16).
    for native_half in (False, True):
        assert engine_args.defaults(
            spec("embed", DEFAULT_EMBED_MODEL), on_gpu=False, gpus=0, native_half=native_half
        ) == {"enforce_eager": True, "max_num_seqs": 256, "dtype": "float32"}


def test_on_a_gpu_cuda_graphs_stay_on_and_the_rest_is_vllms() -> None:
    assert engine_args.defaults(spec(), on_gpu=True, gpus=0, native_half=False) == {}
    assert engine_args.defaults(spec(), on_gpu=True, gpus=1, native_half=False) == {
        "tensor_parallel_size": 1
    }


def _engine_args(tmp_path: Path, toml: str, *, on_cpu: bool):  # type: ignore[no-untyped-def]
    """What vLLM would build its engine from: VllmEngine's command line for the device, parsed by
    vLLM's own parser, into vLLM's own AsyncEngineArgs (as build_async_engine_client does)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    settings = settings_with(tmp_path, toml)
    model = settings.model("big")
    assert model is not None
    engine = VllmEngine(settings, model)
    return AsyncEngineArgs.from_cli_args(engine._serve_args(on_cpu=on_cpu)), engine


def test_gpu_engine_arguments_reach_vllm_with_cuda_graphs_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine_args.claim_gpus((0, 1), os.environ)  # what `jetbatch inference --gpu 0,1` does
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ["CUDA_VISIBLE_DEVICES"])  # undone after
    args, engine = _engine_args(tmp_path, '[models."big"]\nmax_model_len = 8192\n', on_cpu=False)
    assert args.enforce_eager is False
    assert args.tensor_parallel_size == 2
    assert args.max_model_len == 8192
    assert args.max_num_seqs is None  # vLLM's own default for the device
    assert args.scheduling_policy == "priority"
    assert args.served_model_name == ["big"]
    assert engine.engine_settings == {"tensor_parallel_size": 2, "max_model_len": 8192}


def test_the_models_file_wins_over_the_gpu_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    toml = (
        '[models."big"]\nenforce_eager = true\ntensor_parallel_size = 2\n'
        'pipeline_parallel_size = 2\ngpu_memory_utilization = 0.7\ndtype = "float16"\n'
    )
    args, _ = _engine_args(tmp_path, toml, on_cpu=False)
    assert (args.enforce_eager, args.tensor_parallel_size, args.pipeline_parallel_size) == (
        True,
        2,
        2,
    )
    assert (args.gpu_memory_utilization, args.dtype) == (0.7, "float16")


def test_cpu_engine_arguments_reach_vllm_eager(tmp_path: Path) -> None:
    args, _ = _engine_args(tmp_path, '[models."big"]\nmax_num_seqs = 16\n', on_cpu=True)
    assert args.enforce_eager is True
    assert args.max_num_seqs == 16


def test_gpu_option_gives_the_worker_its_gpus() -> None:
    assert engine_args.gpu_list("0") == (0,)
    assert engine_args.gpu_list("2,3") == (2, 3)
    for bad in ("x", "0,0", "-1", "0,"):
        with pytest.raises(argparse.ArgumentTypeError):
            engine_args.gpu_list(bad)
    environ: dict[str, str] = {}
    engine_args.claim_gpus((2, 3), environ)
    assert environ == {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert engine_args.visible_gpus(environ) == 2
    assert engine_args.visible_gpus({}) == 0
    assert engine_args.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == 0
    engine_args.claim_gpus((), environ)  # no --gpu: the environment stays as it is
    assert environ == {"CUDA_VISIBLE_DEVICES": "2,3"}


def test_a_bad_gpu_option_exits_2() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "services.inference", "--model", "m", "--gpu", "0,zero"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "expected GPU indices, e.g. 0 or 0,1" in done.stderr


# -- admission from the KV cache -----------------------------------------------------------------


def test_capacity_is_a_quarter_more_than_the_engine_runs() -> None:
    assert admission_capacity(64) == 80
    assert admission_capacity(8) == 12


def test_a_kv_cache_that_holds_fewer_lines_than_max_num_seqs_bounds_capacity() -> None:
    # The default chat model on the CPU: the cache holds 182 lines, more than 64 sequences.
    assert admission_capacity(64, 46_592, 2048) == 80
    # A big model on a small GPU: 8,192 KV tokens hold 32 typical lines, not 256.
    assert admission_capacity(256, 8192, 32_768) == 32 + 8
    assert 8192 // TYPICAL_LINE_TOKENS == 32
    # A context shorter than a typical line: a line holds at most the whole context.
    assert admission_capacity(256, 1280, 128) == 10 + 4
    # A cache too small for one line still runs one.
    assert admission_capacity(256, 100, 4096) == 1 + 4


def test_sizing_is_read_from_what_vllm_allocated() -> None:
    def vllm_config(tokens: int | None) -> SimpleNamespace:
        return SimpleNamespace(
            cache_config=SimpleNamespace(
                num_gpu_blocks=364, block_size=128, kv_cache_size_tokens=tokens
            ),
            scheduler_config=SimpleNamespace(max_num_seqs=64),
            model_config=SimpleNamespace(max_model_len=2048),
        )

    assert EngineSizing.of(vllm_config(40_000)) == EngineSizing(
        max_num_seqs=64, max_model_len=2048, kv_cache_blocks=364, kv_cache_tokens=40_000
    )
    # Without vLLM's group-aware count: blocks times their size.
    assert EngineSizing.of(vllm_config(None)).kv_cache_tokens == 364 * 128


def test_heartbeat_reports_capacity_and_the_kv_cache_it_came_from() -> None:
    settings = load({"JETBATCH_ENGINE": "instant"})
    chat = settings.model(DEFAULT_CHAT_MODEL)
    assert chat is not None
    engine = InstantEngine(chat)
    beat = Worker(settings, chat, engine, GpuMonitor(None), "w1").heartbeat()
    assert (beat.kv_cache_blocks, beat.kv_cache_tokens, beat.max_num_seqs) == (None, None, None)

    engine.sizing = EngineSizing(  # type: ignore[attr-defined]
        max_num_seqs=64, max_model_len=2048, kv_cache_blocks=364, kv_cache_tokens=46_592
    )
    beat = Worker(settings, chat, engine, GpuMonitor(None), "w1").heartbeat()
    assert (beat.max_num_seqs, beat.max_model_len) == (64, 2048)
    assert (beat.kv_cache_blocks, beat.kv_cache_tokens) == (364, 46_592)
    assert beat.capacity == engine.capacity
    # A heartbeat from before these fields still decodes.
    old = {k: v for k, v in msgspec.to_builtins(beat).items() if not k.startswith(("kv_", "max_"))}
    assert (
        msgspec.json.decode(msgspec.json.encode(old), type=WorkerHeartbeat).kv_cache_tokens is None
    )


def _tiny_model(folder: Path) -> Path:
    """A model directory with only a config.json: enough for vLLM to build its engine config."""
    folder.mkdir()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "max_position_embeddings": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "num_hidden_layers": 1,
        "vocab_size": 1000,
    }
    (folder / "config.json").write_text(msgspec.json.encode(config).decode())
    return folder


async def test_settings_vllm_refuses_for_this_model_stop_the_start_with_its_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *vllm_engine._CPU_ENV_DEFAULTS):
        monkeypatch.delenv(key, raising=False)  # start() sets them; restored after the test
    model = _tiny_model(tmp_path / "tiny")
    path = tmp_path / "models.toml"
    path.write_text('[models."tiny"]\nmax_model_len = 4096\n')  # the model's context is 512
    settings = load({"JETBATCH_MODELS": f"tiny={model}", "JETBATCH_MODELS_FILE": str(path)})
    spec = settings.model("tiny")
    assert spec is not None
    engine = VllmEngine(settings, spec)
    with pytest.raises(ConfigError) as e:
        await engine.start()
    assert "tiny: vLLM refuses the engine settings" in str(e.value)
    assert f"(from {path})" in str(e.value)
    assert "User-specified max_model_len (4096) is greater than the derived max_model_len" in str(
        e.value
    )
