"""upload -> batch -> completed -> download, through the official `openai` SDK against
`jetbatch up` with vLLM on the CPU. Every output line is decoded with its schema."""

from __future__ import annotations

from typing import Any

import msgspec
import openai
import pytest

from schemas.openai import OutputLine
from tests.helpers import (
    CHAT_MODEL,
    EMBED_MODEL,
    completion_line,
    embedding_line,
    jsonl,
    wait_until_sync,
)
from tests.openai_schema import validate

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]


def wait_done(client: openai.OpenAI, batch_id: str, timeout_s: float = 480):
    def finished() -> Any:
        batch = client.batches.retrieve(batch_id)
        return batch if batch.status in ("completed", "failed", "expired", "cancelled") else None

    what = f"batch {batch_id} to finish"
    return wait_until_sync(finished, what, timeout_s=timeout_s, interval_s=0.5)


def output_lines(client: openai.OpenAI, file_id: str | None) -> list[OutputLine]:
    if file_id is None:
        return []
    content = client.files.content(file_id).read()
    return [msgspec.json.decode(line, type=OutputLine) for line in content.splitlines() if line]


def test_chat_batch_runs_through_vllm_to_output_and_error_files(client: openai.OpenAI) -> None:
    prompts = ["Say hello.", "What is 2+2?", "Name a colour.", "Count to three.", "Say bye."]
    lines = [
        {
            "custom_id": f"chat-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": CHAT_MODEL,
                "messages": [{"role": "user", "content": p}],
                "max_tokens": 12,
                "temperature": 0,
            },
        }
        for i, p in enumerate(prompts)
    ]
    # The engine rejects this one (max_tokens beyond the context): an error line, not a failure.
    lines.append(
        {
            "custom_id": "too-long",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": CHAT_MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 1_000_000,
            },
        }
    )
    uploaded = client.files.create(file=("chat.jsonl", jsonl(lines)), purpose="batch")
    validate("OpenAIFile", uploaded.model_dump())
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"run": "e2e"},
    )
    assert batch.status in ("validating", "in_progress")
    validate("Batch", batch.model_dump())

    done = wait_done(client, batch.id)
    validate("Batch", done.model_dump())
    assert done.status == "completed", done
    assert done.request_counts.total == 6
    assert done.request_counts.completed == 5
    assert done.request_counts.failed == 1
    assert done.model == CHAT_MODEL
    assert done.metadata == {"run": "e2e"}
    for stamp in (done.in_progress_at, done.finalizing_at, done.completed_at):
        assert stamp is not None and stamp >= done.created_at
    assert done.usage.output_tokens > 0 and done.usage.input_tokens > 0
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens

    ok = output_lines(client, done.output_file_id)
    failed = output_lines(client, done.error_file_id)
    ids = sorted(line.custom_id for line in ok + failed)
    assert ids == sorted(line["custom_id"] for line in lines)  # each exactly once
    output_tokens = 0
    for line in ok:
        assert line.error is None and line.response is not None
        assert line.response.status_code == 200
        body = msgspec.json.decode(line.response.body)
        assert body["object"] == "chat.completion"
        assert body["model"] == CHAT_MODEL
        assert body["choices"][0]["message"]["content"]
        output_tokens += body["usage"]["completion_tokens"]
    assert output_tokens == done.usage.output_tokens
    [rejected] = failed
    assert rejected.custom_id == "too-long"
    assert rejected.response is not None and rejected.response.status_code == 400
    assert "error" in msgspec.json.decode(rejected.response.body)


def test_embeddings_batch_returns_one_vector_per_line(client: openai.OpenAI) -> None:
    content = jsonl(embedding_line(f"emb-{i}", f"sentence number {i}") for i in range(8))
    uploaded = client.files.create(file=("emb.jsonl", content), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    done = wait_done(client, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (8, 0)
    assert done.error_file_id is None
    ok = output_lines(client, done.output_file_id)
    assert sorted(line.custom_id for line in ok) == sorted(f"emb-{i}" for i in range(8))
    for line in ok:
        body = msgspec.json.decode(line.response.body)
        assert body["object"] == "list"
        assert len(body["data"][0]["embedding"]) == 384


def test_completions_batch_runs(client: openai.OpenAI) -> None:
    content = jsonl(
        completion_line(f"c-{i}", "Once upon a time", max_tokens=8, seed=i) for i in range(3)
    )
    uploaded = client.files.create(file=("c.jsonl", content), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h"
    )
    done = wait_done(client, batch.id)
    assert done.status == "completed", done
    ok = output_lines(client, done.output_file_id)
    assert len(ok) == 3
    for line in ok:
        assert msgspec.json.decode(line.response.body)["object"] == "text_completion"


def test_synchronous_chat_and_embeddings_use_the_same_workers(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=8
    )
    assert chat.choices[0].message.content
    assert chat.usage.completion_tokens > 0
    emb = client.embeddings.create(model=EMBED_MODEL, input=["a", "b"])
    assert [len(d.embedding) for d in emb.data] == [384, 384]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1_000_000
        )


def test_models_lists_served_models_with_live_workers(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {CHAT_MODEL, EMBED_MODEL}
    for m in models.values():
        assert m.model_extra["live_workers"] >= 1


def test_bad_inputs_get_openai_errors(client: openai.OpenAI, system) -> None:
    wrong_key = openai.OpenAI(base_url=system.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.batches.list()
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_doesnotexist")
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-doesnotexist")

    unserved = client.files.create(
        file=(
            "u.jsonl",
            jsonl(
                [
                    {
                        "custom_id": "1",
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": {"model": "gpt-4o", "messages": []},
                    }
                ]
            ),
        ),
        purpose="batch",
    )
    with pytest.raises(openai.BadRequestError, match="gpt-4o"):
        client.batches.create(
            input_file_id=unserved.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.BadRequestError):
        client.batches.create(
            input_file_id=unserved.id, endpoint="/v1/chat/completions", completion_window="48h"
        )

    broken = client.files.create(
        file=(
            "b.jsonl",
            b'{"custom_id": "1", "method": "POST", '
            b'"url": "/v1/chat/completions", "body": {"model": "'
            + CHAT_MODEL.encode()
            + b'", "messages": []}}\nnot json\n',
        ),
        purpose="batch",
    )
    batch = client.batches.create(
        input_file_id=broken.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_done(client, batch.id, timeout_s=60)
    assert done.status == "failed"
    assert done.failed_at is not None
    assert done.errors is not None and done.errors.data[0].line == 2


def test_workers_report_what_the_engine_allocated(client: openai.OpenAI) -> None:
    workers = client.get("/workers", cast_to=object)["data"]  # type: ignore[index]
    chat = [w for w in workers if w["model"] == CHAT_MODEL]
    assert chat, workers
    for w in chat:
        assert w["kv_cache_blocks"] > 0 and w["kv_cache_tokens"] > 0
        assert w["max_num_seqs"] >= 1 and w["max_model_len"] >= 1
        assert w["capacity"] >= 1
