"""Batch input files, line by line. Pure logic, no I/O beyond reading a local file.

Two passes use it: the cheap scan while a file uploads (line count and the models it names, so a
batch that cannot run is refused when it is created) and the full validation before a batch's
requests are published (every line checked; a bad file fails the batch with `errors` naming the
line). Both count only non-blank lines and split on `\\n`, so their counts agree.
"""

from __future__ import annotations

import sys
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import msgspec

from schemas.openai import BatchError, RequestLine
from services.api.children import Child, killed_on_error, output_of, serve_one_job, spawn
from services.api.tokens import TokenCounter
from shared.errors import clip

MAX_ERRORS = 100
MAX_SCANNED_MODELS = 16
# A model name noted by the upload scan is cut to this length: the file's model list stays small
# whatever the file names (no served model's name is longer).
MAX_MODEL_NAME_CHARS = 256
# A request line travels as one NATS message: what the message adds around the line (batch id,
# line number, endpoint, model, field names, the Nats-Msg-Id and trace headers) stays under this.
MESSAGE_OVERHEAD_BYTES = 4096
# The upload scan stops decoding a line past this size (its line is still counted): such a line
# is refused at validation anyway, and the scan must not buffer a huge line in memory.
MAX_SCAN_LINE_BYTES = 8 * 1024 * 1024
READ_CHUNK = 1024 * 1024
UTF8_BOM = b"\xef\xbb\xbf"


class _Body(msgspec.Struct):
    """The one field of a request body the batch needs; the rest travels untouched."""

    model: str | None = None


class _ScanLine(msgspec.Struct):
    body: _Body | None = None


# One Decoder per type, built once (msgspec perf tips).
_request_decoder = msgspec.json.Decoder(RequestLine)
_body_decoder = msgspec.json.Decoder(_Body)
_scan_decoder = msgspec.json.Decoder(_ScanLine)


def is_blank(line: bytes) -> bool:
    return not line or line.isspace()


class UploadScanner:
    """Counts the non-blank lines of a file as it streams in, in chunks of any size, and notes the
    distinct `body.model` values (at most `max_models`). Bad lines are counted and otherwise
    ignored: judging them is the batch validation's job."""

    def __init__(
        self, *, max_line_bytes: int = MAX_SCAN_LINE_BYTES, max_models: int = MAX_SCANNED_MODELS
    ) -> None:
        self.line_count = 0
        self.models: dict[str, None] = {}  # a dict keeps first-seen order
        self._max_line_bytes = max_line_bytes
        self._max_models = max_models
        self._parts: list[bytes] = []  # the current line's bytes so far, across chunks
        self._part_bytes = 0
        self._overflow = False  # the current line is too long to keep
        self._first = True

    def feed(self, data: bytes) -> None:
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            self._end_line(data[start:end])
            start = end + 1
        if start < len(data):
            self._keep(data[start:])

    def finish(self) -> None:
        if self._parts or self._overflow:
            self._end_line(b"")

    def _keep(self, piece: bytes) -> None:
        if self._overflow:
            return
        self._part_bytes += len(piece)
        if self._part_bytes > self._max_line_bytes:
            self._overflow = True
            self._parts.clear()
        else:
            self._parts.append(piece)

    def _end_line(self, tail: bytes) -> None:
        if self._overflow:
            self.line_count += 1  # too long to be blank
        else:
            line = b"".join((*self._parts, tail)) if self._parts else tail
            if self._first and line.startswith(UTF8_BOM):
                line = line[len(UTF8_BOM) :]
            if len(line) > self._max_line_bytes:
                self.line_count += 1
            elif not is_blank(line):
                self.line_count += 1
                if len(self.models) < self._max_models:
                    self._note_model(line)
        self._parts.clear()
        self._part_bytes = 0
        self._overflow = False
        self._first = False

    def _note_model(self, line: bytes) -> None:
        try:
            scanned = _scan_decoder.decode(line)
        except (msgspec.DecodeError, RecursionError):  # DecodeError covers ValidationError
            return
        if scanned.body is not None and scanned.body.model:
            self.models[scanned.body.model[:MAX_MODEL_NAME_CHARS]] = None


def iter_lines(f: IO[bytes], max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, line with its newline) for each line of `f`; None instead of the
    bytes for a line longer than `max_line_bytes`, which is read past without being kept."""
    number = 0
    while line := f.readline(max_line_bytes + 1):
        number += 1
        if number == 1 and line.startswith(UTF8_BOM):
            line = line[len(UTF8_BOM) :]
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
            while (rest := f.readline(READ_CHUNK)) and not rest.endswith(b"\n"):
                pass
            yield number, None
            continue
        yield number, line


@dataclass(frozen=True, slots=True)
class ValidLine:
    index: int  # 0-based among the non-blank lines: the `line` of the request message
    number: int  # 1-based line number in the file
    custom_id: str
    body: msgspec.Raw


class _Invalid(Exception):
    """What is wrong with one line; raised inside the validator, collected by `feed`."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


@dataclass
class LineValidator:
    """Checks request lines one by one against the batch's endpoint and the served models,
    collecting at most `max_errors` errors (one per line, the first thing wrong with it)."""

    endpoint: str
    models: Mapping[str, Sequence[str]]  # served model -> the endpoints it serves
    max_lines: int
    max_line_bytes: int
    max_errors: int = MAX_ERRORS
    model: str | None = None  # the batch's model: the first line's
    count: int = 0  # non-blank lines seen
    errors: list[BatchError] = field(default_factory=list)
    _model_line: int = 0
    _custom_ids: set[str] = field(default_factory=set)
    _too_many: bool = False

    @property
    def done(self) -> bool:
        """Nothing more worth reading: the error list is full or the file is too long."""
        return self._too_many or len(self.errors) >= self.max_errors

    def feed(self, number: int, line: bytes | None) -> ValidLine | None:
        """Check one line (None = longer than max_line_bytes). Returns it when it is a valid
        request, None for a blank or bad line (a bad one adds to `errors`)."""
        if line is not None and is_blank(line):
            return None
        self.count += 1
        try:
            return self._check(number, line)
        except _Invalid as e:
            self._add(BatchError(code=e.code, message=e.message, param=e.param, line=number))
        except RecursionError:  # msgspec's limit on nesting, for the line or its body
            message = "the line is not valid JSON: it is nested too deeply"
            self._add(BatchError(code="invalid_json_line", message=message, line=number))
        return None

    def finish(self) -> list[BatchError]:
        if self.count == 0 and not self.errors:
            self._add(BatchError(code="empty_file", message="the file has no requests"))
        return self.errors

    def _add(self, error: BatchError) -> None:
        if len(self.errors) < self.max_errors:
            self.errors.append(error)

    def _check(self, number: int, line: bytes | None) -> ValidLine:
        if self.count > self.max_lines:
            self._too_many = True
            raise _Invalid(
                "too_many_requests",
                f"the file has more than {self.max_lines} requests, the most one batch may hold",
            )
        if line is None or len(line) - line.endswith(b"\n") > self.max_line_bytes:
            raise _Invalid(
                "request_too_large",
                f"the line is larger than {self.max_line_bytes} bytes, the largest request "
                "this deployment carries",
            )
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Invalid("invalid_utf8", f"the line is not valid UTF-8: {e.reason}") from None
        try:
            request = _request_decoder.decode(line)
        except msgspec.DecodeError:
            raise self._diagnose(line) from None
        if not request.custom_id:
            raise _Invalid("missing_custom_id", "custom_id must be a non-empty string", "custom_id")
        if "\x00" in request.custom_id or len(request.custom_id) > 512:
            # PostgreSQL text cannot hold NUL; a 512-char cap keeps ids ids.
            raise _Invalid(
                "invalid_custom_id",
                "custom_id must be at most 512 characters and contain no NUL character",
                "custom_id",
            )
        if request.custom_id in self._custom_ids:
            raise _Invalid(
                "duplicate_custom_id",
                f"custom_id {clip(request.custom_id)!r} is used by an earlier line; each line needs "
                "its own",
                "custom_id",
            )
        self._custom_ids.add(request.custom_id)
        if request.method != "POST":
            raise _Invalid(
                "invalid_method", f'method must be "POST", got {clip(request.method)!r}', "method"
            )
        if request.url != self.endpoint:
            raise _Invalid(
                "mismatched_url",
                f"url {clip(request.url)!r} does not match the batch's endpoint {self.endpoint!r}",
                "url",
            )
        try:
            body = _body_decoder.decode(request.body)
        except msgspec.DecodeError:
            if not isinstance(msgspec.json.decode(request.body), dict):
                raise _Invalid("invalid_body", "body must be a JSON object", "body") from None
            raise _Invalid("missing_model", "body.model must be a string", "body.model") from None
        if not body.model:
            raise _Invalid("missing_model", "body.model must name the model to run", "body.model")
        if self.model is None:
            self.model, self._model_line = body.model, number
            self._check_model(body.model)
        elif body.model != self.model:
            raise _Invalid(
                "mixed_models",
                f"body.model {clip(body.model)!r} differs from {clip(self.model)!r} on line "
                f"{self._model_line}: a batch runs a single model",
                "body.model",
            )
        return ValidLine(
            index=self.count - 1, number=number, custom_id=request.custom_id, body=request.body
        )

    def _check_model(self, model: str) -> None:
        served = self.models.get(model)
        if served is None:
            names = ", ".join(self.models) or "none"
            raise _Invalid(
                "model_not_found",
                f"model {clip(model)!r} is not served by this deployment (served: {names})",
                "body.model",
            )
        if self.endpoint not in served:
            raise _Invalid(
                "unsupported_endpoint",
                f"model {clip(model)!r} does not serve {self.endpoint} (it serves "
                f"{', '.join(served)})",
                "body.model",
            )

    def _diagnose(self, line: bytes) -> _Invalid:
        """The slow path for a line the typed decoder refused: say what exactly is wrong."""
        try:
            obj = msgspec.json.decode(line)
        except msgspec.DecodeError as e:
            return _Invalid("invalid_json_line", f"the line is not valid JSON: {e}")
        if not isinstance(obj, dict):
            return _Invalid("invalid_json_line", "the line is not a JSON object")
        custom_id = obj.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            return _Invalid(
                "missing_custom_id", "custom_id must be a non-empty string", "custom_id"
            )
        if not isinstance(obj.get("method"), str):
            return _Invalid("invalid_method", 'method must be "POST"', "method")
        if not isinstance(obj.get("url"), str):
            return _Invalid(
                "mismatched_url", f"url must be the batch's endpoint {self.endpoint!r}", "url"
            )
        if "body" not in obj:
            return _Invalid("invalid_body", "body is missing", "body")
        return _Invalid("invalid_request_line", "the line is not a valid request")


@dataclass(frozen=True, slots=True)
class FileCheck:
    model: str | None
    count: int
    errors: list[BatchError]
    input_tokens: int = 0  # of a valid file (services/api/tokens.py)
    token_note: str | None = None  # why its tokens were estimated, not counted


def validate_file(
    path: Path,
    *,
    endpoint: str,
    models: Mapping[str, Sequence[str]],
    max_lines: int,
    max_line_bytes: int,
    tokenizers: Mapping[str, str] | None = None,
) -> FileCheck:
    """Pass 1 over a batch input file: stream it, check every line, and count a valid file's
    input tokens (with its model's tokenizer when `tokenizers` names one: model -> directory;
    by estimate otherwise). Blocking: run it in a thread, or in a child process
    (ValidationJob, validate_in_child)."""
    validator = LineValidator(
        endpoint=endpoint, models=models, max_lines=max_lines, max_line_bytes=max_line_bytes
    )
    counter: TokenCounter | None = None
    with open(path, "rb") as f:
        for number, line in iter_lines(f, max_line_bytes):
            valid = validator.feed(number, line)
            if valid is not None and not validator.errors:  # a file with errors is not counted
                if counter is None:
                    tokenizer = (tokenizers or {}).get(validator.model or "")
                    counter = TokenCounter(endpoint, tokenizer)
                counter.add(valid.body)
            if validator.done:
                break
    errors = validator.finish()
    if errors or counter is None:
        return FileCheck(model=validator.model, count=validator.count, errors=errors)
    return FileCheck(
        model=validator.model,
        count=validator.count,
        errors=errors,
        input_tokens=counter.finish(),
        token_note=counter.note,
    )


class ValidationJob(msgspec.Struct, frozen=True):
    """A pass 1 to run: in a thread (`run`) or in a child process (`validate_in_child`)."""

    path: str
    endpoint: str
    models: dict[str, list[str]]
    max_lines: int
    max_line_bytes: int
    # model -> its tokenizer's directory, for the models whose tokens are counted, not estimated
    tokenizers: dict[str, str] = msgspec.field(default_factory=dict)

    def run(self) -> FileCheck:
        return validate_file(
            Path(self.path),
            endpoint=self.endpoint,
            models=self.models,
            max_lines=self.max_lines,
            max_line_bytes=self.max_line_bytes,
            tokenizers=self.tokenizers,
        )


async def validate_in_child(job: ValidationJob, child: Child | None = None) -> FileCheck:
    """`job.run()` in a child process (`python -m services.api.validation [NICE]`; `child`, one
    started ahead, or a new one): pass 1 over a 200 MB file is seconds of CPU that, in a thread,
    would hold the GIL against the api's event loop and stall every request it serves. The
    child imports only this module (~0.1 s)."""
    if child is None:
        child = await spawn(CHILD_MODULE)
    with killed_on_error(child):
        out, err = await child.communicate(msgspec.json.encode(job))
    out = output_of(child, out, err, f"validation of {job.path}", job.path)
    return msgspec.json.decode(out, type=FileCheck)


CHILD_MODULE = "services.api.validation"


def _child_main() -> int:
    return serve_one_job(ValidationJob, ValidationJob.run)


if __name__ == "__main__":
    sys.exit(_child_main())


def iter_requests(
    path: Path, max_line_bytes: int
) -> Generator[tuple[int, RequestLine], None, None]:
    """Pass 2 over a file pass 1 found valid: (0-based index among non-blank lines, request)."""
    index = 0
    with open(path, "rb") as f:
        for _, line in iter_lines(f, max_line_bytes):
            if line is None:
                raise ValueError("a line grew past the size limit after validation")
            if is_blank(line):
                continue
            yield index, _request_decoder.decode(line)
            index += 1
