"""The vLLM engine arguments of one served model: jetbatch's defaults for the device it runs on,
then the operator's models file (JETBATCH_MODELS_FILE), whose values win.

The models file is TOML, one table per served model, its keys vLLM's own engine-argument fields
(`vllm.engine.arg_utils.EngineArgs`, the `vllm serve` options with `_` for `-`):

    [models."SmolLM2-135M-Instruct"]
    tensor_parallel_size = 2
    max_model_len = 8192
    gpu_memory_utilization = 0.85

Each key and value is checked with vLLM's own types before the engine starts (`check_table`), and
vLLM checks them all together when it builds its engine config; either way a bad one stops the
worker with exit 2 and vLLM's message (shared.config.ConfigError). vLLM is imported inside the
functions that need it, so this module imports without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import os
import tomllib
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from shared.config import DEFAULT_CHAT_MODEL, ConfigError, ModelSpec, Settings, variable

# What jetbatch itself gives vLLM, from JETBATCH_MODELS and its own design; a models file may not.
OWNED = {
    "model": "the model's PATH in JETBATCH_MODELS",
    "served_model_name": "the model's NAME in JETBATCH_MODELS",
    "runner": "the model's task in JETBATCH_MODELS (@generate or @embed)",
    "scheduling_policy": "jetbatch runs synchronous requests ahead of batch ones (priority)",
}
# max_num_seqs on the CPU per task: 64 SmolLM2 sequences already fill the 2-core dev box
# (ARCHITECTURE.md: ~119 tok/s), and pooling is one forward pass per request, so it takes bigger
# batches. On GPUs vLLM's own defaults are kept.
CPU_MAX_NUM_SEQS = {"generate": 64, "embed": 256}
# The default chat model's context is 8k, but on the CPU nobody needs it and a smaller limit keeps
# the KV cache per sequence small.
DEFAULT_CHAT_MAX_MODEL_LEN = 2048
# vLLM's config classes that own EngineArgs' fields, in the order a field name is looked up (a
# name can recur in a later one with another meaning: SpeculativeConfig.max_model_len).
_CONFIG_CLASSES = ("ModelConfig", "CacheConfig", "ParallelConfig", "SchedulerConfig", "LoadConfig")


def defaults(spec: ModelSpec, *, on_gpu: bool, gpus: int, native_half: bool) -> dict[str, Any]:
    """jetbatch's engine arguments for `spec` on this device (beyond the four of OWNED).

    `on_gpu`: vLLM runs on an accelerator, not the CPU. `gpus`: how many GPUs this worker was
    given (`--gpu 0,1`; 0 = not said). `native_half`: the CPU computes bf16 natively."""
    if on_gpu:
        # CUDA graphs stay on (vLLM's default, enforce_eager False): they cost start-up time once
        # and speed up every decode step after it. One worker spans all the GPUs it was given.
        return {"tensor_parallel_size": gpus} if gpus > 0 else {}
    values: dict[str, Any] = {
        # No CUDA graphs or torch.compile on the CPU.
        "enforce_eager": True,
        "max_num_seqs": CPU_MAX_NUM_SEQS[spec.task],
    }
    if not native_half or spec.task == "embed":
        # vLLM would run SmolLM2 in bf16 and MiniLM in fp16, which a CPU without AVX512-BF16/AMX
        # emulates: measured 3x slower (36 vs 120 tok/s) than fp32. Embedding models default to
        # fp16, which even a CPU with native bf16 emulates: all-MiniLM-L6-v2 on the 2-core
        # AVX-512 dev machine, 2,000 lines at once through the engine, 65 lines/s in fp16 against
        # 373 in fp32.
        values["dtype"] = "float32"
    if spec.name == DEFAULT_CHAT_MODEL and not spec.path:
        values["max_model_len"] = DEFAULT_CHAT_MAX_MODEL_LEN
    return values


def apply(args: argparse.Namespace, values: Mapping[str, Any]) -> None:
    """Put engine arguments into a parsed `vllm serve` command line, where vLLM's
    AsyncEngineArgs.from_cli_args reads each field by its name."""
    for key, value in values.items():
        setattr(args, key, value)


def cli_flags(values: Mapping[str, Any]) -> list[str]:
    """Engine arguments of simple types (those of `defaults`) as `vllm serve` options."""
    argv: list[str] = []
    for key, value in values.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            argv += [f"--{flag}", str(value)]
    return argv


# -- the models file ---------------------------------------------------------------------------


def from_models_file(settings: Settings, spec: ModelSpec) -> dict[str, Any]:
    """`spec`'s table of the models file ({} without a file or a table), after checking every
    table in it: a mistake in any model's settings stops every worker, not only that model's."""
    path = settings.models_file
    if path is None:
        return {}
    tables = read_models_file(path, [m.name for m in settings.models])
    for name, table in tables.items():
        check_table(f"{path}: [models.{_quoted(name)}]", table, reference=path.parent)
    return dict(tables.get(spec.name, {}))


def read_models_file(path: Path, served: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The tables of a models file by model name, its shape checked (no vLLM needed)."""
    where = f"{variable('models_file')} {path}"
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{where}: cannot read it: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    if set(data) - {"models"}:
        unknown = ", ".join(sorted(set(data) - {"models"}))
        raise ConfigError(
            f'{where}: unknown top-level key(s) {unknown}; engine settings go in [models."NAME"]'
        )
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise ConfigError(f'{where}: models must be tables, [models."NAME"]')
    served = list(served)
    for name, table in models.items():
        if name not in served:
            raise ConfigError(
                f"{path}: [models.{_quoted(name)}]: JETBATCH_MODELS serves no model {name!r}"
                f" (served: {', '.join(served)})"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: models.{_quoted(name)} must be a table of engine settings")
    return models


def check_table(where: str, values: Mapping[str, Any], *, reference: Path) -> None:
    """Every key one of vLLM's engine arguments that jetbatch leaves to the operator, every value
    one vLLM's own types accept, and vLLM's AsyncEngineArgs built from them; the first problem
    raises ConfigError naming `where`, the key and vLLM's message. What depends on the model or
    the device (a context longer than the model's, more GPUs than there are) vLLM checks when the
    engine starts (VllmEngine.start turns that into a ConfigError too). `reference`: any existing
    path, standing in for the model while AsyncEngineArgs is built."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    fields = {f.name: f for f in dataclasses.fields(AsyncEngineArgs)}
    for key, value in values.items():
        if key in OWNED:
            raise ConfigError(f"{where}: {key} is set by jetbatch: {OWNED[key]}")
        if key not in fields:
            near = difflib.get_close_matches(key, [n for n in fields if n not in OWNED], n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"{where}: {key} is not one of vLLM's engine arguments{hint}")
        problem = _value_problem(key, value)
        if problem:
            raise ConfigError(f"{where}: {key} = {value!r}: {problem}")
    try:
        # An existing path: vLLM looks a model it cannot find up on the hub, which is offline.
        AsyncEngineArgs(model=str(reference), **values)
    except Exception as e:  # whatever __post_init__ raises (a nested config, a quantization)
        raise ConfigError(f"{where}: vLLM refuses {', '.join(values)}: {vllm_message(e)}") from None


def _value_problem(key: str, value: Any) -> str | None:
    """vLLM's objection to `value` for EngineArgs field `key`, from the type and constraints its
    config classes give that field (gpu_memory_utilization: a float > 0 and <= 1), or None."""
    from pydantic import ValidationError

    for adapter in _adapters(key):
        try:
            adapter.validate_python(value)
        except ValidationError as e:
            return vllm_message(e)
    if key == "quantization" and isinstance(value, str):
        from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

        if value not in QUANTIZATION_METHODS:
            return f"Unknown quantization method; vLLM knows {', '.join(QUANTIZATION_METHODS)}"
    return None


@functools.cache
def _adapters(key: str) -> tuple[Any, ...]:
    """pydantic validators for `key`: its annotation in EngineArgs and, with its constraints, in
    the first of vLLM's config classes that has a field of that name."""
    from typing import Annotated

    import vllm.config
    from pydantic import TypeAdapter
    from vllm.engine.arg_utils import AsyncEngineArgs

    types: list[Any] = [{f.name: f for f in dataclasses.fields(AsyncEngineArgs)}[key].type]
    for name in _CONFIG_CLASSES:
        info = getattr(vllm.config, name).__pydantic_fields__.get(key)
        if info is not None:
            types.append(
                Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
            )
            break
    adapters = []
    for tp in types:
        try:
            adapters.append(TypeAdapter(tp))
        except Exception:  # a forward reference or a type pydantic cannot check: vLLM will
            continue
    return tuple(adapters)


def vllm_message(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):  # pydantic's ValidationError: its messages without the URLs
        parts = dict.fromkeys(
            ": ".join(filter(None, [_where(err.get("loc", ())), str(err.get("msg"))]))
            for err in errors()
            if err.get("type") != "is_instance_of"  # TOML makes no Python objects
        )
        if parts:
            return "; ".join(parts)
    return str(exc).strip() or type(exc).__name__


def _where(loc: Iterable[Any]) -> str:
    # A key inside a nested setting (compilation_config: `mode`); pydantic also names union
    # branches in `loc` ("literal['auto', ...]"), which say nothing to an operator.
    return ".".join(str(p) for p in loc if not any(c in str(p) for c in "[]()"))


def _quoted(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- GPUs --------------------------------------------------------------------------------------


def gpu_list(text: str) -> tuple[int, ...]:
    """`--gpu 0` or `--gpu 0,1`: the GPU indices a worker owns."""
    try:
        gpus = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected GPU indices, e.g. 0 or 0,1") from None
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise argparse.ArgumentTypeError(f"{text!r}: GPU indices are distinct and >= 0")
    return gpus


def claim_gpus(gpus: tuple[int, ...], environ: MutableMapping[str, str] = os.environ) -> None:
    """Give the worker (and vLLM's processes, which inherit it) exactly these GPUs, before the
    engine starts."""
    if gpus:
        environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)


def visible_gpus(environ: Mapping[str, str] = os.environ) -> int:
    """How many GPUs this worker was given (CUDA_VISIBLE_DEVICES, as `--gpu` sets it); 0 when
    nothing says, and vLLM's own default (one) applies."""
    listed = environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if not listed or listed == "-1":
        return 0
    return len([part for part in listed.split(",") if part.strip()])
