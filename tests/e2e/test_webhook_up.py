"""Webhooks as a user of `jetbatch up` gets them: a batch created with the unmodified openai SDK
and `metadata.webhook_url` pointing at a receiver on this machine is announced when it ends,
signed with the secret `jetbatch up` generated into the data dir, and the SDK's
`webhooks.unwrap()` accepts it; an endpoint registered with `client.webhooks.create()` gets the
same events with its own secret. Instant engine: this is about the pipeline, not the model."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.e2e.conftest import System, start_system, stop_system
from tests.helpers import chat_line, wait_until_sync

pytestmark = pytest.mark.e2e

LINE = chat_line("a", "hi")


class Receiver:
    """A plain HTTP server on loopback in a thread, recording (path, headers, body)."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with outer.lock:
                    outer.received.append(
                        (self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                    )
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def wait(
        self, path: str, count: int, timeout_s: float = 120
    ) -> list[tuple[dict[str, str], bytes]]:
        def arrived() -> list[tuple[dict[str, str], bytes]] | None:
            with self.lock:
                got = [(h, b) for p, h, b in self.received if p == path]
            return got if len(got) >= count else None

        what = f"{count} POSTs to {path}"
        return wait_until_sync(arrived, what, timeout_s=timeout_s, interval_s=0.1)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def system(scratch_dir: Path) -> Iterator[System]:
    system = start_system(scratch_dir / "e2e-webhooks", "instant", "up.log")
    yield system
    assert stop_system(system) == 0, system.log_tail()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def wait_batch(client: openai.OpenAI, batch_id: str, status: str, timeout_s: float = 120) -> Any:
    def announced() -> Any:
        batch = client.batches.retrieve(batch_id)
        delivered = getattr(batch, "webhook_status", None) == "delivered"
        return batch if batch.status == status and delivered else None

    what = f"batch {batch_id} to be {status} and announced"
    return wait_until_sync(announced, what, timeout_s=timeout_s, interval_s=0.2)


def test_a_finished_batch_is_announced_to_its_webhook_url_and_to_registered_endpoints(
    system: System, receiver: Receiver
) -> None:
    client = openai.OpenAI(base_url=system.base_url, api_key=system.api_key, max_retries=0)
    secret = (system.data_dir / "webhook-secret").read_text().strip()
    assert secret.startswith("whsec_")
    endpoint = client.webhooks.create(
        url=receiver.url("/registered"), event_types=["batch.completed"], name="e2e"
    )

    f = client.files.create(file=("a.jsonl", LINE), purpose="batch")
    metadata = {"webhook_url": receiver.url("/per-batch"), "order": "42"}
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
        metadata=metadata,
    )  # fmt: skip

    [(headers, body)] = receiver.wait("/per-batch", 1)
    event = client.webhooks.unwrap(body, headers, secret=secret)
    assert (event.type, event.data.id) == ("batch.completed", batch.id)
    assert json.loads(body)["data"]["metadata"] == metadata
    [(headers, body)] = receiver.wait("/registered", 1)
    assert client.webhooks.unwrap(body, headers, secret=endpoint.signing_secret).data.id == batch.id

    done = wait_batch(client, batch.id, "completed")
    assert (done.webhook_attempts, done.webhook_error) == (2, None)  # one per destination
    client.webhooks.delete(endpoint.id)


def test_an_invalid_input_file_is_announced_as_batch_failed(
    system: System, receiver: Receiver
) -> None:
    client = openai.OpenAI(base_url=system.base_url, api_key=system.api_key, max_retries=0)
    secret = (system.data_dir / "webhook-secret").read_text().strip()
    f = client.files.create(file=("bad.jsonl", LINE + b"{not json\n"), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
        metadata={"webhook_url": receiver.url("/failed")},
    )  # fmt: skip
    [(headers, body)] = receiver.wait("/failed", 1)
    event = client.webhooks.unwrap(body, headers, secret=secret)
    assert (event.type, event.data.id) == ("batch.failed", batch.id)
    assert wait_batch(client, batch.id, "failed").webhook_attempts == 1
