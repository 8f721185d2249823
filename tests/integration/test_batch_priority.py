"""Batch priority and completion windows (README: Scheduling), through the official openai SDK
against the api with a real PostgreSQL and nats-server: the priority as an extension field or a
metadata key, bounded by the project's max_batch_priority (raised through the admin API), shown
on the batch object and carried by every request message; windows from 1h to 7d."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec
import nats
import openai
import pytest

from schemas.messages import RequestMessage
from schemas.projects import DEFAULT_PROJECT_ID
from services.api.service import running
from shared import bus, config
from tests.helpers import API_KEY, CHAT, chat_line, wait_until
from tests.openai_schema import validate


@pytest.fixture
def api_env(base_api_env: dict[str, str]) -> dict[str, str]:
    return {**base_api_env, "JETBATCH_MAX_ACTIVE_BATCHES": "100"}


async def upload(client: openai.AsyncOpenAI, lines: int = 2) -> str:
    content = b"\n".join(chat_line(f"r{i}") for i in range(lines))
    return (await client.files.create(file=("in.jsonl", content), purpose="batch")).id


async def refused(client: openai.AsyncOpenAI, file_id: str, **fields: Any) -> dict[str, Any]:
    """The 400's error object, in OpenAI's shape."""
    body = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h", **fields}
    with pytest.raises(openai.BadRequestError) as refusal:
        await client.batches.create(**body)
    error = refusal.value.body
    assert isinstance(error, dict) and set(error) >= {"message", "type", "param", "code"}
    return error


def priority_of(batch: Any) -> Any:
    return (batch.model_extra or {})["priority"]


async def test_priority_from_extra_body_or_metadata_is_bounded_by_the_project_and_shown(
    client: openai.AsyncOpenAI, api: str
) -> None:
    file_id = await upload(client)
    plain = await client.batches.create(
        input_file_id=file_id, endpoint=CHAT, completion_window="24h"
    )
    assert priority_of(plain) == 0
    lower = await client.batches.create(
        input_file_id=file_id, endpoint=CHAT, completion_window="24h", extra_body={"priority": -3}
    )
    assert priority_of(lower) == -3
    assert priority_of(await client.batches.retrieve(lower.id)) == -3
    by_metadata = await client.batches.create(
        input_file_id=file_id,
        endpoint=CHAT,
        completion_window="24h",
        metadata={"jetbatch_priority": "-10"},
    )
    assert priority_of(by_metadata) == -10
    both = await client.batches.create(
        input_file_id=file_id,
        endpoint=CHAT,
        completion_window="24h",
        metadata={"jetbatch_priority": "-2"},
        extra_body={"priority": -2},
    )
    assert priority_of(both) == -2

    # A project may only lower its priority until an admin allows more (default max 0).
    error = await refused(client, file_id, extra_body={"priority": 1})
    assert (error["param"], error["code"]) == ("priority", "priority_not_allowed")
    assert "max_batch_priority 0" in error["message"]
    error = await refused(client, file_id, metadata={"jetbatch_priority": "3"})
    assert error["param"] == "priority"
    for bad in (11, -11, "5", 1.5, True):
        error = await refused(client, file_id, extra_body={"priority": bad})
        assert error["param"] == "priority", (bad, error)
    for text in ("high", "11", "", "1e1"):
        error = await refused(client, file_id, metadata={"jetbatch_priority": text})
        assert error["param"] == "metadata.jetbatch_priority", (text, error)
    error = await refused(
        client, file_id, metadata={"jetbatch_priority": "-1"}, extra_body={"priority": -2}
    )
    assert error["param"] == "priority" and "disagree" in error["message"]

    org = openai.AsyncOpenAI(base_url=api, admin_api_key=API_KEY, max_retries=0)
    projects = org.admin.organization.projects
    raised = await projects.update(DEFAULT_PROJECT_ID, extra_body={"max_batch_priority": 5})
    assert (raised.model_extra or {})["max_batch_priority"] == 5
    assert raised.name  # unchanged
    retrieved = await projects.retrieve(DEFAULT_PROJECT_ID)
    assert (retrieved.model_extra or {})["max_batch_priority"] == 5
    with pytest.raises(openai.BadRequestError) as too_high:
        await projects.update(DEFAULT_PROJECT_ID, extra_body={"max_batch_priority": 11})
    assert too_high.value.body["param"] == "max_batch_priority"  # type: ignore[index]

    high = await client.batches.create(
        input_file_id=file_id, endpoint=CHAT, completion_window="24h", extra_body={"priority": 5}
    )
    assert priority_of(high) == 5
    error = await refused(client, file_id, extra_body={"priority": 6})
    assert "max_batch_priority 5" in error["message"]

    async with httpx.AsyncClient(headers={"authorization": f"Bearer {API_KEY}"}) as http:
        listed = (await http.get(f"{api}/batches")).json()
    validate("ListBatchesResponse", listed)  # the extra field keeps OpenAI's schema
    assert {b["id"]: b["priority"] for b in listed["data"]}[high.id] == 5


async def test_the_batch_priority_reaches_every_request_message(
    client: openai.AsyncOpenAI, nats_url: str
) -> None:
    file_id = await upload(client, lines=3)
    batch = await client.batches.create(
        input_file_id=file_id, endpoint=CHAT, completion_window="24h", extra_body={"priority": -7}
    )
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()

        async def published() -> list[RequestMessage] | None:
            info = await js.stream_info(bus.REQUESTS.name)
            if info.state.messages < 3:
                return None
            raw = [
                await js.get_msg(bus.REQUESTS.name, seq)
                for seq in range(info.state.first_seq, info.state.last_seq + 1)
            ]
            return [msgspec.json.decode(m.data or b"", type=RequestMessage) for m in raw]

        messages = await wait_until(published, "the batch's requests on REQUESTS", timeout_s=20)
    finally:
        await nc.close()
    assert [(m.batch_id, m.priority) for m in messages] == [(batch.id, -7)] * 3


async def test_completion_windows_from_1h_to_7d_set_expires_at(
    client: openai.AsyncOpenAI,
) -> None:
    file_id = await upload(client)
    for window, seconds in (("24h", 86_400), ("1h", 3_600), ("36h", 129_600), ("7d", 604_800)):
        batch = await client.batches.create(
            input_file_id=file_id,
            endpoint=CHAT,
            completion_window=window,  # type: ignore[arg-type]
        )
        assert batch.completion_window == window
        assert batch.expires_at == batch.created_at + seconds, window
    for window in ("0h", "8d", "169h", "24 h", "1w", "h", "-1h", "01h", ""):
        error = await refused(client, file_id, completion_window=window)
        assert error["param"] == "completion_window", (window, error)


async def test_a_shortened_24h_window_scales_the_other_windows(
    base_api_env: dict[str, str],
) -> None:
    env = {**base_api_env, "JETBATCH_COMPLETION_WINDOW_S": "60"}
    async with running(config.load(env)) as base_url:
        client = openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0)
        file_id = await upload(client)
        for window, seconds in (("24h", 60), ("48h", 120), ("12h", 30), ("1h", 2)):
            batch = await client.batches.create(
                input_file_id=file_id,
                endpoint=CHAT,
                completion_window=window,  # type: ignore[arg-type]
            )
            assert batch.expires_at == batch.created_at + seconds, window


async def test_a_projects_share_is_set_by_an_admin_and_must_be_above_zero(api: str) -> None:
    org = openai.AsyncOpenAI(base_url=api, admin_api_key=API_KEY, max_retries=0)
    projects = org.admin.organization.projects
    created = await projects.create(name="weighted", extra_body={"share": 3})
    assert (created.model_extra or {})["share"] == 3
    assert ((await projects.retrieve(DEFAULT_PROJECT_ID)).model_extra or {})["share"] == 1
    halved = await projects.update(created.id, extra_body={"share": 0.5})
    assert (halved.model_extra or {})["share"] == 0.5
    for bad in (0, -1, 2_000_000, "many"):
        with pytest.raises(openai.BadRequestError) as refusal:
            await projects.update(created.id, extra_body={"share": bad})
        error = refusal.value.body
        assert isinstance(error, dict) and error["param"] == "share", (bad, error)
        assert error["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as refusal:
        await projects.create(name="nothing", extra_body={"share": 0})
    assert refusal.value.body["param"] == "share"  # type: ignore[index]
    assert ((await projects.retrieve(created.id)).model_extra or {})["share"] == 0.5
