"""What many tests share: the models and API key they run with, builders of batch input lines,
and bounded waits. A wait that runs out fails the test: it bounds liveness ("it did not hang"),
it never measures (timing figures live in bench/)."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Final, TypeVar, overload

import openai

# The models the instant and vLLM engines serve by default (shared.config).
CHAT_MODEL: Final = "SmolLM2-135M-Instruct"
EMBED_MODEL: Final = "all-MiniLM-L6-v2"
CHAT: Final = "/v1/chat/completions"
COMPLETIONS: Final = "/v1/completions"
EMBEDDINGS: Final = "/v1/embeddings"
# The key an api under test is started with (JETBATCH_API_KEY) and its clients send.
API_KEY: Final = "sk-test"

WAIT_S = 60.0  # how long a wait lasts before it fails the test
POLL_S = 0.05

T = TypeVar("T")


def request_line(
    custom_id: Any, body: Any, *, url: Any = CHAT, method: Any = "POST", **fields: Any
) -> bytes:
    """One line of a batch input file. Every field may be anything, for the tests that break a
    line on purpose; `fields` adds others at the top level."""
    line = {"custom_id": custom_id, "method": method, "url": url, "body": body, **fields}
    return json.dumps(line).encode() + b"\n"


def chat_body(content: str, *, model: str = CHAT_MODEL, **params: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **params}


def chat_line(
    custom_id: Any,
    content: str | None = None,
    *,
    model: str = CHAT_MODEL,
    url: Any = CHAT,
    method: Any = "POST",
    **params: Any,
) -> bytes:
    """A chat completion request line; `params` go into the body (max_tokens=...)."""
    body = chat_body(f"hello {custom_id}" if content is None else content, model=model, **params)
    return request_line(custom_id, body, url=url, method=method)


def completion_line(
    custom_id: Any, prompt: str | None = None, *, model: str = CHAT_MODEL, **params: Any
) -> bytes:
    body = {"model": model, "prompt": f"hello {custom_id}" if prompt is None else prompt, **params}
    return request_line(custom_id, body, url=COMPLETIONS)


def embedding_line(
    custom_id: Any, text: str | None = None, *, model: str = EMBED_MODEL, **params: Any
) -> bytes:
    body = {"model": model, "input": f"hello {custom_id}" if text is None else text, **params}
    return request_line(custom_id, body, url=EMBEDDINGS)


def chat_jsonl(n: int, prefix: str = "req", **line: Any) -> bytes:
    """A file of n chat request lines, custom_ids `<prefix>-0` ... `<prefix>-<n-1>`; `line` as
    for chat_line."""
    return b"".join(chat_line(f"{prefix}-{i}", **line) for i in range(n))


def jsonl(lines: Iterable[bytes | dict[str, Any]]) -> bytes:
    """A file of these lines: built ones (bytes) as they are, dicts as JSON."""
    return b"".join(x if isinstance(x, bytes) else json.dumps(x).encode() + b"\n" for x in lines)


@overload
async def wait_until(
    predicate: Callable[[], Awaitable[T | None]],
    what: str = ...,
    *,
    timeout_s: float = ...,
    interval_s: float = ...,
) -> T: ...
@overload
async def wait_until(
    predicate: Callable[[], T | None],
    what: str = ...,
    *,
    timeout_s: float = ...,
    interval_s: float = ...,
) -> T: ...
async def wait_until(
    predicate: Callable[[], Any],
    what: str = "the condition",
    *,
    timeout_s: float = WAIT_S,
    interval_s: float = POLL_S,
) -> Any:
    """Call `predicate` (plain or async) until it returns something truthy, and return that;
    past `timeout_s` the test fails."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}: {value!r}")
        await asyncio.sleep(interval_s)


def wait_until_sync(
    predicate: Callable[[], T | None],
    what: str = "the condition",
    *,
    timeout_s: float = WAIT_S,
    interval_s: float = POLL_S,
    retry_on: tuple[type[Exception], ...] = (),
) -> T:
    """wait_until for tests without an event loop. An exception in `retry_on` counts as "not
    yet" (a service that is restarting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value: T | None = predicate()
        except retry_on:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}: {value!r}")
        time.sleep(interval_s)


async def stored_bytes(nats_url: str, key: str) -> bytes | None:
    """A file's bytes as stored in the files bucket (None: no such object)."""
    from shared import bus

    nc = await bus.connect(nats_url, "test-read-object")
    try:
        files = await bus.files_bucket(nc.jetstream())
        if await files.size(key) is None:
            return None
        return b"".join([chunk async for chunk in files.iter_bytes(key)])
    finally:
        await nc.close()


async def stored_keys(nats_url: str) -> set[str]:
    """Every object in the files bucket."""
    from shared import bus

    nc = await bus.connect(nats_url, "test-list-objects")
    try:
        return await (await bus.files_bucket(nc.jetstream())).keys()
    finally:
        await nc.close()


async def as_chunks(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    """`data` as an async source of chunks (FileObjects.put)."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def stored_messages(nats_url: str) -> int:
    """How many messages the files bucket's stream holds (chunks and metas, live or not)."""
    from shared import bus

    nc = await bus.connect(nats_url, "test-count-objects")
    try:
        files = await bus.files_bucket(nc.jetstream())
        return (await nc.jetstream().stream_info(files.stream)).state.messages
    finally:
        await nc.close()


def default_models_dir() -> Path:
    """The default models, converted where `python -m services.inference.models` leaves them for
    this checkout (converted now if they are not yet). A missing model package raises: a test
    that needs the real tokenizer fails without it, it is never skipped."""
    from services.inference.models import prepare_models
    from shared.config import Settings

    models = Path(__file__).resolve().parent.parent / ".jetbatch" / "models"
    prepare_models(Settings(models_cache_dir=models))
    return models


def admin_client(base_url: str, key: str = API_KEY) -> openai.AsyncOpenAI:
    """The SDK's admin client (`.admin.organization...`) on an admin key."""
    return openai.AsyncOpenAI(base_url=base_url, admin_api_key=key, max_retries=0)


async def project_with_key(org: openai.AsyncOpenAI, name: str) -> tuple[str, str]:
    """(project id, its service account's key) made through the admin client."""
    project = await org.admin.organization.projects.create(name=name)
    assert project.object == "organization.project" and project.status == "active"
    account = await org.admin.organization.projects.service_accounts.create(
        project.id, name=f"{name}-bot"
    )
    assert account.api_key is not None and account.api_key.value.startswith("sk-svcacct-")
    return project.id, account.api_key.value
