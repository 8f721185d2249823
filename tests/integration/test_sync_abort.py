"""A synchronous request the api gives up on stops in the engine too (issue 13, section 4): when
its client goes away, or no answer comes within JETBATCH_SYNC_TIMEOUT_S, the api publishes an
InteractiveAbort and the worker running the request aborts it. What shows it is what an operator
sees: the worker's heartbeat (`GET /v1/workers`) drops `interactive_in_flight` back to 0 and
counts the request in `interactive_aborted`, long before the engine would have finished it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import pytest

from schemas.messages import InteractiveAbort, InteractiveRequest, ResultMessage
from services.inference import service as inference
from shared import bus, config
from shared.embedded import EmbeddedNats
from tests.helpers import API_KEY, CHAT, CHAT_MODEL, chat_body, wait_until
from tests.lifecycle_helpers import lifecycle_env, running_system

DELAY_S = 30.0  # what each request takes in the instant engine unless it is aborted
ABORTED_WITHIN_S = 10.0
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def env(database_url: str, nats_url: str, scratch_dir: Path) -> dict[str, str]:
    return lifecycle_env(
        database_url,
        nats_url,
        scratch_dir,
        JETBATCH_INSTANT_DELAY_S=str(DELAY_S),
        JETBATCH_HEARTBEAT_INTERVAL_S="0.2",
    )


async def worker_status(http: httpx.AsyncClient, **want: int) -> dict[str, Any] | None:
    """The worker's status once its heartbeat shows every field of `want` at that value."""
    workers = (await http.get("/workers")).json()["data"]
    if len(workers) != 1:
        return None
    status: dict[str, Any] = workers[0]
    return status if all(status.get(k) == v for k, v in want.items()) else None


async def test_a_client_that_goes_away_has_its_request_aborted_in_the_engine(
    env: dict[str, str],
) -> None:
    async with (
        running_system(env, start=("worker:w1",)) as system,
        httpx.AsyncClient(base_url=system.base_url, headers=AUTH) as http,
    ):
        await wait_until(lambda: worker_status(http), "the worker's heartbeat")
        leaving = httpx.AsyncClient(base_url=system.base_url, headers=AUTH, timeout=DELAY_S * 2)
        asked = asyncio.create_task(leaving.post("/chat/completions", json=chat_body("hi")))
        await wait_until(
            lambda: worker_status(http, interactive_in_flight=1), "the request in the engine"
        )
        assert not asked.done()
        asked.cancel()  # the client goes away: its connection is closed
        await asyncio.gather(asked, return_exceptions=True)
        await leaving.aclose()
        left_at = time.monotonic()
        await wait_until(
            lambda: worker_status(http, interactive_in_flight=0, interactive_aborted=1),
            "the worker to abort the request",
            timeout_s=ABORTED_WITHIN_S,
        )
        assert time.monotonic() - left_at < DELAY_S / 2


async def test_a_request_the_api_stops_waiting_for_is_aborted_in_the_engine(
    env: dict[str, str],
) -> None:
    env = {**env, "JETBATCH_SYNC_TIMEOUT_S": "1"}
    async with (
        running_system(env, start=("worker:w1",)) as system,
        httpx.AsyncClient(base_url=system.base_url, headers=AUTH, timeout=DELAY_S * 2) as http,
    ):
        await wait_until(lambda: worker_status(http), "the worker's heartbeat")
        started = time.monotonic()
        response = await http.post("/chat/completions", json=chat_body("hi"))
        assert response.status_code == 504, response.text
        await wait_until(
            lambda: worker_status(http, interactive_in_flight=0, interactive_aborted=1),
            "the worker to abort the request",
            timeout_s=ABORTED_WITHIN_S,
        )
        assert time.monotonic() - started < DELAY_S / 2


async def test_a_request_whose_abort_came_first_is_answered_499_without_running(
    env: dict[str, str], nats_server: EmbeddedNats
) -> None:
    """The abort and its request travel on different subscriptions: the abort may be handled
    first, and the request then never runs. The worker and its caller connect as their own
    roles (`inference`, `api`): the one may hear what the other sends."""
    setup = await bus.connect(nats_server.url, "setup")
    await bus.ensure_streams(setup.jetstream())
    await setup.close()
    settings = config.load({**env, "JETBATCH_NATS_URL": nats_server.url_for("inference")})
    stop = asyncio.Event()
    worker = asyncio.create_task(inference.run(settings, CHAT_MODEL, None, stop, "w-early"))
    nc = await bus.connect(nats_server.url_for("api"), "api")

    def request(request_id: str, endpoint: str) -> bytes:
        body = msgspec.json.encode(chat_body("hi"))
        return msgspec.json.encode(
            InteractiveRequest(
                request_id=request_id,
                endpoint=endpoint,
                model=CHAT_MODEL,
                body=msgspec.Raw(body),
            )  # fmt: skip
        )

    async def ask(
        payload: bytes, subject: str = InteractiveRequest.subject_for(CHAT_MODEL)
    ) -> ResultMessage | None:
        try:
            reply = await nc.request(subject, payload, 5)
        except nats.errors.NoRespondersError:
            return None
        return msgspec.json.decode(reply.data, type=ResultMessage)

    try:
        # An endpoint the model does not serve is refused at once: the worker is subscribed.
        refused = await wait_until(lambda: ask(request("req_probe", "/v1/embeddings")))
        assert refused.status_code == 400
        # An api from before projects asks on `jetbatch.interactive.<model>`: still answered.
        legacy = InteractiveRequest.legacy_subject.format(model=CHAT_MODEL)
        answered = await ask(request("req_legacy", "/v1/embeddings"), legacy)
        assert answered is not None and answered.status_code == 400
        abort = InteractiveAbort(request_id="req_early", reason="client_closed")
        await nc.publish(InteractiveAbort.subject_for(CHAT_MODEL), msgspec.json.encode(abort))
        await nc.flush()
        started = time.monotonic()
        result = await ask(request("req_early", CHAT))
        assert result is not None and result.status_code == 499, result
        assert result.error_code == "request_aborted"
        assert time.monotonic() - started < 5
    finally:
        await nc.close()
        stop.set()
        await asyncio.wait_for(worker, 30)
