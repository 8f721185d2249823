"""The vLLM engine answers what `vllm serve` answers: real models, vLLM's own serving layer.

One engine per default model for the whole module (each takes ~40 s to start on the 2-core CPU).
Models are prepared into a cache shared by test sessions (JETBATCH_MODELS_DIR, default
<repo>/.jetbatch/models), so SmolLM2 is converted from its GGUF once per checkout, not per run.
A missing vLLM is a failure, never a skip.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.inference.engine import Engine, EngineResult, make_engine
from services.inference.models import prepare_models
from shared.config import DEFAULT_CHAT_MODEL, DEFAULT_EMBED_MODEL, Settings, load
from tests.helpers import CHAT, COMPLETIONS, EMBEDDINGS

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def settings() -> Settings:
    settings = load(
        {
            "JETBATCH_DATA_DIR": str(REPO / ".jetbatch-test"),
            "JETBATCH_MODELS_DIR": os.environ.get("JETBATCH_MODELS_DIR")
            or str(REPO / ".jetbatch" / "models"),
        }
    )
    prepare_models(settings)
    return settings


async def _started(settings: Settings, name: str) -> AsyncIterator[Engine]:
    spec = settings.model(name)
    assert spec is not None
    engine = make_engine(settings, spec)
    assert engine.name == "vllm"
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


@pytest.fixture(scope="module")
async def chat_engine(settings: Settings) -> AsyncIterator[Engine]:
    async for engine in _started(settings, DEFAULT_CHAT_MODEL):
        yield engine


@pytest.fixture(scope="module")
async def embed_engine(settings: Settings) -> AsyncIterator[Engine]:
    async for engine in _started(settings, DEFAULT_EMBED_MODEL):
        yield engine


def _chat(content: str, **params: Any) -> bytes:
    return json.dumps(
        {"model": DEFAULT_CHAT_MODEL, "messages": [{"role": "user", "content": content}], **params}
    ).encode()


def _json(result: EngineResult) -> dict[str, Any]:
    assert result.body is not None, (result.status_code, result.error_message)
    return json.loads(result.body)


# -- generate ----------------------------------------------------------------------------------


async def test_chat_completion_goes_through_the_models_chat_template(chat_engine: Engine) -> None:
    result = await chat_engine.run(
        CHAT, _chat("What is the capital of France?", max_tokens=16, temperature=0), "req_chat"
    )
    assert (result.status_code, result.error_code) == (200, None)
    body = _json(result)
    assert body["id"] == "chatcmpl-req_chat"
    assert body["object"] == "chat.completion"
    assert body["model"] == DEFAULT_CHAT_MODEL
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    # SmolLM2's template wraps 7 words in role markers and a default system prompt.
    assert usage["prompt_tokens"] > 20
    assert 0 < usage["completion_tokens"] <= 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert (result.input_tokens, result.output_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )


async def test_completion_honours_max_tokens_and_vllm_sampling_extensions(
    chat_engine: Engine,
) -> None:
    body = {"model": DEFAULT_CHAT_MODEL, "prompt": "Once upon a time", "max_tokens": 7}
    body["ignore_eos"] = True  # a vLLM extension: passes through the body like any parameter
    result = await chat_engine.run(COMPLETIONS, json.dumps(body).encode(), "req_cmpl")
    response = _json(result)
    assert response["id"] == "cmpl-req_cmpl"
    assert response["object"] == "text_completion"
    (choice,) = response["choices"]
    assert isinstance(choice["text"], str)
    assert choice["finish_reason"] == "length"
    assert response["usage"]["completion_tokens"] == result.output_tokens == 7
    assert response["usage"]["prompt_tokens"] == result.input_tokens == 4


async def test_greedy_sampling_is_deterministic(chat_engine: Engine) -> None:
    body = _chat("Name three colours.", max_tokens=12, temperature=0)
    first, second = await asyncio.gather(
        chat_engine.run(CHAT, body, "req_a"), chat_engine.run(CHAT, body, "req_b")
    )
    assert (
        _json(first)["choices"][0]["message"]["content"]
        == _json(second)["choices"][0]["message"]["content"]
    )


async def test_n_choices_are_all_returned_and_counted(chat_engine: Engine) -> None:
    result = await chat_engine.run(
        CHAT, _chat("Say something.", max_tokens=5, n=3, ignore_eos=True), "req_n"
    )
    body = _json(result)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert result.output_tokens == body["usage"]["completion_tokens"] == 15


async def test_a_repeated_prompt_reports_cached_tokens(chat_engine: Engine) -> None:
    prompt = " ".join(f"item{i}" for i in range(400))
    first = await chat_engine.run(CHAT, _chat(prompt, max_tokens=1), "req_cache_1")
    second = await chat_engine.run(CHAT, _chat(prompt, max_tokens=1), "req_cache_2")
    assert first.ok and second.ok
    details = _json(second)["usage"]["prompt_tokens_details"]
    assert second.cached_tokens == details["cached_tokens"] > 0


async def test_many_concurrent_requests_all_succeed(chat_engine: Engine) -> None:
    results = await asyncio.gather(
        *(
            chat_engine.run(CHAT, _chat(f"Count to {i}.", max_tokens=8), f"req_{i}")
            for i in range(24)
        )
    )
    assert {r.status_code for r in results} == {200}
    assert len({_json(r)["id"] for r in results}) == 24


async def test_a_synchronous_request_goes_ahead_of_batch_requests_queued_in_the_engine(
    chat_engine: Engine,
) -> None:
    # Two waves of batch requests: the second waits in vLLM's queue while the first runs. A
    # synchronous request sent after both must start with the second wave, not after it.
    wave = chat_engine.capacity  # at least max_num_seqs
    fixed = {"max_tokens": 8, "min_tokens": 8, "temperature": 0}
    finished: list[str] = []

    async def run(name: str, body: bytes, interactive: bool = False) -> EngineResult:
        result = await chat_engine.run(CHAT, body, name, interactive=interactive)
        finished.append(name)
        return result

    batch = [
        asyncio.create_task(run(f"batch_{i}", _chat(f"Say {i} in words.", **fixed)))
        for i in range(2 * wave)
    ]
    await asyncio.sleep(0.5)  # every batch request is in the engine before the synchronous one
    sync = await run("sync", _chat("Say hi.", max_tokens=2, temperature=0), interactive=True)
    assert sync.status_code == 200, sync.error_message
    results = await asyncio.gather(*batch)
    assert {r.status_code for r in results} == {200}
    # First come, first served would run it after the whole second wave (measured: 128th of
    # 160); with priority it starts as the first wave ends and finishes first (64th).
    assert finished.index("sync") <= wave, finished.index("sync")


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        (_chat("hi", max_tokens=100_000), "max_tokens"),  # far beyond the 2048-token context
        (_chat("hi", max_tokens=-1), "max_tokens"),
        (_chat("hi", temperature=-0.5), "temperature"),
        (_chat("hi", top_p=1.5), "top_p"),
        (_chat("hi", stream=True), "stream"),
        (json.dumps({"model": DEFAULT_CHAT_MODEL}).encode(), "messages"),
        (json.dumps({"messages": "hello"}).encode(), "messages"),
        (b"[1, 2, 3]", "object"),
        (b"{not json", "JSON"),
    ],
    ids=[
        "max_tokens_beyond_context",
        "negative_max_tokens",
        "negative_temperature",
        "top_p_above_1",
        "stream",
        "no_messages",
        "messages_not_a_list",
        "not_an_object",
        "not_json",
    ],
)
async def test_bad_chat_request_is_a_400_result_not_an_exception(
    chat_engine: Engine, body: bytes, mentions: str
) -> None:
    result = await chat_engine.run(CHAT, body, "req_bad")
    assert result.status_code == 400
    assert result.body is None and not result.ok
    assert result.error_code
    assert mentions in (result.error_message or ""), result.error_message


async def test_another_models_name_is_404(chat_engine: Engine) -> None:
    body = json.dumps({"model": "gpt-4o", "prompt": "hi", "max_tokens": 2}).encode()
    result = await chat_engine.run(COMPLETIONS, body, "req_404")
    assert (result.status_code, result.error_code) == (404, "NotFoundError")


async def test_chat_model_refuses_the_embeddings_endpoint(chat_engine: Engine) -> None:
    result = await chat_engine.run(EMBEDDINGS, b'{"input": "x"}', "req_wrong")
    assert result.status_code == 400
    assert "does not support endpoint" in (result.error_message or "")


async def test_abort_withdraws_a_running_request(chat_engine: Engine) -> None:
    running = asyncio.create_task(
        chat_engine.run(
            CHAT, _chat("Tell a long story.", max_tokens=1500, ignore_eos=True), "req_x"
        )
    )
    await asyncio.sleep(2)  # generating by now: 1500 tokens would take over a minute
    await chat_engine.abort("req_x")
    result = await asyncio.wait_for(running, 10)
    assert (result.status_code, result.error_code) == (499, "request_aborted")
    # The engine goes on serving.
    after = await chat_engine.run(CHAT, _chat("hi", max_tokens=2), "req_after")
    assert after.ok


async def test_capacity_is_sized_from_vllms_scheduler(chat_engine: Engine) -> None:
    from vllm.platforms import current_platform

    # max_num_seqs: the engine sets 64 on the CPU; on a GPU it is vLLM's own default. A quarter
    # more are kept waiting in vLLM's queue, ready for the next free slot.
    if current_platform.is_cpu():
        assert chat_engine.capacity == 64 + 16
    else:
        assert chat_engine.capacity >= 64 + 16


# -- embed -------------------------------------------------------------------------------------


async def test_the_engine_reports_its_queue_and_cache_for_admission(chat_engine: Engine) -> None:
    """vLLM's scheduler reports through the stat logger the intake reads (engine_load.py)."""
    load = chat_engine.load
    assert load is not None
    body = json.dumps({"model": DEFAULT_CHAT_MODEL, "prompt": "Count:", "max_tokens": 4})
    results = await asyncio.gather(
        *(chat_engine.run(COMPLETIONS, body.encode(), f"load-{i}") for i in range(8))
    )
    assert all(r.ok for r in results)
    last = load.fresh()
    assert last is not None, "no scheduler stats since the requests ran"
    assert 0.0 <= last.kv_cache_usage <= 1.0
    assert last.running >= 0 and last.waiting >= 0
    assert load.room(in_engine=0) == load.queue_target


async def test_embeddings_are_normalised_384_float_vectors(embed_engine: Engine) -> None:
    body = json.dumps(
        {"model": DEFAULT_EMBED_MODEL, "input": ["The cat sat on the mat.", "Hello"]}
    ).encode()
    result = await embed_engine.run(EMBEDDINGS, body, "req_emb")
    response = _json(result)
    assert response["id"] == "embd-req_emb"
    assert response["object"] == "list"
    assert response["model"] == DEFAULT_EMBED_MODEL
    assert [d["index"] for d in response["data"]] == [0, 1]
    for item in response["data"]:
        assert item["object"] == "embedding"
        assert len(item["embedding"]) == 384
        assert math.sqrt(sum(x * x for x in item["embedding"])) == pytest.approx(1.0, abs=1e-3)
    assert result.input_tokens == response["usage"]["prompt_tokens"] > 4
    assert result.output_tokens == 0


async def test_similar_sentences_have_closer_embeddings(embed_engine: Engine) -> None:
    texts = ["A dog runs in the park.", "A puppy is running in a park.", "Stock prices fell."]
    body = json.dumps({"model": DEFAULT_EMBED_MODEL, "input": texts}).encode()
    vectors = [
        d["embedding"] for d in _json(await embed_engine.run(EMBEDDINGS, body, "req_sim"))["data"]
    ]

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.2


@pytest.mark.parametrize(
    "body",
    [
        {"model": DEFAULT_EMBED_MODEL},
        {"model": DEFAULT_EMBED_MODEL, "input": "x", "encoding_format": "bytes"},
        {"model": DEFAULT_EMBED_MODEL, "input": "x", "dimensions": -3},
    ],
    ids=["no_input", "binary_encoding", "negative_dimensions"],
)
async def test_bad_embeddings_request_is_a_400_result(
    embed_engine: Engine, body: dict[str, Any]
) -> None:
    result = await embed_engine.run(EMBEDDINGS, json.dumps(body).encode(), "req_bad")
    assert result.status_code == 400, result
    assert result.error_message


async def test_embed_model_refuses_chat(embed_engine: Engine) -> None:
    result = await embed_engine.run(CHAT, _chat("hi"), "req_wrong")
    assert result.status_code == 400
