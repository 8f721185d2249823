"""The result messages a worker publishes: an engine's answer, or an error line."""

from __future__ import annotations

import time

import msgspec

from schemas.messages import BatchStop, RequestMessage, ResultMessage
from schemas.projects import DEFAULT_PROJECT_ID
from services.inference.engine import EngineResult

_encoder = msgspec.json.Encoder()


def result_for(
    request_id: str,
    outcome: EngineResult,
    *,
    batch_id: str = "",
    line: int = 0,
    custom_id: str = "",
    worker_id: str = "",
    project: str = DEFAULT_PROJECT_ID,
) -> ResultMessage:
    body = outcome.body
    if body is None and outcome.status_code >= 400:
        # Keep OpenAI's shape: a rejected request's response body is an error object.
        body = _encoder.encode(
            {
                "error": {
                    "message": outcome.error_message or "request failed",
                    "type": outcome.error_code or "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            }
        )
    return ResultMessage(
        project=project,
        batch_id=batch_id,
        line=line,
        custom_id=custom_id,
        request_id=request_id,
        status_code=outcome.status_code,
        response_body=msgspec.Raw(body if body is not None else b"null"),
        error_code=outcome.error_code if outcome.status_code >= 300 else None,
        error_message=outcome.error_message if outcome.status_code >= 300 else None,
        input_tokens=outcome.input_tokens,
        output_tokens=outcome.output_tokens,
        cached_tokens=outcome.cached_tokens,
        worker_id=worker_id,
        finished_at_ms=int(time.time() * 1000),
        gpu_ms=outcome.gpu_ms,
    )


def error_result(
    req: RequestMessage, request_id: str, status_code: int, code: str, message: str, worker_id: str
) -> ResultMessage:
    """An error line that no engine answer produced (no response body)."""
    return ResultMessage.failure(
        batch_id=req.batch_id,
        line=req.line,
        custom_id=req.custom_id,
        request_id=request_id,
        status_code=status_code,
        code=code,
        message=message,
        worker_id=worker_id,
        project=req.project,
    )


def engine_failure(
    req: RequestMessage, request_id: str, error: str, worker_id: str
) -> ResultMessage:
    """The request crashed the engine on its last delivery: an error line, so the batch finishes."""
    return error_result(req, request_id, 500, "engine_error", error, worker_id)


def stopped_result(
    req: RequestMessage, request_id: str, stop: BatchStop, worker_id: str
) -> ResultMessage:
    """The request's batch was cancelled or expired before it ran (or while it ran)."""
    return error_result(req, request_id, 499, stop.error_code, stop.error_message, worker_id)
