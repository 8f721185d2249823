"""`/v1/models` (served models and their live workers) and synchronous inference:
`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings` over NATS core request/reply on
`jetbatch.interactive.<model>.<project>` (InteractiveRequest out, the worker's ResultMessage back). A
request the api stops waiting for (its client gone, no answer in time) is aborted on the worker
with an InteractiveAbort on `jetbatch.interactive.abort.<model>.<project>`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from typing import Any

import msgspec
import nats.errors
from litestar import Request, Response, get, post

from schemas.messages import InteractiveAbort, InteractiveRequest, ResultMessage
from schemas.openai import ErrorDetail, ErrorResponse, Model, ModelList
from schemas.projects import DEFAULT_PROJECT_ID
from services.api.admin import read_heartbeats
from services.api.concurrency import caller_of
from services.api.deps import DepsParam
from services.api.exceptions import BadGateway, error_type
from services.api.rate_limits import estimate_tokens
from shared.config import ModelSpec
from shared.errors import (
    ApiError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    Unavailable,
    UpstreamTimeout,
    clip,
)
from shared.ids import new_id

log = logging.getLogger(__name__)

# A worker counts as live while its last heartbeat is younger than this many intervals.
LIVE_HEARTBEATS = 3


class _SyncBody(msgspec.Struct):
    """What the api reads of a synchronous request body; the rest goes to the worker as is."""

    model: str
    stream: Any = None
    max_tokens: Any = None  # what the request may cost in tokens (rate_limits.estimate_tokens)
    max_completion_tokens: Any = None


class ClientClosed(ApiError):
    """The client went away before its answer came (nginx's 499): nobody reads this response."""

    status_code = 499


_sync_decoder = msgspec.json.Decoder(_SyncBody)
_result_decoder = msgspec.json.Decoder(ResultMessage)
_encoder = msgspec.json.Encoder()


async def live_workers(deps: DepsParam) -> Counter[str]:
    """Live workers per model, from every heartbeat in the workers KV bucket."""
    cutoff = time.time() - LIVE_HEARTBEATS * deps.settings.heartbeat_interval_s
    return Counter(b.model for b in await read_heartbeats(deps) if b.seen_at >= cutoff)


def _model(spec: ModelSpec, created: int, workers: int) -> Model:
    return Model(
        id=spec.name, created=created, endpoints=list(spec.endpoints), live_workers=workers
    )


@get("/models")
async def list_models(deps: DepsParam) -> ModelList:
    counts = await live_workers(deps)
    return ModelList(
        data=[_model(m, deps.started_at, counts[m.name]) for m in deps.settings.models]
    )


@get("/models/{model_id:path}")
async def retrieve_model(model_id: str, deps: DepsParam) -> Model:
    # Model names may hold slashes (org/name); Litestar's path params keep the leading one.
    name = model_id.lstrip("/")
    spec = deps.settings.model(name)
    if spec is None:
        raise NotFound(
            f"The model {clip(name)!r} does not exist or is not served here", param="model",
            code="model_not_found",
        )  # fmt: skip
    counts = await live_workers(deps)
    return _model(spec, deps.started_at, counts[spec.name])


def _error_body(result: ResultMessage) -> bytes:
    return _encoder.encode(
        ErrorResponse(
            error=ErrorDetail(
                message=result.error_message or "the request failed",
                type=error_type(result.status_code),
                code=result.error_code,
            )
        )
    )


async def _infer(
    request: Request[Any, Any, Any], deps: DepsParam, endpoint: str
) -> Response[bytes]:
    deps.sync_seen = time.monotonic()
    with deps.sync_slots.take(caller_of(request)):
        return await _infer_in_slot(request, deps, endpoint)


async def _client_gone(request: Request[Any, Any, Any]) -> None:
    """Returns when the client disconnects (the body is read: `receive` waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _ask(request: Request[Any, Any, Any], nc: Any, message: InteractiveRequest,
               payload: bytes, timeout_s: float) -> Any:  # fmt: skip
    """`nc.request`, abandoned as soon as the client goes away. A request abandoned after a
    worker may have taken it (the client gone, no answer in time, the api stopping) is aborted
    there too: an InteractiveAbort to the model's workers stops its work in the engine."""
    subject = InteractiveRequest.subject_for(message.model, message.project)
    asked = asyncio.ensure_future(nc.request(subject, payload, timeout=timeout_s))
    gone = asyncio.ensure_future(_client_gone(request))
    gave_up: str | None = "abandoned"  # why, while no answer came
    try:
        await asyncio.wait((asked, gone), return_when=asyncio.FIRST_COMPLETED)
        if not asked.done() or asked.cancelled():
            gave_up = "client_closed"
            raise ClientClosed("the client closed the connection before the answer came")
        try:
            reply = asked.result()
        except nats.errors.NoRespondersError:
            gave_up = None  # no worker took it
            raise
        except (TimeoutError, nats.errors.TimeoutError):
            gave_up = "timeout"
            raise
        gave_up = None
        return reply
    finally:
        for task in (asked, gone):
            task.cancel()
        with contextlib.suppress(BaseException):
            await gone
        if gave_up is not None:
            await _abort(nc, message, gave_up)
        # An exception raised here holds this frame (its traceback), and the task holds the
        # exception: without this the cycle keeps the request's body and payload alive until
        # the cyclic GC runs, so each large failed request would add its size to the api's
        # memory for a while (tests/integration/test_hostile_memory.py).
        asked = gone = None  # type: ignore[assignment]
        payload = message = None  # type: ignore[assignment]


async def _abort(nc: Any, message: InteractiveRequest, reason: str) -> None:
    """Tell the model's workers to stop a request the api no longer waits for (core NATS, no
    reply: the worker running it aborts it, the others ignore it)."""
    abort = InteractiveAbort(request_id=message.request_id, reason=reason)
    try:
        await nc.publish(
            InteractiveAbort.subject_for(message.model, message.project), _encoder.encode(abort)
        )
    except Exception as e:  # the worker then finishes it; nobody reads the answer
        log.warning("request %s: abort not sent (%s): %r", message.request_id, reason, e)
    else:
        log.info(
            "request %s: given up (%s), its worker told to abort it", message.request_id, reason
        )


def _checked(raw: bytes, deps: DepsParam, endpoint: str) -> _SyncBody:
    """What the api reads of a synchronous request, refused here if it can tell it is bad."""
    try:
        probe = _sync_decoder.decode(raw)
    except msgspec.DecodeError as e:
        raise InvalidRequest(
            f"the body must be a JSON object with a string 'model': {e}", param="model"
        ) from None
    spec = deps.settings.model(probe.model)
    if spec is None:
        served = ", ".join(m.name for m in deps.settings.models) or "none"
        raise NotFound(
            f"The model {clip(probe.model)!r} does not exist or is not served here (served: "
            f"{served})",
            param="model",
            code="model_not_found",
        )
    if endpoint not in spec.endpoints:
        raise InvalidRequest(
            f"model {clip(probe.model)!r} does not serve {endpoint} (it serves "
            f"{', '.join(spec.endpoints)})",
            param="model",
        )
    if probe.stream is True:
        raise InvalidRequest("streaming is not supported by this deployment", param="stream")
    return probe


async def _infer_in_slot(
    request: Request[Any, Any, Any], deps: DepsParam, endpoint: str
) -> Response[bytes]:
    raw = await request.body()
    probe = _checked(raw, deps, endpoint)
    caller = getattr(request.state, "caller", None)
    limit_headers = (
        {}
        if caller is None
        else await deps.rate_limiter.admit(
            caller.project_id,
            probe.model,
            estimate_tokens(raw, probe.max_completion_tokens or probe.max_tokens),
        )
    )
    message = InteractiveRequest(
        request_id=new_id("req_"),
        endpoint=endpoint,
        model=probe.model,
        body=msgspec.Raw(raw),
        project=caller.project_id if caller is not None else DEFAULT_PROJECT_ID,
    )
    payload = _encoder.encode(message)
    if len(payload) > deps.nc.max_payload:
        raise PayloadTooLarge(
            f"the request is larger than {deps.nc.max_payload} bytes, the largest this deployment "
            "carries"
        )
    subject = InteractiveRequest.subject_for(probe.model, message.project)
    nc = deps.nc_sync or deps.nc
    try:
        reply = await _ask(request, nc, message, payload, deps.settings.sync_timeout_s)
    except nats.errors.NoRespondersError:
        raise Unavailable(
            f"no live worker for model {probe.model}", code="no_live_worker"
        ) from None
    except (TimeoutError, nats.errors.TimeoutError):
        raise UpstreamTimeout(
            f"model {probe.model} did not answer within {deps.settings.sync_timeout_s:g}s",
            code="worker_timeout",
        ) from None
    try:
        result = _result_decoder.decode(reply.data)
    except msgspec.DecodeError:
        log.error("request %s: undecodable reply on %s", message.request_id, subject)
        raise BadGateway("the worker sent an undecodable reply") from None
    deps.sync_usage.add(
        (message.project, message.model, caller.key_id if caller else None, endpoint),
        ok=result.status_code < 300,
        input_tokens=result.input_tokens,
        cached_tokens=result.cached_tokens,
        output_tokens=result.output_tokens,
        gpu_ms=result.gpu_ms,
    )
    body = bytes(result.response_body) if result.response_body is not None else b"null"
    if body == b"null":  # a Raw field decodes JSON null as Raw(b"null"), not None
        body = _error_body(result)
    return Response(
        body,
        status_code=result.status_code,
        media_type="application/json",
        headers={"x-request-id": result.request_id or message.request_id, **limit_headers},
    )


@post("/chat/completions", status_code=200)
async def chat_completions(request: Request[Any, Any, Any], deps: DepsParam) -> Response[bytes]:
    return await _infer(request, deps, "/v1/chat/completions")


@post("/completions", status_code=200)
async def completions(request: Request[Any, Any, Any], deps: DepsParam) -> Response[bytes]:
    return await _infer(request, deps, "/v1/completions")


@post("/embeddings", status_code=200)
async def embeddings(request: Request[Any, Any, Any], deps: DepsParam) -> Response[bytes]:
    return await _infer(request, deps, "/v1/embeddings")


ROUTES = [list_models, retrieve_model, chat_completions, completions, embeddings]
