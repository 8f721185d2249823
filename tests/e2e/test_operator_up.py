"""Issue 15's "done when", on the system as an operator starts it (`jetbatch up`, here on the
instant engine so that a batch runs long enough to watch): in a real browser, without reading
any code, the admin page shows a running batch's progress reach completed, replays a dead letter
and drains a worker; and `jetbatch submit --wait` gets a batch's output."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import openai
import pytest
from playwright.async_api import Browser, BrowserContext, expect

from schemas.messages import ResultMessage
from services.publisher_cli import servers
from shared.nats_auth import ADMIN, NatsAuth
from tests.browser.conftest import browser, contexts, watched  # noqa: F401 (fixtures)
from tests.e2e.conftest import REPO, System, start_system, stop_system
from tests.helpers import CHAT, CHAT_MODEL, chat_jsonl, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

# Lines take 0.1 s, two at a time: a 60-line batch runs for about 3 s.
SLOW = {"JETBATCH_INSTANT_DELAY_S": "0.1", "JETBATCH_MAX_IN_FLIGHT": "2"}


@pytest.fixture(scope="module")
def up(scratch_dir: Path) -> Iterator[System]:
    system = start_system(scratch_dir / "e2e-operator", "instant", "up.log", env=SLOW)
    yield system
    stop_system(system)


def admin_nats_url(data_dir: Path) -> str:
    """The embedded server's admin URL, from what `jetbatch up` keeps in the data dir."""
    path, nodes = servers(data_dir)
    return NatsAuth.load(path).url(",".join(filter(None, (n.listen for n in nodes))), ADMIN)


async def test_an_operator_watches_replays_drains_and_submits(
    up: System,
    browser: Browser,  # noqa: F811 (the fixture imported above)
    contexts: list[BrowserContext],  # noqa: F811
) -> None:
    root = up.base_url.removesuffix("/v1")
    client = openai.AsyncOpenAI(base_url=up.base_url, api_key=up.api_key, max_retries=2)
    upload = await client.files.create(file=("watched.jsonl", chat_jsonl(60)), purpose="batch")
    batch = await client.batches.create(
        input_file_id=upload.id, endpoint=CHAT, completion_window="24h"
    )
    seen = await watched(browser, contexts)
    await seen.page.goto(f"{root}/admin")
    await seen.page.fill("#key", up.api_key)
    await seen.page.click("#login button[type=submit]")
    await expect(seen.page.locator("#nav")).to_be_visible()

    # A running batch's progress moves to completed.
    row = seen.page.locator(f'tr[data-batch-id="{batch.id}"]')
    await seen.page.wait_for_function(
        """(selector) => { const bar = document.querySelector(selector);
            const v = bar ? Number(bar.getAttribute("aria-valuenow")) : 0;
            return v > 0 && v < 100; }""",
        arg=f'tr[data-batch-id="{batch.id}"] [role="progressbar"]',
        timeout=60_000,
    )
    await expect(row.locator(".badge")).to_have_text("completed", timeout=60_000)
    assert any(f"/v1/batches/{batch.id}/events" in r for r in seen.requests)

    # A dead letter (a result nobody can read) is replayed from the page.
    nc = await nats.connect(admin_nats_url(up.data_dir))
    try:
        await nc.jetstream().publish(ResultMessage.subject_for("batch_broken"), b"{broken")
    finally:
        await nc.close()
    auth = {"Authorization": f"Bearer {up.api_key}"}
    async with httpx.AsyncClient(base_url=up.base_url, headers=auth, timeout=30) as http:

        async def letters() -> list[dict[str, Any]]:
            return (await http.get("/dead_letters")).json()["data"]  # type: ignore[no-any-return]

        [letter] = await wait_until(letters, "the dead letter", timeout_s=30)
        await seen.page.click('#nav a[data-view="dead-letters"]')
        dead = seen.page.locator(f'tr[data-dead-letter-id="{letter["id"]}"]')
        await dead.locator("button.replay").click()
        await expect(dead.locator(".replayed")).to_contain_text("1×")

        # The chat model's worker is drained from the page, then resumed.
        workers = (await http.get("/workers")).json()["data"]
        [chat] = [w for w in workers if w["model"] == CHAT_MODEL]
        await seen.page.click('#nav a[data-view="workers"]')
        card = seen.page.locator(f'article[data-worker-id="{chat["worker_id"]}"]')
        await card.locator("button.drain").click()
        await expect(card).to_have_attribute("data-state", "drained", timeout=30_000)
        await card.locator("button.resume").click()
        await expect(card).to_have_attribute("data-state", "running", timeout=30_000)
    assert not seen.errors, seen.errors

    # `jetbatch submit --wait` gets a batch's output beside its input.
    work = up.data_dir / "submitted"
    work.mkdir(exist_ok=True)
    (work / "few.jsonl").write_bytes(chat_jsonl(4, "cli"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "submit", str(work / "few.jsonl"), "--wait",
        cwd=REPO,
        env={**os.environ, "JETBATCH_API_URL": up.base_url, "JETBATCH_API_KEY": up.api_key},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, out.decode()
    lines = (work / "few.output.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in lines) == [f"cli-{i}" for i in range(4)]
