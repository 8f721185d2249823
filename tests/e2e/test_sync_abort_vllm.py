"""A synchronous request whose client goes away stops in the real vLLM engine too (issue 13,
section 4), on the system as users run it: the worker's heartbeat (`GET /v1/workers`) shows the
request in the engine, then, once the client has left, back out of it and counted in
`interactive_aborted`, long before the generation it asked for could have finished."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import System
from tests.helpers import CHAT_MODEL, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

# ~25 tokens/s for one sequence on the 2-core CPU: 2,000 tokens would take over a minute.
LONG = {
    "model": CHAT_MODEL,
    "messages": [{"role": "user", "content": "Count from one to ten thousand in words."}],
    "max_tokens": 2000,
    "ignore_eos": True,
}
ABORTED_WITHIN_S = 15.0


async def chat_worker(http: httpx.AsyncClient, **want: int) -> dict[str, Any] | None:
    workers = (await http.get("/workers")).json()["data"]
    chat = [w for w in workers if w["model"] == CHAT_MODEL]
    if len(chat) != 1 or not all(chat[0].get(k) == v for k, v in want.items()):
        return None
    worker: dict[str, Any] = chat[0]
    return worker


async def test_a_client_that_leaves_has_its_request_aborted_in_vllm(system: System) -> None:
    auth = {"Authorization": f"Bearer {system.api_key}"}
    async with httpx.AsyncClient(base_url=system.base_url, headers=auth, timeout=30) as http:
        before = await wait_until(lambda: chat_worker(http, interactive_in_flight=0), "idle")
        aborted = before["interactive_aborted"]
        leaving = httpx.AsyncClient(base_url=system.base_url, headers=auth, timeout=300)
        asked = asyncio.create_task(leaving.post("/chat/completions", json=LONG))
        await wait_until(
            lambda: chat_worker(http, interactive_in_flight=1), "the request in vLLM", timeout_s=60
        )
        assert not asked.done()
        asked.cancel()  # the client goes away: its connection closes
        await asyncio.gather(asked, return_exceptions=True)
        await leaving.aclose()
        left_at = time.monotonic()
        await wait_until(
            lambda: chat_worker(http, interactive_in_flight=0, interactive_aborted=aborted + 1),
            "the worker to abort it in vLLM",
            timeout_s=ABORTED_WITHIN_S,
        )
        assert time.monotonic() - left_at < ABORTED_WITHIN_S
        # The engine is free again: a short request is answered at once.
        short = {**LONG, "max_tokens": 4, "ignore_eos": False}
        answer = await http.post("/chat/completions", json=short)
        assert answer.status_code == 200, answer.text
