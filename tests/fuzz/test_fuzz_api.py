"""Every route of the api, fuzzed with hypothesis (pinned in pyproject's dev extra; derandomized,
so a run is the same run every time) against the real api on a real PostgreSQL and nats-server,
with no key, a wrong key and the right one: no input may get a 500, and every error is in
OpenAI's shape. A route the table below does not name fails the run (README: Hostile input)."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote_from_bytes

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar.routes import HTTPRoute

from services.api.service import create_app, running
from shared import config
from shared.embedded import free_port
from tests.helpers import API_KEY, CHAT, CHAT_MODEL, EMBED_MODEL, chat_line

pytestmark = pytest.mark.fuzz

# What each route takes besides its path and query: "json" (a JSON body), "multipart" (an upload)
# or "none". A new route must be added here, or test_every_route_is_fuzzed fails.
ROUTE_INPUTS: dict[str, str] = {
    "GET /healthz": "none",
    "GET /v1/models": "none",
    "GET /v1/models/{model_id:path}": "none",
    "POST /v1/chat/completions": "json",
    "POST /v1/completions": "json",
    "POST /v1/embeddings": "json",
    "POST /v1/files": "multipart",
    "GET /v1/files": "none",
    "GET /v1/files/{file_id:str}": "none",
    "GET /v1/files/{file_id:str}/content": "none",
    "DELETE /v1/files/{file_id:str}": "none",
    "POST /v1/batches": "json",
    "GET /v1/batches": "none",
    "GET /v1/batches/{batch_id:str}": "none",
    "POST /v1/batches/{batch_id:str}/cancel": "none",
    # Server-sent events: only the status and the head of a 200 are read, then it is closed.
    "GET /v1/batches/{batch_id:str}/events": "stream",
    # Webhook endpoints and deliveries
    "DELETE /v1/webhook_endpoints/{webhook_endpoint_id:str}": "none",
    "GET /v1/webhook_deliveries": "none",
    "GET /v1/webhook_deliveries/{delivery_id:str}": "none",
    "GET /v1/webhook_endpoints": "none",
    "GET /v1/webhook_endpoints/{webhook_endpoint_id:str}": "none",
    "POST /v1/webhook_deliveries/{delivery_id:str}/resend": "json",
    "POST /v1/webhook_endpoints": "json",
    "POST /v1/webhook_endpoints/{webhook_endpoint_id:str}": "json",
    "POST /v1/webhook_endpoints/{webhook_endpoint_id:str}/rotate_secret": "json",
    # Operators: workers, dead letters
    "GET /v1/dead_letters": "none",
    "GET /v1/dead_letters/{dead_letter_id:int}": "none",
    "GET /v1/workers": "none",
    "POST /v1/workers/{worker_id:str}/drain": "none",
    "POST /v1/workers/{worker_id:str}/resume": "none",
    "POST /v1/workers/{worker_id:str}/restart": "none",
    "GET /v1/logs": "none",
    "POST /v1/dead_letters/{dead_letter_id:int}/replay": "json",
    # Tenants: OpenAI's admin API (projects, keys, rate limits)
    "DELETE /v1/organization/admin_api_keys/{key_id:str}": "none",
    "DELETE /v1/organization/projects/{project_id:str}/api_keys/{api_key_id:str}": "none",
    "DELETE /v1/organization/projects/{project_id:str}/service_accounts/{service_account_id:str}": "none",
    "GET /v1/organization/admin_api_keys": "none",
    "GET /v1/organization/admin_api_keys/{key_id:str}": "none",
    "GET /v1/organization/projects": "none",
    "GET /v1/organization/projects/{project_id:str}": "none",
    "GET /v1/organization/projects/{project_id:str}/api_keys": "none",
    "GET /v1/organization/projects/{project_id:str}/api_keys/{api_key_id:str}": "none",
    "GET /v1/organization/projects/{project_id:str}/rate_limits": "none",
    "GET /v1/organization/projects/{project_id:str}/service_accounts": "none",
    "GET /v1/organization/projects/{project_id:str}/service_accounts/{service_account_id:str}": "none",
    "GET /v1/organization/projects/{project_id:str}/webhook_secret": "none",
    "POST /v1/organization/admin_api_keys": "json",
    "POST /v1/organization/projects": "json",
    "POST /v1/organization/projects/{project_id:str}": "json",
    "POST /v1/organization/projects/{project_id:str}/archive": "json",
    "POST /v1/organization/projects/{project_id:str}/rate_limits/{rate_limit_id:str}": "json",
    "POST /v1/organization/projects/{project_id:str}/service_accounts": "json",
    "POST /v1/organization/projects/{project_id:str}/service_accounts/{service_account_id:str}": "json",
    "POST /v1/organization/projects/{project_id:str}/service_accounts/{service_account_id:str}/api_keys": "json",
    "POST /v1/organization/projects/{project_id:str}/webhook_secret/rotate": "json",
    # Usage and costs (OpenAI's), readiness and stats
    "GET /v1/organization/usage/completions": "none",
    "GET /v1/organization/usage/embeddings": "none",
    "GET /v1/organization/costs": "none",
    "GET /ready": "none",
    "GET /metrics": "none",
    "GET /v1/stats": "none",
    # The admin page (HTML for a browser; its login and logout answer JSON)
    "GET /admin": "none",
    "POST /admin/login": "json",
    "POST /admin/logout": "json",
    "GET /admin/static/{name:str}": "none",
}
# Examples per route (each with one of three keys). 40 keeps the whole run to about a minute on
# the 2-core dev box; FUZZ_EXAMPLES raises it for a longer hunt.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
KEYS = (None, "Bearer sk-wrong", f"Bearer {API_KEY}", "Basic Zm9vOmJhcg==")
HOSTILE_TEXT = (
    "",
    "\x00",
    "a\x00b",
    "é" * 300,
    "x" * 5000,
    "../../etc/passwd",
    "batch_",
    "file-",
    CHAT_MODEL,
    "${jndi:ldap://x}",
    "' OR 1=1 --",
    "\u202e\ufeff",
    "🙂",
)
HOSTILE_BODIES = (
    b"",
    b"\x00",
    b"\xff\xfe",
    b"[" * 100_000,
    b'{"model": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    b'{"model": "\\u0000"}',
    b'{"input_file_id": "\\ud800", "endpoint": "/v1/chat/completions", "completion_window": "24h"}',
    b"1e999999",
    b'{"a": 1, "a": 2}',
    b"null",
)
_PARAM = re.compile(r"\{(\w+):(\w+)\}")


def fuzz_settings(database_url: str, nats_url: str, data_dir: str) -> config.Settings:
    return config.load(
        {
            "JETBATCH_DATA_DIR": data_dir,
            "JETBATCH_DATABASE_URL": database_url,
            "JETBATCH_NATS_URL": nats_url,
            "JETBATCH_ENGINE": "instant",
            "JETBATCH_API_KEY": API_KEY,
            "JETBATCH_API_PORT": str(free_port()),
            "JETBATCH_MODELS": f"{CHAT_MODEL},{EMBED_MODEL}",
            "JETBATCH_MAX_BATCH_LINES": "50",
        }
    )


def app_routes() -> list[str]:
    """`METHOD path` of every route the api serves, read from the app itself."""
    settings = config.load(
        {"JETBATCH_DATABASE_URL": "postgresql://unused/x", "JETBATCH_NATS_URL": "nats://unused:1"}
    )
    found = []
    for route in create_app(settings).routes:
        if isinstance(route, HTTPRoute):
            for method in sorted(route.methods - {"HEAD", "OPTIONS"}):
                found.append(f"{method} {route.path}")
    return sorted(found)


ROUTES = app_routes()


def test_every_route_is_fuzzed() -> None:
    missing = sorted(set(ROUTES) - set(ROUTE_INPUTS))
    assert not missing, f"routes not fuzzed: add them to ROUTE_INPUTS: {missing}"


class ApiThread:
    """The api served in a thread of its own (its own event loop), so hypothesis can drive it
    with a plain blocking client."""

    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        self.url = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="api", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:
            self._error = e
            self._ready.set()

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with running(self.settings) as url:
            self.url = url.removesuffix("/v1")
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> ApiThread:
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None or not self.url:
            raise RuntimeError("the api did not start") from self._error
        return self

    def __exit__(self, *_: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)


@pytest.fixture(scope="module")
def known_ids() -> list[str]:
    return []


@pytest.fixture
def api(
    database_url: str, nats_url: str, scratch_dir: Path, known_ids: list[str]
) -> Iterator[httpx.Client]:
    data_dir = tempfile.mkdtemp(prefix="fuzz-", dir=scratch_dir)
    with ApiThread(fuzz_settings(database_url, nats_url, data_dir)) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            # Real ids among the fuzzed ones, so routes get past "not found" sometimes.
            headers = {"authorization": f"Bearer {API_KEY}"}
            files = {"file": ("in.jsonl", chat_line("a") + b"\n")}
            made = client.post("/v1/files", headers=headers, files=files, data={"purpose": "batch"})
            file_id = made.json()["id"]
            body = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}
            batch = client.post("/v1/batches", headers=headers, json=body).json()
            known_ids[:] = [file_id, batch["id"]]
            yield client


def segments(known: list[str]) -> st.SearchStrategy[str]:
    """A path segment or query value, percent-encoded from any bytes (NUL, invalid UTF-8)."""
    raw = st.one_of(
        st.binary(max_size=40),
        st.sampled_from(HOSTILE_TEXT).map(lambda t: t.encode("utf-8")),
        st.sampled_from(known or ["file-x"]).map(str.encode),
    )
    return raw.map(lambda b: quote_from_bytes(b, safe=""))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = ("model", "input_file_id", "endpoint", "completion_window", "metadata", "messages",
          "input", "prompt", "stream", "output_expires_after", "max_tokens")  # fmt: skip


def json_bodies(known: list[str]) -> st.SearchStrategy[bytes]:
    values = st.one_of(JSON, st.sampled_from(HOSTILE_TEXT), st.sampled_from(known or ["x"]))
    shaped = st.dictionaries(st.sampled_from(FIELDS), values, max_size=6)
    as_json = st.one_of(shaped, JSON).map(msgspec.json.encode)
    return st.one_of(as_json, st.sampled_from(HOSTILE_BODIES), st.binary(max_size=64))


@st.composite
def multipart(draw: st.DrawFn) -> tuple[bytes, str]:
    boundary = "fuzzboundary"
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from([b"file", b"purpose", b"expires_after[seconds]", b"x\x00"]))
        filename = draw(st.one_of(st.none(), st.binary(max_size=30)))
        disposition = b'form-data; name="' + name + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename.replace(b'"', b"") + b'"'
        value = draw(
            st.one_of(
                st.sampled_from([b"batch", b"user_data", b"batch_output", b"\xff", b"3600"]),
                st.binary(max_size=200),
                st.just(chat_line("a") + b"\n" + b"[" * 20_000),
            )
        )
        parts.append(b"--%s\r\nContent-Disposition: %s\r\n\r\n%s\r\n" % (
            boundary.encode(), disposition, value))  # fmt: skip
    body = b"".join(parts) + (b"--%s--\r\n" % boundary.encode() if draw(st.booleans()) else b"")
    return body, f"multipart/form-data; boundary={boundary}"


def assert_openai_error(response: httpx.Response, what: str) -> None:
    assert response.status_code != 500, f"{what}: 500: {response.text[:500]}"
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
    except Exception:
        pytest.fail(f"{what}: {response.status_code} not in OpenAI's shape: {response.text[:300]}")
    assert isinstance(error["message"], str) and isinstance(error["type"], str), what
    assert len(response.content) < 8 * 1024, f"{what}: an error of {len(response.content)} bytes"


@pytest.mark.parametrize("route", ROUTES)
def test_no_input_gets_a_500(route: str, api: httpx.Client, known_ids: list[str]) -> None:
    method, template = route.split(" ", 1)
    kind = ROUTE_INPUTS.get(route, "json")
    params = _PARAM.findall(template)

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        path = template
        for name, _ in params:
            path = path.replace(f"{{{name}:", "{", 1)
        for name, _ in params:
            value = data.draw(segments(known_ids), label=name) or "x"
            path = re.sub(r"\{\w+\}", value.replace("\\", "\\\\"), path, count=1)
        query = data.draw(
            st.dictionaries(
                st.sampled_from(["limit", "after", "purpose", "order", "x"]),
                st.one_of(segments(known_ids), st.integers(-5, 20_000).map(str)),
                max_size=3,
            ),
            label="query",
        )
        headers = {}
        key = data.draw(st.sampled_from(KEYS), label="key")
        if key:
            headers["authorization"] = key
        content: bytes | None = None
        if kind == "json" or (method in ("POST", "DELETE") and data.draw(st.booleans())):
            content = data.draw(json_bodies(known_ids), label="body")
            headers["content-type"] = "application/json"
        if kind == "multipart":
            content, headers["content-type"] = data.draw(multipart(), label="form")
        url = path + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")
        if kind == "stream":
            with api.stream(method, url, headers=headers) as streamed:
                if streamed.status_code == 200:
                    assert streamed.headers["content-type"].startswith("text/event-stream")
                    return
                streamed.read()
            assert_openai_error(streamed, f"{method} {url[:200]}")
            return
        response = api.request(method, url, content=content, headers=headers)
        assert_openai_error(response, f"{method} {url[:200]}")

    fuzz()
