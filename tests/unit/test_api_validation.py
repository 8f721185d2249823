"""The api's batch-file checks: the full line validator (pass 1 before publishing) and the cheap
scan done while a file uploads."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import msgspec
import pytest

from services.api.children import spawn
from services.api.validation import (
    CHILD_MODULE,
    LineValidator,
    UploadScanner,
    ValidationJob,
    iter_lines,
    iter_requests,
    validate_file,
    validate_in_child,
)
from tests.helpers import CHAT, chat_body, request_line

MODELS = {
    "chat-model": ("/v1/chat/completions", "/v1/completions"),
    "embed-model": ("/v1/embeddings",),
}


def line(custom_id: Any, *, body: Any = None, model: str = "chat-model", **fields: Any) -> bytes:
    """A request line for MODELS' chat model; `body` replaces the whole body."""
    return request_line(custom_id, chat_body("hi", model=model) if body is None else body, **fields)


def validate(
    *lines: bytes, endpoint: str = CHAT, max_lines: int = 100, max_line_bytes: int = 1 << 20
) -> LineValidator:
    validator = LineValidator(
        endpoint=endpoint, models=MODELS, max_lines=max_lines, max_line_bytes=max_line_bytes
    )
    for number, raw in iter_lines(io.BytesIO(b"".join(lines)), max_line_bytes):
        validator.feed(number, raw)
        if validator.done:
            break
    validator.finish()
    return validator


def codes(validator: LineValidator) -> list[tuple[str, int | None]]:
    return [(e.code, e.line) for e in validator.errors]


def test_a_good_file_has_no_errors_and_names_its_model() -> None:
    v = validate(line("a"), b"\n", line("b"), b"   \r\n", line("c"))
    assert v.errors == []
    assert v.model == "chat-model"
    assert v.count == 3


def test_valid_lines_are_numbered_among_non_blank_lines() -> None:
    validator = LineValidator(endpoint=CHAT, models=MODELS, max_lines=10, max_line_bytes=1 << 20)
    assert validator.feed(1, b"\n") is None
    first = validator.feed(2, line("a"))
    second = validator.feed(3, line("b"))
    assert first is not None and second is not None
    assert (first.index, first.number, first.custom_id) == (0, 2, "a")
    assert (second.index, second.number) == (1, 3)
    assert msgspec.json.decode(second.body)["model"] == "chat-model"


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (b"\xff\xfe not utf-8\n", "invalid_utf8"),
        (b"{not json\n", "invalid_json_line"),
        (b"[1, 2, 3]\n", "invalid_json_line"),
        (b'"a string"\n', "invalid_json_line"),
        (line(None), "missing_custom_id"),
        (line(""), "missing_custom_id"),
        (line(42), "missing_custom_id"),
        (b'{"method": "POST", "url": "/v1/chat/completions", "body": {"model": "chat-model"}}\n',
         "missing_custom_id"),
        (line("a\x00b"), "invalid_custom_id"),
        (line("x" * 513), "invalid_custom_id"),
        (line("x", method="GET"), "invalid_method"),
        (line("x", method=None), "invalid_method"),
        (line("x", url="/v1/embeddings"), "mismatched_url"),
        (line("x", url=None), "mismatched_url"),
        (line("x", body=[1, 2]), "invalid_body"),
        (line("x", body="text"), "invalid_body"),
        (b'{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions"}\n', "invalid_body"),
        (line("x", body={"messages": []}), "missing_model"),
        (line("x", body={"model": 7}), "missing_model"),
    ],
)  # fmt: skip
def test_a_bad_line_is_reported_with_its_code_and_line_number(bad: bytes, code: str) -> None:
    v = validate(line("ok"), b"\n", bad)
    assert codes(v) == [(code, 3)]
    assert v.errors[0].message


@pytest.mark.parametrize(
    ("model", "code"), [("nope", "model_not_found"), ("embed-model", "unsupported_endpoint")]
)
def test_the_model_of_the_first_request_must_serve_the_endpoint(model: str, code: str) -> None:
    v = validate(b"\n", line("x", model=model), line("y", model=model))
    assert codes(v) == [(code, 2)]  # once, not for every line of that model
    assert v.errors[0].param == "body.model"
    if code == "model_not_found":
        assert "chat-model, embed-model" in v.errors[0].message


def test_a_duplicate_custom_id_names_the_second_line() -> None:
    v = validate(line("a"), line("b"), line("a"))
    assert codes(v) == [("duplicate_custom_id", 3)]
    assert "'a'" in v.errors[0].message
    assert v.errors[0].param == "custom_id"


def test_a_second_model_is_mixed_models() -> None:
    models = dict(MODELS, **{"other-chat": ("/v1/chat/completions",)})
    validator = LineValidator(endpoint=CHAT, models=models, max_lines=10, max_line_bytes=1 << 20)
    validator.feed(1, line("a"))
    validator.feed(2, line("b", model="other-chat"))
    validator.feed(3, line("c"))
    assert codes(validator) == [("mixed_models", 2)]
    assert "line 1" in validator.errors[0].message


def test_an_empty_file_fails_without_a_line_number() -> None:
    v = validate(b"\n", b"  \n")
    assert codes(v) == [("empty_file", None)]


def test_too_many_lines_stops_the_validation() -> None:
    v = validate(*(line(f"r{i}") for i in range(5)), max_lines=3)
    assert codes(v) == [("too_many_requests", 4)]
    assert v.done


def test_an_oversize_line_is_reported_and_skipped() -> None:
    big = line("big", body={"model": "chat-model", "prompt": "x" * 5000})
    v = validate(line("a"), big, line("c"), max_line_bytes=1000)
    assert codes(v) == [("request_too_large", 2)]
    assert v.count == 3


def test_a_line_exactly_at_the_size_limit_is_accepted() -> None:
    good = line("a")
    v = validate(good, max_line_bytes=len(good) - 1)  # the newline does not count
    assert v.errors == []


def test_errors_are_capped_at_one_hundred() -> None:
    v = validate(*(b"nope\n" for _ in range(150)))
    assert len(v.errors) == 100
    assert v.done


def test_a_utf8_bom_at_the_start_is_ignored() -> None:
    v = validate(b"\xef\xbb\xbf" + line("a"), line("b"))
    assert v.errors == []


def test_crlf_line_endings_are_accepted() -> None:
    v = validate(line("a").replace(b"\n", b"\r\n"), line("b").replace(b"\n", b"\r\n"))
    assert v.errors == []


def test_validate_file_and_iter_requests_agree(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(line("a") + b"\n" + line("b") + line("c"))
    check = validate_file(path, endpoint=CHAT, models=MODELS, max_lines=10, max_line_bytes=1 << 20)
    assert (check.model, check.count, check.errors) == ("chat-model", 3, [])
    requests = list(iter_requests(path, 1 << 20))
    assert [(i, r.custom_id) for i, r in requests] == [(0, "a"), (1, "b"), (2, "c")]


def test_validate_file_reports_the_physical_line(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(line("a") + b"\n\n" + line("b", method="PUT"))
    check = validate_file(path, endpoint=CHAT, models=MODELS, max_lines=10, max_line_bytes=1 << 20)
    assert [(e.code, e.line, e.param) for e in check.errors] == [("invalid_method", 4, "method")]


def job(path: Path) -> ValidationJob:
    models = {name: list(endpoints) for name, endpoints in MODELS.items()}
    return ValidationJob(
        path=str(path), endpoint=CHAT, models=models, max_lines=10, max_line_bytes=1 << 20
    )


async def test_a_child_process_validates_exactly_as_validate_file(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(line("a") + b"\n" + line("a") + b"\n" + line("b", method="PUT") + b"{oops\n")
    in_child = await validate_in_child(job(path), await spawn(CHILD_MODULE, ["3"]))
    assert in_child == validate_file(
        path, endpoint=CHAT, models=MODELS, max_lines=10, max_line_bytes=1 << 20
    )
    assert [e.code for e in in_child.errors] == [
        "duplicate_custom_id",
        "invalid_method",
        "invalid_json_line",
    ]


async def test_a_child_process_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await validate_in_child(job(tmp_path / "gone.jsonl"))


@pytest.mark.parametrize("chunk", [1, 2, 7, 64, 1 << 20])
def test_the_upload_scan_counts_lines_and_models_in_any_chunking(chunk: int) -> None:
    data = (
        b"\xef\xbb\xbf"
        + line("a")
        + b"\n  \n"
        + line("b", model="embed-model")
        + b"garbage line\n"
        + line("c")
        + line("d", body={"model": 3})
        + line("e").rstrip(b"\n")  # no final newline
    )
    scanner = UploadScanner()
    for i in range(0, len(data), chunk):
        scanner.feed(data[i : i + chunk])
    scanner.finish()
    assert scanner.line_count == 6
    assert list(scanner.models) == ["chat-model", "embed-model"]


def test_the_upload_scan_caps_models_and_skips_long_lines() -> None:
    scanner = UploadScanner(max_line_bytes=500, max_models=2)
    for i in range(5):
        scanner.feed(line(f"r{i}", model=f"m{i}"))
    scanner.feed(line("long", body={"model": "huge", "prompt": "x" * 2000}))
    scanner.finish()
    assert scanner.line_count == 6
    assert list(scanner.models) == ["m0", "m1"]
