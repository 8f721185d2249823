"""A real headless browser for the admin page's tests: Debian's chromium (`/usr/bin/chromium`,
installed by `infra/install.sh --dev`) driven by Playwright, never a browser Playwright
downloads. A missing chromium fails the tests, it never skips them. Screenshots go to
tests/output/screenshots/ (git-ignored) for people to look at."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Request,
    async_playwright,
)

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SCREENSHOTS = Path(__file__).resolve().parents[1] / "output" / "screenshots"
VIEWPORT = {"width": 1400, "height": 860}


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    if shutil.which(str(CHROMIUM)) is None:  # not there, or not executable
        pytest.fail(f"{CHROMIUM} is missing: run infra/install.sh --dev (apt-get install chromium)")
    async with async_playwright() as p:
        launched = await p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Watched:
    """A page with what it logged and asked for."""

    page: Page
    context: BrowserContext
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    async def shot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
async def contexts(browser: Browser) -> AsyncIterator[list[BrowserContext]]:
    """Browser contexts a test opened (with `watched`), closed when it ends however it ends."""
    opened: list[BrowserContext] = []
    yield opened
    for context in opened:
        await context.close()


async def watched(
    browser: Browser, opened: list[BrowserContext], **context_options: object
) -> Watched:
    context = await browser.new_context(viewport=VIEWPORT, **context_options)  # type: ignore[arg-type]
    opened.append(context)
    page = await context.new_page()
    seen = Watched(page=page, context=context)

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            seen.errors.append(f"{message.text} ({message.location.get('url')})")

    def on_request(request: Request) -> None:
        seen.requests.append(f"{request.method} {request.url}")

    page.on("console", on_console)
    page.on("pageerror", lambda e: seen.errors.append(f"uncaught: {e}"))
    page.on("request", on_request)
    return seen
