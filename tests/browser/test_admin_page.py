"""The admin page in a real browser (headless chromium), against the whole system on the instant
engine: the page loads every view without a console error, a running batch's progress reaches
it through its event stream alone until it completes, a dead letter is replayed and a worker
drained from it; and its session: the login form, the 403 page, CSRF, the key's revocation."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import pytest
from playwright.async_api import Browser, BrowserContext, Route, expect

from schemas.messages import ResultMessage, WorkerHeartbeat
from shared import bus
from tests.browser.conftest import Watched, watched
from tests.helpers import API_KEY, CHAT, CHAT_MODEL, chat_jsonl, wait_until
from tests.lifecycle_helpers import System, lifecycle_env, running_system

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
VIEWS = ("batches", "workers", "queues", "dead-letters", "webhooks", "logs", "usage")
# Lines take 0.1 s, two at a time: a 60-line batch runs for about 3 s, long enough to watch.
SLOW = {"JETBATCH_INSTANT_DELAY_S": "0.1", "JETBATCH_MAX_IN_FLIGHT": "2"}


@pytest.fixture
async def system(database_url: str, nats_url: str, scratch_dir: Path) -> AsyncIterator[System]:
    env = lifecycle_env(database_url, nats_url, scratch_dir, **SLOW)
    async with running_system(env) as running:
        yield running


@pytest.fixture
async def api_only(database_url: str, nats_url: str, scratch_dir: Path) -> AsyncIterator[System]:
    """The api alone, for the tests of the session."""
    env = lifecycle_env(database_url, nats_url, scratch_dir)
    async with running_system(env, start=()) as running:
        yield running


def root(system: System) -> str:
    return system.base_url.removesuffix("/v1")


def admin_http(system: System, key: str = API_KEY) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=system.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )


async def log_in(seen: Watched, system: System, key: str = API_KEY) -> None:
    await seen.page.goto(f"{root(system)}/admin")
    await seen.page.fill("#key", key)
    await seen.page.click("#login button[type=submit]")
    await expect(seen.page.locator("#nav")).to_be_visible()


async def dead_letter(system: System, nats_url: str) -> dict[str, Any]:
    """A result the results writer cannot use: a dead letter that can be replayed."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await bus.ensure_streams(js)
        await js.publish(ResultMessage.subject_for("batch_page"), b"{broken")
    finally:
        await nc.close()
    async with admin_http(system) as http:

        async def listed() -> list[dict[str, Any]]:
            return (await http.get("/dead_letters")).json()["data"]  # type: ignore[no-any-return]

        [letter] = await wait_until(listed, "the dead letter")
    return letter


async def gpu_worker(nats_url: str) -> None:
    """A heartbeat as a worker on a GPU sends one (the instant engine's report none)."""
    now = int(time.time())
    beat = WorkerHeartbeat(
        worker_id="gpu-host-0", host="gpu-host", pid=4242, model=CHAT_MODEL, endpoints=[CHAT],
        engine="vllm", started_at=now - 600, seen_at=now, in_flight=96, capacity=128,
        completed=18_250, tokens_per_s=2_310.5, gpu_index=0, gpu_name="NVIDIA H200",
        gpu_memory_used_mb=118_000, gpu_memory_total_mb=143_771, gpu_temperature_c=71,
        gpu_utilization_pct=93,
    )  # fmt: skip
    nc = await nats.connect(nats_url)
    try:
        kv = await bus.workers_kv(nc.jetstream(), 1)
        await kv.put(beat.worker_id, msgspec.json.encode(beat))
    finally:
        await nc.close()


async def test_the_page_loads_every_view_without_console_errors(
    browser: Browser, system: System, nats_url: str, contexts: list[BrowserContext]
) -> None:
    batch_id = await system.create(chat_jsonl(4))
    await system.wait_batch(batch_id, {"completed"})
    await dead_letter(system, nats_url)
    await gpu_worker(nats_url)
    seen = await watched(browser, contexts)
    await log_in(seen, system)
    for view in VIEWS:
        await seen.page.click(f'#nav a[data-view="{view}"]')
        section = seen.page.locator(f"#view-{view}")
        await expect(section).to_be_visible()
        await expect(section).to_have_attribute("data-loaded", "true")
        await seen.shot(f"admin-{view}")
    gauges = seen.page.locator('article[data-worker-id="gpu-host-0"] .gauge')
    await expect(gauges).to_have_count(4)  # capacity, GPU memory, temperature, utilisation
    await expect(gauges.nth(2)).to_contain_text("71 °C")
    await expect(seen.page.locator(f'tr[data-batch-id="{batch_id}"] .badge')).to_have_text(
        "completed"
    )
    assert not seen.errors, seen.errors


async def test_a_running_batch_progress_reaches_the_page_only_through_its_event_stream(
    browser: Browser, system: System, contexts: list[BrowserContext]
) -> None:
    finished = await system.create(chat_jsonl(5, "early"))  # a neighbour, for the screenshot
    await system.wait_batch(finished, {"completed"})
    batch_id = await system.create(chat_jsonl(60))
    await system.wait_batch(batch_id, {"in_progress"})
    seen = await watched(browser, contexts)

    async def frozen_list(route: Route) -> None:
        # The list of batches says this batch is where it was at the start, however far it
        # gets: if the page showed progress from the list, it would never see it complete.
        response = await route.fetch()
        body = await response.json()
        for b in body["data"]:
            if b["id"] == batch_id:
                b.update(status="in_progress", completed_at=None, output_file_id=None)
                b["request_counts"] = {"total": 60, "completed": 0, "failed": 0}
        await route.fulfill(response=response, json=body)

    await seen.page.route(re.compile(r"/v1/batches(\?.*)?$"), frozen_list)
    await log_in(seen, system)
    row = seen.page.locator(f'tr[data-batch-id="{batch_id}"]')
    bar = row.locator('[role="progressbar"]')
    # Re-read on every poll: each event re-renders the row (a new bar element).
    await seen.page.wait_for_function(
        """(selector) => { const bar = document.querySelector(selector);
            const v = bar ? Number(bar.getAttribute("aria-valuenow")) : 0;
            return v > 0 && v < 100; }""",
        arg=f'tr[data-batch-id="{batch_id}"] [role="progressbar"]',
        timeout=30_000,
    )
    await expect(row.locator(".rate")).to_contain_text("lines/s")
    shot = await seen.shot("admin-batches-running")
    await expect(row.locator(".badge")).to_have_text("completed", timeout=30_000)
    await expect(bar).to_have_attribute("aria-valuenow", "100")
    await seen.shot("admin-batches-completed")
    stream = f"/v1/batches/{batch_id}/events"
    assert any(r.startswith("GET ") and stream in r for r in seen.requests), seen.requests
    polled = re.compile(rf"/v1/batches/{batch_id}(\?.*)?$")
    assert not [r for r in seen.requests if polled.search(r)], seen.requests
    assert not seen.errors, seen.errors
    shutil.copyfile(shot, REPO / "docs" / "admin.png")


async def test_a_dead_letter_is_replayed_from_the_page(
    browser: Browser, system: System, nats_url: str, contexts: list[BrowserContext]
) -> None:
    letter = await dead_letter(system, nats_url)
    seen = await watched(browser, contexts)
    await log_in(seen, system)
    await seen.page.click('#nav a[data-view="dead-letters"]')
    row = seen.page.locator(f'tr[data-dead-letter-id="{letter["id"]}"]')
    await row.locator("button.replay").click()
    await expect(row.locator(".replayed")).to_contain_text("1×")
    await seen.shot("admin-dead-letters-replayed")
    async with admin_http(system) as http:
        replayed = (await http.get(f"/dead_letters/{letter['id']}")).json()
    assert replayed["replay_count"] == 1 and replayed["replayed_at"] is not None


async def test_a_worker_is_drained_and_resumed_from_the_page(
    browser: Browser, system: System, contexts: list[BrowserContext]
) -> None:
    seen = await watched(browser, contexts)
    await log_in(seen, system)
    await seen.page.click('#nav a[data-view="workers"]')
    card = seen.page.locator('article[data-worker-id="w1"]')
    await card.locator("button.drain").click()
    await expect(card).to_have_attribute("data-state", re.compile("draining|drained"))
    await seen.shot("admin-workers-drained")
    async with admin_http(system) as http:
        [worker] = (await http.get("/workers")).json()["data"]
        assert worker["state"] in ("draining", "drained") and worker["command"] == "drain"
        await card.locator("button.resume").click()
        await expect(card).to_have_attribute("data-state", "running")
        [worker] = (await http.get("/workers")).json()["data"]
    assert worker["state"] == "running"


async def test_without_a_key_the_login_form_opens_a_session_and_logout_ends_it(
    browser: Browser, api_only: System, contexts: list[BrowserContext]
) -> None:
    seen = await watched(browser, contexts)
    await seen.page.goto(f"{root(api_only)}/admin")
    await expect(seen.page.locator("#login")).to_be_visible()
    await seen.shot("admin-login")
    await seen.page.fill("#key", "sk-not-a-key")
    await seen.page.click("#login button[type=submit]")
    await expect(seen.page.locator("#login-error")).to_contain_text("Incorrect API key")
    await log_in(seen, api_only)
    [cookie] = await seen.context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict", cookie
    assert API_KEY not in cookie["value"]
    await seen.page.click("#logout")
    await expect(seen.page.locator("#login")).to_be_visible()
    stale = await seen.context.request.get(f"{api_only.base_url}/dead_letters")
    assert stale.status == 401


async def test_a_project_key_gets_the_403_page(
    browser: Browser, api_only: System, contexts: list[BrowserContext]
) -> None:
    async with admin_http(api_only) as http:
        project = (await http.post("/organization/projects", json={"name": "team"})).json()
        account = (
            await http.post(
                f"/organization/projects/{project['id']}/service_accounts", json={"name": "bot"}
            )
        ).json()
    project_key = account["api_key"]["value"]
    seen = await watched(
        browser, contexts, extra_http_headers={"Authorization": f"Bearer {project_key}"}
    )
    response = await seen.page.goto(f"{root(api_only)}/admin")
    assert response is not None and response.status == 403
    await expect(seen.page.locator("#forbidden")).to_contain_text("not an admin key")
    await seen.shot("admin-forbidden")
    seen = await watched(browser, contexts)
    await seen.page.goto(f"{root(api_only)}/admin")
    await seen.page.fill("#key", project_key)
    await seen.page.click("#login button[type=submit]")
    await expect(seen.page.locator("#login-error")).to_contain_text("project key")
    assert not await seen.context.cookies()


async def test_a_state_changing_request_without_the_csrf_token_is_refused(
    browser: Browser, api_only: System, contexts: list[BrowserContext]
) -> None:
    seen = await watched(browser, contexts)
    await log_in(seen, api_only)
    csrf = await seen.page.locator('meta[name="csrf-token"]').get_attribute("content")
    assert csrf
    url = f"{api_only.base_url}/organization/admin_api_keys"
    refused = await seen.context.request.post(url, data={"name": "page"})
    assert refused.status == 403
    assert (await refused.json())["error"]["code"] == "csrf_token_invalid"
    wrong = await seen.context.request.post(
        url, data={"name": "page"}, headers={"X-CSRF-Token": csrf + "x"}
    )
    assert wrong.status == 403
    made = await seen.context.request.post(
        url, data={"name": "page"}, headers={"X-CSRF-Token": csrf}
    )
    assert made.status == 200, await made.text()
    read = await seen.context.request.get(f"{api_only.base_url}/dead_letters")  # no token to read
    assert read.status == 200


async def test_the_session_dies_when_its_key_is_revoked(
    browser: Browser, api_only: System, contexts: list[BrowserContext]
) -> None:
    async with admin_http(api_only) as http:
        key = (await http.post("/organization/admin_api_keys", json={"name": "ops"})).json()
        seen = await watched(browser, contexts)
        await log_in(seen, api_only, key["value"])
        await expect(seen.page.locator("#view-batches")).to_have_attribute("data-loaded", "true")
        assert (await seen.context.request.get(f"{api_only.base_url}/dead_letters")).status == 200
        deleted = await http.delete(f"/organization/admin_api_keys/{key['id']}")
        assert deleted.status_code == 200, deleted.text
    after = await seen.context.request.get(f"{api_only.base_url}/dead_letters")
    assert after.status == 401
    assert json.loads(await after.text())["error"]["code"] == "session_ended"
    # The page notices on its next refresh and shows the login form.
    await expect(seen.page.locator("#login")).to_be_visible(timeout=15_000)
