"""Engines: run one OpenAI request body and say what `vllm serve` would have answered.

What both engines share lives here: the `Engine` protocol, its `EngineResult`, and the in-flight
bookkeeping that lets one request be aborted. The engines themselves: `VllmEngine`
(services/inference/vllm_engine.py), the real one, and `InstantEngine`
(services/inference/instant_engine.py), which answers at once without a model, for tests and for
measuring orchestration overhead. `make_engine` picks one from configuration
(JETBATCH_ENGINE=instant for the latter) and imports only that one, so nothing imports vLLM
before the vLLM engine starts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Protocol

import msgspec

from shared.config import ModelSpec, Settings

if TYPE_CHECKING:
    from services.inference.engine_load import EngineLoad

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"

# What vLLM's run_batch says for a streamed request; a batch line has nowhere to stream to.
STREAM_REFUSED = "Request must not be sent in stream mode"


class EngineResult(msgspec.Struct, kw_only=True, frozen=True):
    """One request's outcome. On success `body` is the response JSON exactly as `vllm serve`
    returns it; on failure `body` is None and the error fields say why. A status >= 500 means the
    engine failed rather than the request being wrong, so the caller may retry it."""

    status_code: int
    body: bytes | None = None
    error_code: str | None = None  # vLLM's error type, e.g. "BadRequestError"
    error_message: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    gpu_ms: int = 0  # what the worker measured of its engine (services/inference/engine_time.py)

    @property
    def ok(self) -> bool:
        return self.error_code is None and 200 <= self.status_code < 300


def bad_request(message: str) -> EngineResult:
    # Same type string vLLM uses for a request it rejects (create_error_response's default).
    return EngineResult(status_code=400, error_code="BadRequestError", error_message=message)


class Engine(Protocol):
    name: str  # "vllm" | "instant"
    capacity: int  # requests to keep in flight so the engine stays saturated
    # What the engine holds now, for admission (engine_load.py); None: not reported.
    load: EngineLoad | None

    async def start(self) -> None: ...

    async def run(
        self,
        endpoint: str,
        body: bytes,
        request_id: str,
        *,
        interactive: bool = False,
        batch_priority: int = 0,
    ) -> EngineResult:
        """`interactive`: a synchronous request, which goes ahead of the batch requests the
        engine holds. `batch_priority`: a batch request's batch priority, aged (priority.py)."""
        ...

    def answer_now(self, endpoint: str, body: bytes, request_id: str) -> EngineResult | None:
        """The answer if it needs no waiting (the worker then skips the per-request task), or
        None: the request goes through `run`."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def stop(self) -> None: ...


def make_engine(settings: Settings, spec: ModelSpec) -> Engine:
    # Imported here: both engine modules import this one.
    if settings.engine == "instant":
        from services.inference.instant_engine import InstantEngine

        return InstantEngine(
            spec, max_in_flight=settings.max_in_flight, delay_s=settings.instant_delay_s
        )
    from services.inference.vllm_engine import VllmEngine

    return VllmEngine(settings, spec)


# -- usage, read back from a response body ------------------------------------------------------


class _PromptTokensDetails(msgspec.Struct):
    cached_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int | None = None
    prompt_tokens_details: _PromptTokensDetails | None = None


class _UsageOnly(msgspec.Struct):
    usage: _Usage | None = None


# msgspec skips every field but `usage` without building it, so an embeddings body with
# thousands of floats costs almost nothing to read the counts from.
_usage_decoder = msgspec.json.Decoder(_UsageOnly)


def success(body: bytes) -> EngineResult:
    usage = _usage_decoder.decode(body).usage or _Usage()
    details = usage.prompt_tokens_details
    return EngineResult(
        status_code=200,
        body=body,
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens or 0,
        cached_tokens=(details.cached_tokens or 0) if details else 0,
    )


# -- in-flight bookkeeping --------------------------------------------------------------------


class InFlight:
    """Runs each request as its own task so `abort(request_id)` can cancel just that one."""

    def __init__(self) -> None:
        self._tasks: dict[str, set[asyncio.Task[EngineResult]]] = {}
        self._aborted: set[asyncio.Task[EngineResult]] = set()

    async def run(self, request_id: str, work: Awaitable[EngineResult]) -> EngineResult:
        task: asyncio.Task[EngineResult] = asyncio.ensure_future(work)
        self._tasks.setdefault(request_id, set()).add(task)
        try:
            # Awaiting the task (not shielding it) means cancelling the caller cancels the work.
            result = await task
        except asyncio.CancelledError:
            if _caller_cancelled():
                raise  # the caller itself was cancelled (shutdown, timeout): let it unwind
            result = _aborted()
        finally:
            aborted = task in self._aborted
            self._aborted.discard(task)
            tasks = self._tasks.get(request_id)
            if tasks is not None:
                tasks.discard(task)
                if not tasks:
                    del self._tasks[request_id]
        # vLLM's serving layer answers a cancellation with an error *response* ("Client
        # disconnected") rather than raising, so how the task ended does not say why it ended.
        if _caller_cancelled():
            raise asyncio.CancelledError
        return _aborted() if aborted else result

    def abort(self, request_id: str) -> bool:
        tasks = self._tasks.get(request_id, set())
        for task in tasks:
            self._aborted.add(task)
            task.cancel()
        return bool(tasks)

    def cancel_all(self) -> list[asyncio.Task[EngineResult]]:
        tasks = [t for group in self._tasks.values() for t in group]
        for task in tasks:
            self._aborted.add(task)
            task.cancel()
        return tasks


def _caller_cancelled() -> bool:
    current = asyncio.current_task()
    return current is not None and current.cancelling() > 0


def _aborted() -> EngineResult:
    # 499 ("client closed request"): the request was withdrawn, it did not fail.
    return EngineResult(
        status_code=499, error_code="request_aborted", error_message="Request was aborted"
    )
