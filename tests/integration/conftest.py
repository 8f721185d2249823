"""An in-process api for the integration tests: `api_env` (its settings; a module that needs
more overrides it as `{**base_api_env, ...}`), `api` (its base URL while the test runs), `client`
(the official SDK on it) and `http` (httpx with the key)."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest

from services.api.service import running
from shared import config
from shared.embedded import free_port
from tests.helpers import API_KEY


@pytest.fixture
def base_api_env(database_url: str, nats_url: str, scratch_dir: Path) -> dict[str, str]:
    return {
        "JETBATCH_DATA_DIR": tempfile.mkdtemp(prefix="api-", dir=scratch_dir),
        "JETBATCH_DATABASE_URL": database_url,
        "JETBATCH_NATS_URL": nats_url,
        "JETBATCH_ENGINE": "instant",
        "JETBATCH_API_KEY": API_KEY,
        "JETBATCH_API_PORT": str(free_port()),
        # These apis mostly run without a worker, and their tests wait for a batch to be
        # published whole: no dispatch window (tests of the window set one: test_fair_dispatch.py,
        # test_lifecycle.py).
        "JETBATCH_DISPATCH_MIN_WINDOW": "1000000",
    }


@pytest.fixture
def api_env(base_api_env: dict[str, str]) -> dict[str, str]:
    return base_api_env


@pytest.fixture
async def api(api_env: dict[str, str]) -> AsyncIterator[str]:
    async with running(config.load(api_env)) as base_url:
        yield base_url


@pytest.fixture
def client(api: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=api, api_key=API_KEY, max_retries=0)


@pytest.fixture
async def http(api: str) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=api, headers=headers, timeout=30) as c:
        yield c
