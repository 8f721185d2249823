"""Bounds on what one HTTP request may cost before a handler sees it (README: Hostile input).

- `GuardedHttpTools`, uvicorn's httptools protocol with a deadline and a size cap on the request
  line and headers: a client that sends them slowly (slowloris) or endlessly gets a 408 / 431 in
  OpenAI's shape and the connection is closed. uvicorn itself bounds neither.
- `limits_middleware`: a request body must keep coming (at most BODY_IDLE_TIMEOUT_S between two
  chunks) and, past BODY_GRACE_S, at BODY_MIN_BYTES_PER_S on average, else 408; a path or query
  string holding a NUL or invalid UTF-8 is a 400 before any handler runs.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import unquote_to_bytes

import msgspec
from litestar.types import ASGIApp, Receive, ReceiveMessage, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from schemas.openai import ErrorDetail, ErrorResponse
from shared.errors import InvalidRequest, RequestTimeout

# The request line and headers: at most this many bytes, received within this many seconds.
MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT_S = 10.0
# After refusing a request head, what the client still sends is read and dropped for this long
# before the connection closes: closed with unread data, the socket would send a reset, and the
# client might lose the answer before reading it.
LINGER_S = 1.0
# A body stalled this long between two chunks is abandoned.
BODY_IDLE_TIMEOUT_S = 30.0
# After the grace period a body must average at least this rate (a 200 MB upload at the minimum
# rate takes under an hour; a trickle of one byte every 29 s is cut after BODY_GRACE_S).
BODY_GRACE_S = 60.0
BODY_MIN_BYTES_PER_S = 64 * 1024

_encoder = msgspec.json.Encoder()


def raw_error(status: int, reason: str, message: str, code: str) -> bytes:
    """A complete HTTP/1.1 error response in OpenAI's shape, for the protocol level (no app)."""
    body = _encoder.encode(
        ErrorResponse(error=ErrorDetail(message=message, type="invalid_request_error", code=code))
    )
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class GuardedHttpTools(HttpToolsProtocol):
    """HttpToolsProtocol with a deadline and a byte cap on each request's head."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_open = True  # reading a request line and headers
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if not self._head_open:
            super().data_received(data)
            return
        self._head_bytes += len(data)
        self._arm()
        super().data_received(data)
        # Counted per read (at most 256 KB): a read may also hold the start of the body, so the
        # cap is applied only if the head is still open after it.
        if self._head_open and self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(
                431,
                "Request Header Fields Too Large",
                f"the request line and headers are larger than {MAX_HEAD_BYTES} bytes",
                "headers_too_large",
            )

    def on_headers_complete(self) -> None:
        self._head_open = False
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # The request is in: what comes next on this connection is the next request's head.
        self._head_open, self._head_bytes = True, 0

    def send_400_response(self, msg: str) -> None:
        if not self.transport.is_closing():
            super().send_400_response(msg)

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self._head_open or self.transport.is_closing():
            return
        if self._head_bytes == 0:  # nothing sent: an idle connection, not a request
            self.transport.close()
            return
        self._refuse(
            408,
            "Request Timeout",
            f"the request line and headers did not arrive within {HEAD_TIMEOUT_S:g} s",
            "request_timeout",
        )

    def _refuse(self, status: int, reason: str, message: str, code: str) -> None:
        self._disarm()
        self._head_open = False
        if not self.transport.is_closing():
            self._refused = True
            self.transport.write(raw_error(status, reason, message, code))
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)


def _bad_text(raw: bytes) -> str | None:
    """What is wrong with a percent-encoded path or query string, if anything."""
    decoded = unquote_to_bytes(raw.replace(b"+", b" "))
    if b"\x00" in decoded:
        return "a NUL character"
    try:
        decoded.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid UTF-8"
    return None


def check_url_text(scope: Scope) -> None:
    for part, raw in (("path", scope.get("raw_path") or b""), ("query", scope["query_string"])):
        problem = _bad_text(raw)
        if problem:
            raise InvalidRequest(f"the URL's {part} holds {problem}", code="invalid_text")


class BodyDeadline:
    """`receive`, refusing (RequestTimeout, hence 408) a body that stalls or trickles in. Once
    the body is complete, `receive` is passed through untouched: handlers wait on it for the
    client's disconnect."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._started = time.monotonic()
        self._bytes = 0
        self._complete = False

    async def __call__(self) -> ReceiveMessage:
        if self._complete:
            return await self._receive()
        try:
            async with asyncio.timeout(BODY_IDLE_TIMEOUT_S):
                message = await self._receive()
        except TimeoutError:
            raise RequestTimeout(
                f"the request body stalled: nothing arrived for {BODY_IDLE_TIMEOUT_S:g} s",
                code="request_timeout",
            ) from None
        if message["type"] != "http.request":
            return message
        self._bytes += len(message.get("body", b""))
        if not message.get("more_body", False):
            self._complete = True
            return message
        elapsed = time.monotonic() - self._started
        if elapsed > BODY_GRACE_S and self._bytes < elapsed * BODY_MIN_BYTES_PER_S:
            raise RequestTimeout(
                f"the request body arrives too slowly ({self._bytes} bytes in {elapsed:.0f} s;"
                f" at least {BODY_MIN_BYTES_PER_S} bytes/s are needed)",
                code="request_timeout",
            )
        return message


def limits_middleware(app: ASGIApp) -> ASGIApp:
    """Litestar middleware (it runs inside the exception handlers: its errors get OpenAI's
    shape)."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            check_url_text(scope)
            receive = BodyDeadline(receive)
        await app(scope, receive, send)

    return middleware
