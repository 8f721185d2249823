"""What results become: request_results rows, and the lines of a batch's output and error files
as OpenAI writes them."""

from __future__ import annotations

from typing import Literal

import msgspec

from schemas.messages import ResultMessage
from schemas.openai import LineError, LineResponse, OutputLine
from services.results_writer import store
from shared.ids import stable_id


def unstorable(result: ResultMessage, reason: str) -> ResultMessage:
    """The error line that stands in for a result PostgreSQL refused."""
    return ResultMessage.failure(
        batch_id=result.batch_id,
        line=result.line,
        custom_id=result.custom_id,
        request_id=result.request_id,
        status_code=500,
        code="dead_lettered",
        message=f"the result of this request could not be stored ({reason[:200]}); it was kept "
        "as a dead letter",
        worker_id=result.worker_id,
        project=result.project,
    )


def result_record(result: ResultMessage) -> store.ResultRecord:
    """A request_results row; raises ValueError if the body is not UTF-8 (a poisoned message)."""
    body: str | None = None if result.response_body is None else str(result.response_body, "utf-8")
    if body == "null":
        # msgspec cannot tell `Raw | None` apart: a missing or null body decodes as Raw("null").
        body = None
    return (
        result.batch_id,
        result.custom_id,
        result.line,
        result.ok,
        result.status_code,
        result.request_id,
        body,
        result.error_code,
        result.error_message,
        result.input_tokens,
        result.cached_tokens,
        result.output_tokens,
        result.finished_at_ms // 1000 if result.finished_at_ms > 0 else None,
        max(0, result.gpu_ms),
        result.project,
    )


def output_line(
    batch_id: str,
    custom_id: str,
    *,
    ok: bool,
    status_code: int,
    request_id: str,
    response_body: str | None,
    error_code: str | None,
    error_message: str | None,
) -> OutputLine:
    """One line of the output (ok) or error file, as OpenAI writes it.

    A request the engine answered, even with an error object, keeps its response and has no
    `error`; one that never got an answer (expired, cancelled, dead-lettered) has only `error`.
    """
    line_id = stable_id("batch_req_", batch_id, custom_id)
    if response_body is not None or ok:
        body = msgspec.Raw(response_body.encode() if response_body is not None else b"null")
        response = LineResponse(status_code=status_code, request_id=request_id, body=body)
        return OutputLine(id=line_id, custom_id=custom_id, response=response, error=None)
    message = error_message or f"request failed with status {status_code}"
    return OutputLine(
        id=line_id,
        custom_id=custom_id,
        response=None,
        error=LineError(code=error_code, message=message),
    )


def output_file_id(batch_id: str, kind: Literal["output", "error"]) -> str:
    # Deterministic, so a finalization redone after a crash rewrites the same files.
    return stable_id("file-", batch_id, kind)


def event_id(batch_id: str, type_: str) -> str:
    return stable_id("evt_", batch_id, type_)
