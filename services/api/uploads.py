"""Streaming multipart/form-data for `POST /v1/files`.

Litestar's own form parsing reads the whole body into memory; a batch file may be 200 MB. Here the
body is fed chunk by chunk to python-multipart's push parser: small form fields are kept in
memory, the file part streams into the files bucket (shared/bus/objects.py: ~1 MB at a time is
scanned for lines in a worker thread, then published as object chunks), so memory stays flat
whatever the file size. The object exists only once the caller's block ends without an error."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from litestar import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

from services.api.validation import UploadScanner
from shared.bus.objects import ObjectWriter
from shared.errors import InvalidRequest, PayloadTooLarge

log = logging.getLogger(__name__)

FILE_FIELD = "file"
MAX_FIELD_BYTES = 64 * 1024
MAX_FILENAME_CHARS = 255
MAX_PARTS = 16
# A part's header (name and value): Content-Disposition with a long file name fits easily.
MAX_PART_HEADER_BYTES = 8 * 1024
# Hand file bytes to the writer thread in slices of about this size: few thread hops, little RAM.
WRITE_BATCH_BYTES = 1024 * 1024
# Multipart framing (boundaries, part headers, the small fields) on top of the file's own bytes:
# a body announced larger than max_file_bytes plus this is refused before reading it.
FORM_OVERHEAD_BYTES = 1024 * 1024


def text(raw: bytes, what: str) -> str:
    """A form's text as a str: invalid UTF-8 or a NUL is the caller's error (400)."""
    try:
        value = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"{what} is not valid UTF-8", code="invalid_text") from None
    if "\x00" in value:
        raise InvalidRequest(f"{what} holds a NUL character", code="invalid_text")
    return value


@dataclass
class Upload:
    fields: dict[str, str]
    filename: str
    size: int
    line_count: int
    models: list[str]
    sha256: str = ""  # of the file's content (idempotent uploads compare it)


@dataclass
class _Form:
    """python-multipart callbacks: fields into memory, file bytes queued for the writer."""

    max_file_bytes: int
    check_field: Callable[[str, str], None]
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None  # set once the file part's headers are read
    file_bytes: int = 0
    queued: list[bytes] = field(default_factory=list)
    queued_bytes: int = 0
    ended: bool = False
    _parts: int = 0
    _header_name: bytearray = field(default_factory=bytearray)
    _header_value: bytearray = field(default_factory=bytearray)
    _disposition: bytes = b""
    _name: str | None = None
    _in_file: bool = False
    _value: bytearray = field(default_factory=bytearray)

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_val,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def take(self) -> list[bytes]:
        queued, self.queued, self.queued_bytes = self.queued, [], 0
        return queued

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise InvalidRequest(f"the form has more than {MAX_PARTS} parts")
        self._disposition = b""
        self._name = None
        self._in_file = False
        self._value.clear()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]
        self._check_header()

    def _header_val(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]
        self._check_header()

    def _check_header(self) -> None:
        if len(self._header_name) + len(self._header_value) > MAX_PART_HEADER_BYTES:
            raise InvalidRequest(
                f"a form part's header is longer than {MAX_PART_HEADER_BYTES} bytes",
                param=FILE_FIELD,
            )

    def _header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        if name is None:
            raise InvalidRequest("a form part has no name")
        self._name = text(name, "a form part's name")
        if self._name == FILE_FIELD:
            if self.filename is not None:
                raise InvalidRequest("the form has more than one file", param=FILE_FIELD)
            raw = options.get(b"filename") or b"upload"
            # Only the base name: a client-side path means nothing here.
            base = text(raw, "the file name").replace("\\", "/").rsplit("/", 1)[-1]
            self.filename = base[:MAX_FILENAME_CHARS] or "upload"
            self._in_file = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.file_bytes += end - start
            if self.file_bytes > self.max_file_bytes:
                raise PayloadTooLarge(
                    f"the file is larger than {self.max_file_bytes} bytes, the largest accepted",
                    param=FILE_FIELD,
                )
            self.queued.append(data[start:end])
            self.queued_bytes += end - start
        else:
            self._value += data[start:end]
            if len(self._value) > MAX_FIELD_BYTES:
                raise InvalidRequest(f"form field {self._name!r} is too long", param=self._name)

    def _part_end(self) -> None:
        if not self._in_file and self._name is not None:
            value = text(bytes(self._value), f"form field {self._name!r}")
            # Checked now, so a bad `purpose` sent before the file fails before any byte is stored.
            self.check_field(self._name, value)
            self.fields[self._name] = value
        self._in_file = False

    def _end(self) -> None:
        self.ended = True


async def receive(
    request: Request[Any, Any, Any],
    writer: ObjectWriter,
    *,
    max_file_bytes: int,
    check_field: Callable[[str, str], None],
) -> Upload:
    """Read the multipart body: the file part into `writer` (the caller's `async with` commits
    it, or drops it when this raises), the other fields into `Upload.fields`, each passed to
    `check_field(name, value)` as soon as it is complete (it raises to refuse the upload)."""
    content_type, options = request.content_type
    if content_type != "multipart/form-data" or not options.get("boundary"):
        raise InvalidRequest("expected a multipart/form-data body with a file", param=FILE_FIELD)
    announced = request.content_length
    if announced is not None and announced > max_file_bytes + FORM_OVERHEAD_BYTES:
        raise PayloadTooLarge(
            f"the request is larger than the largest file accepted ({max_file_bytes} bytes)",
            param=FILE_FIELD,
        )
    form = _Form(max_file_bytes=max_file_bytes, check_field=check_field)
    try:
        parser = MultipartParser(options["boundary"], form.callbacks())
    except FormParserError as e:
        raise InvalidRequest(f"bad multipart body: {e}", param=FILE_FIELD) from None
    scanner = UploadScanner()
    content = hashlib.sha256()

    def scan(data: bytes) -> None:
        scanner.feed(data)
        content.update(data)

    async def store(chunks: list[bytes]) -> None:
        data = b"".join(chunks)
        await anyio.to_thread.run_sync(scan, data)
        await writer.write(data)

    # Every byte counts, not only the file's: preamble, part headers and epilogue too.
    received, most = 0, max_file_bytes + FORM_OVERHEAD_BYTES
    async for chunk in request.stream():
        received += len(chunk)
        if received > most:
            raise PayloadTooLarge(
                f"the request is larger than the largest file accepted ({max_file_bytes} bytes)",
                param=FILE_FIELD,
            )
        if chunk:
            try:
                parser.write(chunk)
            except FormParserError as e:
                raise InvalidRequest(f"bad multipart body: {e}", param=FILE_FIELD) from None
        if form.queued and (form.queued_bytes >= WRITE_BATCH_BYTES or not chunk):
            await store(form.take())
    parser.finalize()
    if not form.ended:
        raise InvalidRequest("the multipart body ended early", param=FILE_FIELD)
    if form.filename is None:
        raise InvalidRequest("the form has no file part named 'file'", param=FILE_FIELD)
    if form.queued:
        await store(form.take())
    await anyio.to_thread.run_sync(scanner.finish)
    return Upload(
        fields=form.fields,
        filename=form.filename,
        size=form.file_bytes,
        line_count=scanner.line_count,
        models=list(scanner.models),
        sha256=content.hexdigest(),
    )


class NullWriter:
    """An ObjectWriter that keeps nothing: a repeated idempotent upload is only hashed."""

    async def write(self, data: bytes) -> None:
        return None
