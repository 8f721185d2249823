"""The `jetbatch` command's one HTTP client of the api: every answer decoded into its `schemas/`
type with msgspec, every error answer (OpenAI's `{"error": {...}}`) turned into one ApiError.
The api's URL and key: `--url` / `--api-key`, else JETBATCH_API_URL / JETBATCH_API_KEY, else the
local api of the config (http://<JETBATCH_API_HOST>:<JETBATCH_API_PORT>/v1) with the key
`jetbatch up` saved in <data dir>/api-key."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import msgspec

from schemas.admin import WorkerList, WorkerStatus
from schemas.openai import Batch, BatchList, ErrorResponse, ModelList, OpenAIFile
from schemas.usage import Stats
from shared import config

TIMEOUT_S = 30.0
# The progress stream sends an event at least this often (a keep-alive comment at worst); a
# stream silent for longer is treated as broken and opened again with Last-Event-ID.
STREAM_READ_TIMEOUT_S = 60.0
# How long a request waits for the first one with its idempotency key to finish.
IN_PROGRESS_WAIT_S = 120.0
T = TypeVar("T")
_error_decoder = msgspec.json.Decoder(ErrorResponse)
_batch_decoder = msgspec.json.Decoder(Batch)


class ApiError(Exception):
    """An answer that is not a success, or no answer: `str()` is the one line the CLI prints."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code

    def __str__(self) -> str:
        said = super().__str__()
        if self.status is None:
            return said
        return f"{said} (HTTP {self.status}{f', {self.code}' if self.code else ''})"


@dataclass(frozen=True)
class Target:
    url: str  # ends in /v1
    key: str | None


def target(
    url: str | None = None, key: str | None = None, env: dict[str, str] | None = None
) -> Target:
    """Where the CLI talks to, as the docstring above says."""
    env = dict(os.environ) if env is None else env
    url = url or env.get("JETBATCH_API_URL")
    key = key or env.get("JETBATCH_API_KEY") or None
    if url and key:  # nothing else needed: no config to load (and none to fail)
        return Target(url.rstrip("/"), key)
    settings = config.load(env)
    if not url:
        host = "127.0.0.1" if settings.api_host in ("0.0.0.0", "::") else settings.api_host
        url = f"http://{host}:{settings.api_port}/v1"
    key = key or settings.api_key
    if key is None and (saved := settings.data_dir / "api-key").exists():
        key = saved.read_text().strip() or None
    return Target(url.rstrip("/"), key)


def error_of(response: httpx.Response) -> ApiError:
    """One line from an error answer: OpenAI's error message when it is one, else the body."""
    body = response.read()
    try:
        detail = _error_decoder.decode(body).error
        return ApiError(detail.message, response.status_code, detail.code or detail.type)
    except msgspec.DecodeError:
        text = body.decode("utf-8", "replace").strip()[:300] or response.reason_phrase
        return ApiError(text, response.status_code)


class Client:
    def __init__(self, where: Target, *, transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Accept": "application/json"}
        if where.key:
            headers["Authorization"] = f"Bearer {where.key}"
        self.target = where
        self.http = httpx.Client(
            base_url=where.url, headers=headers, timeout=TIMEOUT_S, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise ApiError(f"cannot reach the api at {self.target.url}: {e}") from None
        if response.is_error:
            raise error_of(response)
        return response

    def _get(self, path: str, type: type[T], **params: Any) -> T:
        query = {k: v for k, v in params.items() if v is not None}
        return decode(self.request("GET", path, params=query).content, type)

    def _post(self, path: str, type: type[T], key: str | None = None, **kw: Any) -> T:
        headers = {"Idempotency-Key": key} if key else None
        deadline = time.monotonic() + IN_PROGRESS_WAIT_S
        while True:
            try:
                return decode(self.request("POST", path, headers=headers, **kw).content, type)
            except ApiError as e:
                # The first request with this key (of a client killed since) is still running:
                # its answer will be ours.
                if e.code != "idempotency_in_progress" or time.monotonic() > deadline:
                    raise
            time.sleep(0.5)

    # -- files and batches -------------------------------------------------------------------

    def upload(
        self, name: str, content: bytes, *, idempotency_key: str | None = None
    ) -> OpenAIFile:
        files = {"file": (name, content, "application/jsonl")}
        data = {"purpose": "batch"}
        return self._post("/files", OpenAIFile, idempotency_key, files=files, data=data)

    def create_batch(
        self,
        file_id: str,
        endpoint: str,
        *,
        metadata: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Batch:
        body: dict[str, Any] = {
            "input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"
        }  # fmt: skip
        if metadata:
            body["metadata"] = metadata
        return self._post("/batches", Batch, idempotency_key, json=body)

    def batch(self, batch_id: str) -> Batch:
        return self._get(f"/batches/{batch_id}", Batch)

    def batches(self, limit: int = 20, after: str | None = None) -> BatchList:
        return self._get("/batches", BatchList, limit=limit, after=after)

    def cancel(self, batch_id: str) -> Batch:
        return self._post(f"/batches/{batch_id}/cancel", Batch)

    def download(self, file_id: str, path: Path) -> Path:
        """A file's content into `path` (through a temporary file beside it), streamed."""
        part = path.with_name(path.name + ".part")
        try:
            with self.http.stream("GET", f"/files/{file_id}/content") as response:
                if response.is_error:
                    raise error_of(response)
                with open(part, "wb") as f:
                    for chunk in response.iter_bytes():
                        f.write(chunk)
        except httpx.TransportError as e:
            raise ApiError(f"cannot reach the api at {self.target.url}: {e}") from None
        part.replace(path)
        return path

    def events(self, batch_id: str, last_event_id: str | None = None) -> Iterator[SseEvent]:
        """`GET /batches/{id}/events`: the batch's progress as it happens (server-sent events)."""
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        timeout = httpx.Timeout(TIMEOUT_S, read=STREAM_READ_TIMEOUT_S)
        try:
            path = f"/batches/{batch_id}/events"
            with self.http.stream("GET", path, headers=headers, timeout=timeout) as response:
                if response.is_error:
                    raise error_of(response)
                yield from parse_sse(response.iter_lines())
        except httpx.TransportError as e:
            raise StreamBroken(str(e)) from None

    # -- the fleet ---------------------------------------------------------------------------

    def models(self) -> ModelList:
        return self._get("/models", ModelList)

    def workers(self) -> WorkerList:
        return self._get("/workers", WorkerList)

    def worker_action(self, worker_id: str, action: str) -> WorkerStatus:
        return self._post(f"/workers/{worker_id}/{action}", WorkerStatus)

    def stats(self) -> Stats:
        return self._get("/stats", Stats)


class StreamBroken(Exception):
    """The progress stream ended without its `done` event: open it again."""


@dataclass(frozen=True)
class SseEvent:
    event: str
    id: str | None
    data: str

    def batch(self) -> Batch:
        return _batch_decoder.decode(self.data)


def parse_sse(lines: Iterator[str]) -> Iterator[SseEvent]:
    """Server-sent events from a stream's lines (the WHATWG rules jetbatch needs: `event`,
    `id`, `data` over several lines, comments, a blank line ends an event)."""
    event, event_id, data = "message", None, list[str]()
    for line in lines:
        if not line:
            if data:
                yield SseEvent(event, event_id, "\n".join(data))
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value
    if data:
        yield SseEvent(event, event_id, "\n".join(data))


def decode(body: bytes, type: type[T]) -> T:
    try:
        return msgspec.json.decode(body, type=type)
    except msgspec.DecodeError as e:
        raise ApiError(f"the api answered something that is not a {type.__name__}: {e}") from None
