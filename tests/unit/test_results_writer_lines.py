"""Output and error file lines of the results writer, decoded back as OpenAI's OutputLine."""

from __future__ import annotations

import json

import msgspec
import pytest

from schemas.messages import ResultMessage
from schemas.openai import OutputLine
from services.results_writer.service import output_file_id, output_line, result_record
from shared.ids import stable_id

BATCH = "batch_abc"
CHAT_BODY = '{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"h\\u00e9llo \\"x\\""}}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}'
ERROR_BODY = '{"error":{"message":"max_tokens is too large","type":"BadRequestError","param":"max_tokens","code":400}}'


def encode_decode(line: OutputLine) -> tuple[OutputLine, dict]:
    data = msgspec.json.encode(line)
    return msgspec.json.decode(data, type=OutputLine), json.loads(data)


def test_successful_line_carries_the_raw_response_body_and_no_error() -> None:
    line = output_line(
        BATCH,
        "req-1",
        ok=True,
        status_code=200,
        request_id="req_123",
        response_body=CHAT_BODY,
        error_code=None,
        error_message=None,
    )
    decoded, plain = encode_decode(line)

    assert decoded.id == stable_id("batch_req_", BATCH, "req-1")
    assert decoded.id.startswith("batch_req_")
    assert decoded.custom_id == "req-1"
    assert decoded.error is None
    assert decoded.response is not None
    assert decoded.response.status_code == 200
    assert decoded.response.request_id == "req_123"
    assert json.loads(bytes(decoded.response.body)) == json.loads(CHAT_BODY)
    # OpenAI writes both keys on every line, null when unset.
    assert set(plain) == {"id", "custom_id", "response", "error"}
    assert plain["error"] is None


def test_engine_error_keeps_the_response_and_has_no_error() -> None:
    line = output_line(
        BATCH,
        "req-2",
        ok=False,
        status_code=400,
        request_id="req_456",
        response_body=ERROR_BODY,
        error_code="BadRequestError",
        error_message="max_tokens is too large",
    )
    decoded, plain = encode_decode(line)

    assert decoded.error is None and plain["error"] is None
    assert decoded.response is not None
    assert decoded.response.status_code == 400
    assert json.loads(bytes(decoded.response.body))["error"]["param"] == "max_tokens"


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("batch_expired", "This request could not be executed before the batch expired."),
        ("batch_cancelled", "The batch was cancelled."),
    ],
)
def test_batch_level_error_has_an_error_and_no_response(code: str, message: str) -> None:
    line = output_line(
        BATCH,
        "req-3",
        ok=False,
        status_code=0,
        request_id="",
        response_body=None,
        error_code=code,
        error_message=message,
    )
    decoded, plain = encode_decode(line)

    assert decoded.response is None and plain["response"] is None
    assert decoded.error is not None
    assert (decoded.error.code, decoded.error.message) == (code, message)


def test_failure_without_message_still_says_something() -> None:
    line = output_line(
        BATCH,
        "req-4",
        ok=False,
        status_code=500,
        request_id="r",
        response_body=None,
        error_code=None,
        error_message=None,
    )
    decoded, _ = encode_decode(line)
    assert decoded.error is not None and "500" in decoded.error.message


def test_line_and_file_ids_are_stable_and_distinct() -> None:
    a = output_line(
        BATCH,
        "x",
        ok=True,
        status_code=200,
        request_id="r",
        response_body="{}",
        error_code=None,
        error_message=None,
    )
    b = output_line(
        BATCH,
        "x",
        ok=True,
        status_code=200,
        request_id="r2",
        response_body="{}",
        error_code=None,
        error_message=None,
    )
    c = output_line(
        "batch_other",
        "x",
        ok=True,
        status_code=200,
        request_id="r",
        response_body="{}",
        error_code=None,
        error_message=None,
    )
    assert a.id == b.id != c.id
    assert output_file_id(BATCH, "output") == output_file_id(BATCH, "output")
    assert output_file_id(BATCH, "output") != output_file_id(BATCH, "error")
    assert output_file_id(BATCH, "output").startswith("file-")


def test_result_record_marks_ok_and_keeps_body_text() -> None:
    raw = msgspec.json.encode(
        {
            "batch_id": BATCH,
            "custom_id": "c",
            "line": 7,
            "request_id": "r",
            "status_code": 200,
            "response_body": json.loads(CHAT_BODY),
            "input_tokens": 3,
            "output_tokens": 2,
            "cached_tokens": 1,
        }
    )
    record = result_record(msgspec.json.decode(raw, type=ResultMessage))
    assert record[:6] == (BATCH, "c", 7, True, 200, "r")
    assert json.loads(record[6] or "") == json.loads(CHAT_BODY)
    assert record[9:12] == (3, 1, 2)
    assert record[12] is None  # no finished_at_ms: the row gets the time it is written

    finished = ResultMessage(
        batch_id=BATCH,
        custom_id="c",
        line=7,
        request_id="r",
        status_code=200,
        finished_at_ms=1_700_000_123_456,
    )
    assert result_record(finished)[12] == 1_700_000_123

    failed = ResultMessage(
        batch_id=BATCH,
        custom_id="d",
        line=8,
        request_id="r",
        status_code=200,
        error_code="batch_expired",
        error_message="late",
    )
    assert result_record(failed)[3] is False
    assert result_record(failed)[6] is None


def test_result_with_a_body_that_is_not_utf8_is_refused() -> None:
    bad = ResultMessage(
        batch_id=BATCH,
        custom_id="e",
        line=9,
        request_id="r",
        status_code=200,
        response_body=msgspec.Raw(b'"\xff"'),
    )
    with pytest.raises(ValueError):
        result_record(bad)
