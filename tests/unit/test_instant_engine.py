"""The instant engine answers like vLLM would, shape for shape, and refuses what vLLM refuses."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.inference.engine import EngineResult, InFlight, make_engine
from services.inference.instant_engine import InstantEngine
from shared.config import ModelSpec, load

REPO = Path(__file__).resolve().parents[2]
CHAT_MODEL = ModelSpec(name="SmolLM2-135M-Instruct", path="", task="generate")
EMBED_MODEL = ModelSpec(name="all-MiniLM-L6-v2", path="", task="embed")


def _body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


async def _run(spec: ModelSpec, endpoint: str, body: bytes) -> EngineResult:
    engine = InstantEngine(spec)
    await engine.start()
    try:
        return await engine.run(endpoint, body, "req_1")
    finally:
        await engine.stop()


async def test_chat_completion_is_shaped_like_openai() -> None:
    result = await _run(
        CHAT_MODEL,
        "/v1/chat/completions",
        _body(
            model=CHAT_MODEL.name,
            messages=[{"role": "user", "content": "say hello to the world"}],
            max_tokens=3,
            n=2,
        ),
    )
    assert result.ok and result.status_code == 200 and result.body is not None
    body = json.loads(result.body)
    assert body["id"] == "chatcmpl-req_1"
    assert body["object"] == "chat.completion"
    assert body["model"] == CHAT_MODEL.name
    assert [c["index"] for c in body["choices"]] == [0, 1]
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "say hello to"
    assert choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["completion_tokens"] == 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert (result.input_tokens, result.output_tokens, result.cached_tokens) == (
        usage["prompt_tokens"],
        6,
        0,
    )


async def test_completion_is_shaped_like_openai() -> None:
    result = await _run(CHAT_MODEL, "/v1/completions", _body(prompt="once upon a time"))
    assert result.ok and result.body is not None
    body = json.loads(result.body)
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "once upon a time"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert result.input_tokens == body["usage"]["prompt_tokens"] == 4
    assert result.output_tokens == body["usage"]["completion_tokens"] == 4


async def test_embeddings_have_one_unit_vector_of_384_floats_per_input() -> None:
    result = await _run(EMBED_MODEL, "/v1/embeddings", _body(input=["a b", "c"]))
    assert result.ok and result.body is not None
    body = json.loads(result.body)
    assert body["object"] == "list"
    assert [d["index"] for d in body["data"]] == [0, 1]
    vector = body["data"][0]["embedding"]
    assert len(vector) == 384
    assert sum(x * x for x in vector) == pytest.approx(1.0)
    assert body["data"][0]["embedding"] != body["data"][1]["embedding"]
    assert result.input_tokens == body["usage"]["prompt_tokens"] > 0
    assert result.output_tokens == 0


async def test_same_input_gives_the_same_embedding() -> None:
    first = await _run(EMBED_MODEL, "/v1/embeddings", _body(input="same"))
    second = await _run(EMBED_MODEL, "/v1/embeddings", _body(input="same"))
    assert first.body is not None and second.body is not None
    assert json.loads(first.body)["data"] == json.loads(second.body)["data"]


async def test_base64_embeddings_decode_to_the_requested_dimensions() -> None:
    result = await _run(
        EMBED_MODEL, "/v1/embeddings", _body(input="x", encoding_format="base64", dimensions=8)
    )
    assert result.body is not None
    raw = base64.b64decode(json.loads(result.body)["data"][0]["embedding"])
    assert len(raw) == 8 * 4  # little-endian float32, as OpenAI sends them


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        ("/v1/chat/completions", b"[1, 2]"),
        ("/v1/chat/completions", b"{not json"),
        ("/v1/chat/completions", _body(model="SmolLM2-135M-Instruct")),
        ("/v1/chat/completions", _body(messages=[])),
        ("/v1/chat/completions", _body(messages="hello")),
        ("/v1/chat/completions", _body(messages=[{"role": "user", "content": "x"}], max_tokens=-1)),
        ("/v1/chat/completions", _body(messages=[{"role": "user", "content": "x"}], max_tokens=0)),
        (
            "/v1/chat/completions",
            _body(messages=[{"role": "user", "content": "x"}], temperature=-1),
        ),
        ("/v1/chat/completions", _body(messages=[{"role": "user", "content": "x"}], top_p=0)),
        ("/v1/chat/completions", _body(messages=[{"role": "user", "content": "x"}], n=0)),
        ("/v1/chat/completions", _body(messages=[{"role": "user", "content": "x"}], stream=True)),
        ("/v1/completions", _body(max_tokens=5)),
        ("/v1/completions", _body(prompt="")),
        ("/v1/completions", _body(prompt="x", max_completion_tokens=-3)),
        ("/v1/embeddings", _body(model="all-MiniLM-L6-v2")),
        ("/v1/embeddings", _body(input=[])),
        ("/v1/embeddings", _body(input="x", encoding_format="bytes")),
    ],
)
async def test_invalid_body_is_a_400_result_not_an_exception(endpoint: str, body: bytes) -> None:
    spec = EMBED_MODEL if endpoint == "/v1/embeddings" else CHAT_MODEL
    result = await _run(spec, endpoint, body)
    assert result.status_code == 400
    assert not result.ok and result.body is None
    assert result.error_code == "BadRequestError"
    assert result.error_message


async def test_streaming_is_refused_with_vllms_batch_message() -> None:
    result = await _run(
        CHAT_MODEL,
        "/v1/chat/completions",
        _body(messages=[{"role": "user", "content": "x"}], stream=True),
    )
    assert result.error_message == "Request must not be sent in stream mode"


async def test_endpoint_the_model_does_not_serve_is_rejected() -> None:
    result = await _run(EMBED_MODEL, "/v1/chat/completions", _body(messages=[]))
    assert result.status_code == 400
    assert "does not support endpoint" in (result.error_message or "")


async def test_another_models_name_is_not_found() -> None:
    result = await _run(
        CHAT_MODEL,
        "/v1/chat/completions",
        _body(model="gpt-4o", messages=[{"role": "user", "content": "x"}]),
    )
    assert (result.status_code, result.error_code) == (404, "NotFoundError")


def test_instant_engine_is_chosen_only_by_configuration(tmp_path: Path) -> None:
    instant = load({"JETBATCH_DATA_DIR": str(tmp_path), "JETBATCH_ENGINE": "instant"})
    default = load({"JETBATCH_DATA_DIR": str(tmp_path)})
    assert make_engine(instant, CHAT_MODEL).name == "instant"
    assert make_engine(default, CHAT_MODEL).name == "vllm"


def test_max_in_flight_overrides_the_engines_capacity(tmp_path: Path) -> None:
    env = {"JETBATCH_DATA_DIR": str(tmp_path), "JETBATCH_ENGINE": "instant"}
    assert make_engine(load(env), CHAT_MODEL).capacity == 256
    env["JETBATCH_MAX_IN_FLIGHT"] = "7"
    assert make_engine(load(env), CHAT_MODEL).capacity == 7
    env["JETBATCH_ENGINE"] = "vllm"
    assert make_engine(load(env), EMBED_MODEL).capacity == 7


def test_engine_modules_import_without_vllm() -> None:
    code = (
        "import sys; import services.inference.engine; "
        "import services.inference.instant_engine, services.inference.vllm_engine; "
        "assert 'vllm' not in sys.modules and 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# -- abort semantics (the vLLM engine runs every request through InFlight) ------------------------


async def _slow(seconds: float) -> EngineResult:
    await asyncio.sleep(seconds)
    return EngineResult(status_code=200, body=b"{}")


async def test_aborted_request_returns_499_instead_of_raising() -> None:
    in_flight = InFlight()
    running = asyncio.create_task(in_flight.run("req_1", _slow(30)))
    await asyncio.sleep(0.01)
    assert in_flight.abort("req_1")
    result = await asyncio.wait_for(running, 1)
    assert (result.status_code, result.error_code) == (499, "request_aborted")


async def test_aborted_request_is_499_even_when_the_work_swallows_the_cancellation() -> None:
    # vLLM's chat handler answers a cancellation with an ErrorResponse instead of raising.
    async def swallowing() -> EngineResult:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            return EngineResult(status_code=400, error_code="BadRequestError")
        return EngineResult(status_code=200)

    in_flight = InFlight()
    running = asyncio.create_task(in_flight.run("req_1", swallowing()))
    await asyncio.sleep(0.01)
    in_flight.abort("req_1")
    assert (await asyncio.wait_for(running, 1)).status_code == 499


async def test_aborting_an_unknown_request_does_nothing() -> None:
    assert not InFlight().abort("nobody")


async def test_cancelled_caller_sees_cancelled_error_not_a_result() -> None:
    in_flight = InFlight()
    running = asyncio.create_task(in_flight.run("req_1", _slow(30)))
    await asyncio.sleep(0.01)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert not in_flight.abort("req_1")  # nothing left behind


async def test_abort_leaves_other_requests_running() -> None:
    in_flight = InFlight()
    kept = asyncio.create_task(in_flight.run("keep", _slow(0.05)))
    dropped = asyncio.create_task(in_flight.run("drop", _slow(30)))
    await asyncio.sleep(0.01)
    in_flight.abort("drop")
    assert (await kept).status_code == 200
    assert (await dropped).status_code == 499
