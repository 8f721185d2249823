"""The batch queue limit `batch_1_day_max_input_tokens` (README: Limits), set through the official
openai SDK's admin client and enforced as on OpenAI: a batch whose input tokens, with those of
the project's other queued batches for the model, go over it fails with `token_limit_exceeded`;
one within it runs; 0 = no limit. Tokens are counted as the api counts them (its tokenizer for
the model, or the documented estimate where the model's directory is missing)."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import openai
import pytest
from openai.types import Batch

from services.api.tokens import TokenCounter
from services.inference.models import model_path
from shared import config
from tests.helpers import (
    CHAT,
    CHAT_MODEL,
    admin_client,
    chat_jsonl,
    default_models_dir,
    project_with_key,
    wait_until,
)
from tests.integration.test_projects import api, user

REPO = Path(__file__).resolve().parents[2]
RATE_LIMIT_ID = f"rl-{CHAT_MODEL}"


@pytest.fixture
def env(base_api_env: dict[str, str]) -> dict[str, str]:
    # The real tokenizer of the default chat model.
    return {**base_api_env, "JETBATCH_MODELS": CHAT_MODEL,
            "JETBATCH_MODELS_DIR": str(default_models_dir())}  # fmt: skip


def input_tokens(env: dict[str, str], data: bytes) -> int:
    """The file's input tokens as the api counts them."""
    settings = config.load(env)
    spec = settings.model(CHAT_MODEL)
    assert spec is not None
    counter = TokenCounter(CHAT, model_path(settings, spec))
    for line in data.splitlines():
        counter.add(json.dumps(json.loads(line)["body"]).encode())
    return counter.finish()


async def set_limit(org: openai.AsyncOpenAI, project_id: str, tokens: int) -> None:
    limit = await org.admin.organization.projects.rate_limits.update_rate_limit(
        RATE_LIMIT_ID, project_id=project_id, batch_1_day_max_input_tokens=tokens
    )
    assert limit.batch_1_day_max_input_tokens == tokens


async def run(client: openai.AsyncOpenAI, data: bytes) -> Batch:
    """Create a batch of `data`; the batch once it has left `validating`."""
    f = await client.files.create(file=("in.jsonl", data), purpose="batch")
    batch = await client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")

    async def validated() -> Batch | None:
        got = await client.batches.retrieve(batch.id)
        return got if got.status != "validating" else None

    return await wait_until(validated, f"batch {batch.id} validated")


def assert_over_limit(batch: Batch, project_id: str, limit: int) -> None:
    assert batch.status == "failed"
    assert batch.errors is not None and batch.errors.data is not None
    [error] = batch.errors.data
    assert error.code == "token_limit_exceeded"
    assert error.message == (
        f"Enqueued token limit reached for {CHAT_MODEL} in project {project_id}. Limit: "
        f"{limit:,} enqueued tokens. Please try again once some in_progress batches have been "
        "completed."
    )


@pytest.mark.parametrize("counting", ["tokenizer", "estimate"])
async def test_a_batch_over_the_limit_fails_and_one_within_it_runs(
    env: dict[str, str], counting: str, tmp_path: Path
) -> None:
    if counting == "estimate":  # the chat model's directory is missing: bytes / 4, logged
        env["JETBATCH_MODELS_DIR"] = str(tmp_path)
    small, big = chat_jsonl(1), chat_jsonl(40, content="tell me a long story " * 20)
    small_tokens, big_tokens = input_tokens(env, small), input_tokens(env, big)
    assert small_tokens < 100 < big_tokens
    async with api(env) as base_url:
        org = admin_client(base_url)
        project_id, key = await project_with_key(org, "limited")
        client = user(base_url, key)
        await set_limit(org, project_id, 100)
        assert_over_limit(await run(client, big), project_id, 100)
        assert (await run(client, small)).status == "in_progress"
        # 0 is no limit: the big one runs, beside the small one still queued.
        await set_limit(org, project_id, 0)
        assert (await run(client, big)).status == "in_progress"


async def test_the_limit_counts_the_projects_other_queued_batches(
    env: dict[str, str], database_url: str
) -> None:
    data = chat_jsonl(5, content="count these words " * 5)
    tokens = input_tokens(env, data)
    limit = 2 * tokens - 1  # room for one of them, not two
    async with api(env) as base_url:
        org = admin_client(base_url)
        project_id, key = await project_with_key(org, "queue")
        other_id, other_key = await project_with_key(org, "other")
        client, other = user(base_url, key), user(base_url, other_key)
        for project in (project_id, other_id):
            await set_limit(org, project, limit)
        first = await run(client, data)
        assert first.status == "in_progress"
        assert_over_limit(await run(client, data), project_id, limit)
        # Another project's queue is its own.
        assert (await run(other, data)).status == "in_progress"
        # Once the first batch is no longer queued, the same batch fits.
        await client.batches.cancel(first.id)
        assert (await run(client, data)).status == "in_progress"
    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetchval(
            "SELECT input_tokens_estimate FROM batches WHERE id = $1", first.id
        )
    finally:
        await conn.close()
    assert stored == tokens
