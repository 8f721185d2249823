"""Pass 2 of ingestion in its child process (services/api/publishing.py), against a real
nats-server: every line once, with its deterministic message id; a stop request honoured; a
file gone before it ran reported as such."""

from __future__ import annotations

from pathlib import Path

import msgspec
import nats
import pytest

from schemas.messages import RequestMessage
from services.api.children import SpareChild
from services.api.publishing import CHILD_MODULE, PublishJob, publish_in_child
from shared import bus
from tests.helpers import CHAT, CHAT_MODEL, chat_jsonl


def job_for(path: Path, batch_id: str = "batch_pub") -> PublishJob:
    return PublishJob(
        path=str(path),
        batch_id=batch_id,
        model=CHAT_MODEL,
        endpoint=CHAT,
        max_line_bytes=1024 * 1024,
        headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    )


async def keep_going() -> bool:
    return True


async def stop_now() -> bool:
    return False


async def stream_messages(nats_url: str) -> list[nats.aio.msg.Msg]:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(bus.REQUESTS.name)
        return [
            await js.get_msg(bus.REQUESTS.name, seq)
            for seq in range(info.state.first_seq, info.state.last_seq + 1)
        ] if info.state.messages else []  # fmt: skip
    finally:
        await nc.close()


async def ensure_streams(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        await bus.ensure_streams(nc.jetstream())
    finally:
        await nc.close()


async def test_the_child_publishes_every_line_once_with_its_message_id(
    nats_url: str, tmp_path: Path
) -> None:
    await ensure_streams(nats_url)
    path = tmp_path / "input.jsonl"
    path.write_bytes(b"\n" + chat_jsonl(300) + b"\n\n")  # blank lines are not requests
    outcome = await publish_in_child(job_for(path), nats_url, keep_going)
    assert outcome.published == 300 and not outcome.stopped
    messages = await stream_messages(nats_url)
    decoded = [msgspec.json.decode(m.data or b"", type=RequestMessage) for m in messages]
    assert [r.line for r in decoded] == list(range(300))
    assert [r.custom_id for r in decoded] == [f"req-{i}" for i in range(300)]
    assert {r.batch_id for r in decoded} == {"batch_pub"}
    assert all(m.subject == RequestMessage.subject_for(CHAT_MODEL, "batch") for m in messages)
    assert [(m.headers or {})[bus.MSG_ID] for m in messages] == [r.msg_id for r in decoded]
    assert all((m.headers or {}).get("traceparent") for m in messages)

    spare = SpareChild(CHILD_MODULE, ["5"])  # as the api runs it: started ahead, niced
    spare.start()
    try:
        again = await publish_in_child(job_for(path), nats_url, keep_going, await spare.take())
    finally:
        await spare.close()
    assert again.published == 300  # a re-drive
    assert len(await stream_messages(nats_url)) == 300  # the duplicate window dropped them


async def test_a_child_told_to_stop_stops_before_the_end_of_the_file(
    nats_url: str, tmp_path: Path
) -> None:
    await ensure_streams(nats_url)
    path = tmp_path / "input.jsonl"
    path.write_bytes(chat_jsonl(20_000))
    outcome = await publish_in_child(job_for(path), nats_url, stop_now, check_every_s=0.01)
    assert outcome.stopped
    assert len(await stream_messages(nats_url)) < 20_000


async def test_a_file_gone_before_publishing_is_file_not_found(
    nats_url: str, tmp_path: Path
) -> None:
    await ensure_streams(nats_url)
    with pytest.raises(FileNotFoundError):
        await publish_in_child(job_for(tmp_path / "gone.jsonl"), nats_url, keep_going)
