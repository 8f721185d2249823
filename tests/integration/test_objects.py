"""The files bucket (shared/bus/objects.py) on a real nats-server: chunked put and read,
compatibility with nats-py's own object store both ways, nothing left by a failed put, orphan
chunks of a crashed put swept, replicas never lowered."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared import bus
from shared.bus.objects import (
    CHUNK_BYTES,
    FILES_BUCKET,
    ObjectMissing,
    files_bucket,
)
from shared.bus.streams import ReplicasUnavailable


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def _read(files, key: str) -> bytes:  # type: ignore[no-untyped-def]
    return b"".join([c async for c in files.iter_bytes(key)])


async def test_put_and_read_in_chunks(nats_url: str, tmp_path: Path) -> None:
    nc = await bus.connect(nats_url, "t")
    try:
        files = await files_bucket(nc.jetstream())
        data = os.urandom(3 * CHUNK_BYTES + 12_345)
        assert await files.put("file-a", _chunks(data, 70_000)) == len(data)
        assert await files.size("file-a") == len(data)
        pieces = [c async for c in files.iter_bytes("file-a")]
        assert b"".join(pieces) == data
        assert max(len(p) for p in pieces) <= CHUNK_BYTES  # never the whole file at once
        async with files.local_copy("file-a", tmp_path) as path:
            assert path.read_bytes() == data
        assert not path.exists()
        # Replaced: the new bytes, and the old chunks are gone from the stream.
        await files.put("file-a", _chunks(b"short", 2))
        assert await _read(files, "file-a") == b"short"
        info = await nc.jetstream().stream_info(files.stream)
        assert info.state.messages == 2  # one chunk + one meta
        assert await files.delete("file-a")
        assert await files.size("file-a") is None
        with pytest.raises(ObjectMissing):
            await _read(files, "file-a")
        assert not await files.delete("file-a")
        # An empty file is an object too.
        await files.put("file-empty", _chunks(b"", 1))
        assert await files.size("file-empty") == 0
        assert await _read(files, "file-empty") == b""
    finally:
        await nc.close()


async def test_nats_py_reads_ours_and_we_read_nats_pys(nats_url: str) -> None:
    nc = await bus.connect(nats_url, "t")
    try:
        js = nc.jetstream()
        files = await files_bucket(js)
        theirs = await js.object_store(FILES_BUCKET)
        data = os.urandom(2 * CHUNK_BYTES + 7)
        await files.put("ours", _chunks(data, 1000))
        assert (await theirs.get("ours")).data == data  # also checks our digest
        await theirs.put("theirs", data)
        assert await _read(files, "theirs") == data
    finally:
        await nc.close()


async def test_a_failed_put_leaves_nothing(nats_url: str) -> None:
    nc = await bus.connect(nats_url, "t")
    try:
        files = await files_bucket(nc.jetstream())

        async def broken() -> AsyncIterator[bytes]:
            yield os.urandom(3 * CHUNK_BYTES)
            raise ConnectionResetError("client went away")

        with pytest.raises(ConnectionResetError):
            await files.put("file-cut", broken())
        assert await files.size("file-cut") is None
        info = await nc.jetstream().stream_info(files.stream)
        assert info.state.messages == 0
    finally:
        await nc.close()


async def test_sweep_purges_only_old_orphan_chunks(nats_url: str) -> None:
    nc = await bus.connect(nats_url, "t")
    try:
        js = nc.jetstream()
        files = await files_bucket(js)
        await files.put("kept", _chunks(b"x" * 1000, 100))
        # A put cut short by a crash: chunks published, no meta.
        await js.publish(f"$O.{FILES_BUCKET}.C.orphannuid", b"partial")
        assert await files.sweep_orphans(min_age_s=3600) == 0  # could be an upload in progress
        assert await files.sweep_orphans(min_age_s=0) == 1
        assert await _read(files, "kept") == b"x" * 1000
        info = await js.stream_info(files.stream)
        assert info.state.messages == 2
    finally:
        await nc.close()


async def test_replicas_never_lowered_and_too_many_refused(nats_url: str) -> None:
    nc = await bus.connect(nats_url, "t")
    try:
        js = nc.jetstream()
        with pytest.raises(ReplicasUnavailable, match="JETBATCH_NATS_REPLICAS=3"):
            await files_bucket(js, replicas=3)
        files = await files_bucket(js, replicas=1)
        info = await js.stream_info(files.stream)
        assert info.config.num_replicas == 1
        # An operator's limit is kept by a restart.
        await js.update_stream(dataclasses.replace(info.config, max_bytes=10**9))
        await files_bucket(js, replicas=1)
        assert (await js.stream_info(files.stream)).config.max_bytes == 10**9
    finally:
        await nc.close()
