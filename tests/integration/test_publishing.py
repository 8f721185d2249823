"""Pass 2 of ingestion in the api's publishing child (services/api/publishing.py), against a real
nats-server: grants publish their lines once each, with deterministic message ids, lines of a
shared prefix together; a re-grant is dropped by the duplicate window; a file gone is reported
as such; a child that dies is replaced."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from unittest.mock import patch

import msgspec
import nats

from schemas.messages import DISPATCHED, RequestMessage
from services.api.publishing import (
    FILE_GONE,
    Grant,
    PublishingChild,
    PublishJob,
    _OpenFile,
    prefix_key,
)
from services.api.validation import iter_requests
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


def decoded(messages: list[nats.aio.msg.Msg]) -> list[RequestMessage]:
    return [msgspec.json.decode(m.data or b"", type=RequestMessage) for m in messages]


async def test_grants_publish_every_line_once_with_its_message_id(
    nats_url: str, tmp_path: Path
) -> None:
    await ensure_streams(nats_url)
    path = tmp_path / "input.jsonl"
    path.write_bytes(b"\n" + chat_jsonl(300) + b"\n\n")  # blank lines are not requests
    child = PublishingChild(nats_url, nice=5)  # as the api runs it: niced
    try:
        first = await child.run(Grant(job=job_for(path), start=0, count=120))
        rest = await child.run(Grant(job=job_for(path), start=120, count=500))
        assert (first.published, first.eof) == (120, False)
        assert (rest.published, rest.eof) == (180, True)
        messages = await stream_messages(nats_url)
        requests = decoded(messages)
        assert [r.line for r in requests] == list(range(300))
        assert [r.custom_id for r in requests] == [f"req-{i}" for i in range(300)]
        assert {r.batch_id for r in requests} == {"batch_pub"}
        assert all(
            m.subject == RequestMessage.subject_for(CHAT_MODEL, DISPATCHED) for m in messages
        )
        assert [(m.headers or {})[bus.MSG_ID] for m in messages] == [r.msg_id for r in requests]
        assert all((m.headers or {}).get("traceparent") for m in messages)

        # A re-drive from an older cursor: the child re-reads the file from that line, and the
        # stream's duplicate window drops what it already holds.
        again = await child.run(Grant(job=job_for(path), start=100, count=200))
        assert again.published == 200
        assert len(await stream_messages(nats_url)) == 300
    finally:
        await child.close()


async def test_lines_that_share_a_system_prompt_are_published_together(
    nats_url: str, tmp_path: Path
) -> None:
    await ensure_streams(nats_url)
    systems = ["You are a pirate.", "You are a judge.", "You are a poet."]
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": CHAT,
            "body": {
                "model": CHAT_MODEL,
                "messages": [
                    {"role": "system", "content": systems[i % 3]},
                    {"role": "user", "content": f"question {i}"},
                ],
            },
        }
        for i in range(12)
    ]
    path = tmp_path / "input.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    child = PublishingChild(nats_url)
    try:
        # Grants of any size: the order is the file's block's, not the grant's.
        await child.run(Grant(job=job_for(path), start=0, count=5))
        await child.run(Grant(job=job_for(path), start=5, count=7))
    finally:
        await child.close()
    order = [r.line for r in decoded(await stream_messages(nats_url))]
    assert order == [0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11]  # groups by first appearance


def test_a_cursor_names_the_same_lines_after_a_re_drive(tmp_path: Path) -> None:
    path = tmp_path / "input.jsonl"
    systems = [f"system prompt {k}" for k in range(5)]
    path.write_text(
        "".join(
            json.dumps({"custom_id": f"r{i}", "method": "POST", "url": CHAT, "body": {
                "model": CHAT_MODEL, "messages": [{"role": "system", "content": systems[i % 5]}]
            }}) + "\n"
            for i in range(25)
        )
    )  # fmt: skip

    def opened() -> _OpenFile:
        return _OpenFile(iter_requests(path, 1 << 20), CHAT)

    whole = [i for i, _ in opened().take(100)]
    assert sorted(whole) == list(range(25)) and whole[:5] == [0, 5, 10, 15, 20]
    for cursor in (0, 3, 11, 24, 25):
        resumed = opened()
        resumed.take(cursor)
        assert [i for i, _ in resumed.take(100)] == whole[cursor:]
    with patch("services.api.publishing.BLOCK_LINES", 10):  # blocks of 10 lines
        blocks = [i for i, _ in opened().take(100)]
    assert blocks[:10] == [0, 5, 1, 6, 2, 7, 3, 8, 4, 9] and sorted(blocks) == list(range(25))


def test_the_prefix_key_is_the_system_prompt_or_the_prompt_start() -> None:
    def body(value: object) -> msgspec.Raw:
        return msgspec.Raw(json.dumps(value).encode())

    sys_a = [{"role": "system", "content": "A"}]
    assert prefix_key(body({"messages": [*sys_a, {"role": "user", "content": "1"}]})) == prefix_key(
        body({"messages": [*sys_a, {"role": "user", "content": "2"}]})
    )
    assert prefix_key(body({"prompt": "x" * 600 + "1"})) == prefix_key(body({"prompt": "x" * 600}))
    assert prefix_key(body({"prompt": "a"})) != prefix_key(body({"prompt": "b"}))
    assert prefix_key(msgspec.Raw(b"not json")) == b""


async def test_a_file_gone_is_reported_and_a_dead_child_is_replaced(
    nats_url: str, tmp_path: Path
) -> None:
    await ensure_streams(nats_url)
    child = PublishingChild(nats_url)
    try:
        gone = await child.run(Grant(job=job_for(tmp_path / "gone.jsonl"), start=0, count=10))
        assert (gone.published, gone.error) == (0, FILE_GONE)
        assert child._child is not None
        os.kill(child._child.pid, signal.SIGKILL)
        await child._child.wait()
        path = tmp_path / "input.jsonl"
        path.write_bytes(chat_jsonl(5))
        done = await child.run(Grant(job=job_for(path), start=0, count=10))
        assert (done.published, done.eof, done.error) == (5, True, None)
    finally:
        await child.close()
