"""`InstantEngine`: answers at once with a correctly shaped, deterministic OpenAI response and
no model. It exists for tests and for measuring orchestration overhead, and is only ever chosen
by configuration (JETBATCH_ENGINE=instant). It never needs vLLM installed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import struct
import time
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec

from services.inference.engine import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    STREAM_REFUSED,
    EngineResult,
    InFlight,
    bad_request,
)
from shared.config import ModelSpec

if TYPE_CHECKING:
    from services.inference.engine_load import EngineLoad

_PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class _Sampling(msgspec.Struct, kw_only=True):
    """The checks vLLM makes on common parameters, so error paths behave alike in both engines."""

    model: str | None = None
    max_tokens: _PositiveInt | None = None
    max_completion_tokens: _PositiveInt | None = None
    n: _PositiveInt = 1
    temperature: Annotated[float, msgspec.Meta(ge=0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    stream: bool | None = False


class _Message(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[Any] | None = None


class _ChatBody(_Sampling):
    messages: Annotated[list[_Message], msgspec.Meta(min_length=1)]


class _CompletionBody(_Sampling):
    prompt: str | list[Any]


class _EmbeddingBody(msgspec.Struct, kw_only=True):
    model: str | None = None
    input: str | list[Any]
    dimensions: _PositiveInt | None = None
    encoding_format: Literal["float", "base64"] = "float"


_instant_decoders: dict[str, msgspec.json.Decoder[Any]] = {
    CHAT: msgspec.json.Decoder(_ChatBody),
    COMPLETIONS: msgspec.json.Decoder(_CompletionBody),
    EMBEDDINGS: msgspec.json.Decoder(_EmbeddingBody),
}
_EMBED_DIMENSIONS = 384  # all-MiniLM-L6-v2's, so payload sizes look like the real thing
_DEFAULT_MAX_TOKENS = 16


class InstantEngine:
    """Answers at once with a correctly shaped, deterministic OpenAI response. Tests and
    benchmarks only: it measures everything around the model, never the model. With `delay_s`
    (JETBATCH_INSTANT_DELAY_S) each request takes that long and can be aborted meanwhile, as a
    vLLM request can: for tests of cancellation and graceful shutdown."""

    name = "instant"

    def __init__(self, spec: ModelSpec, *, max_in_flight: int = 0, delay_s: float = 0.0) -> None:
        self.spec = spec
        self.capacity = max_in_flight or 256
        self.load: EngineLoad | None = None  # answers at once: nothing waits in it
        self._delay_s = delay_s
        self._in_flight = InFlight()

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        tasks = self._in_flight.cancel_all()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def abort(self, request_id: str) -> None:
        self._in_flight.abort(request_id)

    def answer_now(self, endpoint: str, body: bytes, request_id: str) -> EngineResult | None:
        return self._answer(endpoint, body, request_id) if self._delay_s <= 0 else None

    async def run(
        self,
        endpoint: str,
        body: bytes,
        request_id: str,
        *,
        interactive: bool = False,
        batch_priority: int = 0,  # no queue here: every request is answered in its turn
    ) -> EngineResult:
        if self._delay_s <= 0:
            return self._answer(endpoint, body, request_id)
        return await self._in_flight.run(request_id, self._answer_later(endpoint, body, request_id))

    async def _answer_later(self, endpoint: str, body: bytes, request_id: str) -> EngineResult:
        await asyncio.sleep(self._delay_s)
        return self._answer(endpoint, body, request_id)

    def _answer(self, endpoint: str, body: bytes, request_id: str) -> EngineResult:
        if endpoint not in self.spec.endpoints:
            return bad_request(
                f"Model {self.spec.name} does not support endpoint {endpoint}; "
                f"supported: {', '.join(self.spec.endpoints)}"
            )
        try:
            request = _instant_decoders[endpoint].decode(body)
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
            return bad_request(f"Invalid request body: {exc}")
        if request.model is not None and request.model != self.spec.name:
            return EngineResult(
                status_code=404,
                error_code="NotFoundError",
                error_message=f"The model `{request.model}` does not exist.",
            )
        if endpoint == CHAT:
            return self._chat(request, request_id)
        if endpoint == COMPLETIONS:
            return self._completion(request, request_id)
        return self._embeddings(request, request_id)

    def _chat(self, request: _ChatBody, request_id: str) -> EngineResult:
        if request.stream:
            return bad_request(STREAM_REFUSED)
        words = [w for m in request.messages for w in _text(m.content).split()]
        reply, finish = _echo(_text(request.messages[-1].content), _max_tokens(request))
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": reply, "tool_calls": []},
                "logprobs": None,
                "finish_reason": finish,
            }
            for i in range(request.n)
        ]
        # ~4 template tokens per message, as chat templates add role markers.
        prompt_tokens = len(words) + 4 * len(request.messages)
        return self._respond("chatcmpl", "chat.completion", request_id, choices, prompt_tokens)

    def _completion(self, request: _CompletionBody, request_id: str) -> EngineResult:
        prompt = request.prompt
        if not prompt:
            return bad_request("Invalid request body: prompt must not be empty")
        if request.stream:
            return bad_request(STREAM_REFUSED)
        text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
        reply, finish = _echo(text, _max_tokens(request))
        choices = [
            {"index": i, "text": reply, "logprobs": None, "finish_reason": finish}
            for i in range(request.n)
        ]
        return self._respond("cmpl", "text_completion", request_id, choices, len(text.split()))

    def _respond(
        self, prefix: str, kind: str, request_id: str, choices: list[Any], prompt_tokens: int
    ) -> EngineResult:
        completion_tokens = sum(len(_choice_text(c).split()) for c in choices)
        body = {
            "id": f"{prefix}-{request_id}",
            "object": kind,
            "created": int(time.time()),
            "model": self.spec.name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "completion_tokens": completion_tokens,
                "prompt_tokens_details": {"cached_tokens": 0},
            },
        }
        return EngineResult(
            status_code=200,
            body=msgspec.json.encode(body),
            input_tokens=prompt_tokens,
            output_tokens=completion_tokens,
        )

    def _embeddings(self, request: _EmbeddingBody, request_id: str) -> EngineResult:
        inputs = request.input
        if isinstance(inputs, str):
            inputs = [inputs]
        if not inputs:
            return bad_request("Invalid request body: input must not be empty")
        dimensions = request.dimensions or _EMBED_DIMENSIONS
        data = []
        prompt_tokens = 0
        for index, item in enumerate(inputs):
            text = item if isinstance(item, str) else repr(item)
            prompt_tokens += len(text.split()) + 2  # [CLS] ... [SEP]
            vector = _vector(text, dimensions)
            embedding: list[float] | str = (
                base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
                if request.encoding_format == "base64"
                else vector
            )
            data.append({"index": index, "object": "embedding", "embedding": embedding})
        body = {
            "id": f"embd-{request_id}",
            "object": "list",
            "created": int(time.time()),
            "model": self.spec.name,
            "data": data,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens,
                "completion_tokens": 0,
            },
        }
        return EngineResult(
            status_code=200, body=msgspec.json.encode(body), input_tokens=prompt_tokens
        )


def _text(content: str | list[Any] | None) -> str:
    if isinstance(content, str):
        return content
    parts = content or []
    return " ".join(p.get("text", "") for p in parts if isinstance(p, dict))


def _max_tokens(request: _Sampling) -> int:
    return request.max_completion_tokens or request.max_tokens or _DEFAULT_MAX_TOKENS


def _echo(text: str, max_tokens: int) -> tuple[str, str]:
    """The prompt's words back, one "token" per word, cut at max_tokens like a real model."""
    words = text.split() or ["ok"]
    finish = "length" if len(words) > max_tokens else "stop"
    return " ".join(words[:max_tokens]), finish


def _choice_text(choice: dict[str, Any]) -> str:
    return choice["message"]["content"] if "message" in choice else choice["text"]


def _vector(text: str, dimensions: int) -> list[float]:
    # Deterministic per text and unit length, like a normalized sentence embedding.
    seed = hashlib.blake2b(text.encode(), digest_size=8).digest()
    raw = [((seed[i % 8] + i * 37) % 255) / 127.0 - 1.0 for i in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]
