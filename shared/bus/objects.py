"""File bytes in a JetStream Object Store bucket, replicated like the streams.

Every file jetbatch keeps (batch input files, output and error files) is one object, named by the
file's storage key, in bucket `jetbatch_files` (stream `OBJ_jetbatch_files`). Any process that
reaches NATS reads and writes them, so no two services share a directory.

Bytes move in chunks both ways and never sit whole in a process:
- `put` publishes the chunks of an async source one by one (each acknowledged by JetStream),
  then the object's meta message; until that lands the object does not exist. A put that fails
  purges its chunks; one cut short by a crash leaves chunks without a meta, which
  `sweep_orphans` (run by the watchdog) purges once they are older than any upload in progress.
- `iter_bytes` reads chunk after chunk with direct gets (`next_by_subj`): one chunk in memory at
  a time, whatever the reader's speed, no consumer to clean up. A follower that has not caught
  up yet (direct gets may be answered by any replica) is asked again through the leader.

The wire format is nats-py's own (`nats.js.object_store`): the same chunk and meta subjects,
meta JSON and SHA-256 digest, so `nats object get` and nats-py's `ObjectStore.get` read what
jetbatch writes and the other way round (tests/integration/test_objects.py checks both ways).
nats-py's `put` reads a blocking file object in the default thread pool; an upload streams from
an HTTP body, so `put` here takes an async source instead.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterable, AsyncIterator
from datetime import UTC, datetime
from hashlib import sha256
from pathlib import Path
from typing import Any

import anyio
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, NotFoundError
from nats.js.kv import MSG_ROLLUP_SUBJECT
from nats.js.object_store import (
    OBJ_ALL_CHUNKS_PRE_TEMPLATE,
    OBJ_CHUNKS_PRE_TEMPLATE,
    OBJ_DEFAULT_CHUNK_SIZE,
    OBJ_DIGEST_TEMPLATE,
    OBJ_META_PRE_TEMPLATE,
    OBJ_STREAM_TEMPLATE,
    ObjectStore,
)
from nats.nuid import NUID

from shared.bus.streams import ensure_stream, replicas_error, through_elections

log = logging.getLogger(__name__)

FILES_BUCKET = "jetbatch_files"
CHUNK_BYTES = OBJ_DEFAULT_CHUNK_SIZE
# Chunks of a put that never got its meta are purged once the newest is this old: far longer
# than any upload in progress goes without a chunk (a stalled HTTP body times out first).
ORPHAN_AGE_S = 900.0
# A chunk a follower does not have yet: asked of the leader, then again for this long.
MISSING_CHUNK_WAIT_S = 5.0
# How long a write waits out a leader election (one node of three lost) before it gives up: a
# request is waiting on it (an upload answers 503 then, and the client tries again).
ELECTION_WAIT_S = 15.0
ELECTION_POLL_S = 1.0  # asked again at least this often meanwhile
MSG_ID = "Nats-Msg-Id"


class ObjectMissing(Exception):
    """No object under that key (never written, or deleted)."""


class ObjectCorrupt(Exception):
    """An object's chunks do not add up to its meta (size, count or digest)."""


class FileObjects:
    """The files bucket: put, read, copy to a local file, delete, sweep."""

    def __init__(self, js: JetStreamContext, store: ObjectStore, bucket: str = FILES_BUCKET):
        self.js = js
        self._store = store
        self.bucket = bucket
        self.stream = OBJ_STREAM_TEMPLATE.format(bucket=bucket)
        self._nuid = NUID()

    # Writing ---------------------------------------------------------------------------------

    def writer(self, key: str) -> ObjectWriter:
        """`async with files.writer(key) as w: await w.write(data)`: the object exists, replacing
        what was under `key`, once the block exits without an exception; one that raises leaves
        nothing behind."""
        return ObjectWriter(self, key, self._nuid.next().decode())

    async def put(self, key: str, source: AsyncIterable[bytes]) -> int:
        """Store the bytes of `source` under `key`; returns the size."""
        async with self.writer(key) as w:
            async for data in source:
                await w.write(data)
        return w.size

    async def put_path(self, key: str, path: Path) -> int:
        return await self.put(key, _read_file(path))

    async def delete(self, key: str) -> bool:
        """Purge the object's chunks and mark it deleted. False if there was none."""
        info = await self.info_or_none(key)
        if info is None:
            return False
        await self._store.delete(key)
        return True

    # Reading ---------------------------------------------------------------------------------

    async def size(self, key: str) -> int | None:
        info = await self.info_or_none(key)
        return None if info is None else info.size or 0

    async def iter_bytes(self, key: str) -> AsyncIterator[bytes]:
        """The object's bytes, a chunk at a time. ObjectMissing before the first chunk if there
        is no such object; ObjectCorrupt if its chunks do not match its meta."""
        info = await self.info_or_none(key)
        if info is None:
            raise ObjectMissing(key)
        subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=self.bucket, obj=info.nuid)
        digest, size, seq = sha256(), 0, 1
        for _ in range(info.chunks or 0):
            msg = await self._next_chunk(subject, seq, key)
            assert msg.data is not None and msg.seq is not None
            digest.update(msg.data)
            size += len(msg.data)
            seq = msg.seq + 1
            yield msg.data
        expected = _digest_text(digest)
        if size != (info.size or 0) or (info.digest and info.digest.upper() != expected.upper()):
            raise ObjectCorrupt(f"object {key}: chunks do not match its meta")

    async def download(self, key: str, dest: Path) -> int:
        """Copy the object into local file `dest` (created or truncated); returns its size."""
        size = 0
        async with await anyio.open_file(dest, "wb") as f:
            async for data in self.iter_bytes(key):
                await f.write(data)
                size += len(data)
        return size

    @contextlib.asynccontextmanager
    async def local_copy(self, key: str, scratch_dir: Path | None = None) -> AsyncIterator[Path]:
        """A private copy of the object in a local temporary file, deleted on exit: for work
        that reads a file several times or from a child process (validating a batch's input)."""
        fd, name = tempfile.mkstemp(prefix=f"jetbatch-{key}-", dir=scratch_dir)
        os.close(fd)
        path = Path(name)
        try:
            await self.download(key, path)
            yield path
        finally:
            await anyio.Path(path).unlink(missing_ok=True)

    async def keys(self) -> set[str]:
        """Every object's key (not deleted ones)."""
        try:
            infos = await self._store.list(ignore_deletes=True)
        except NotFoundError:
            return set()
        return {i.name for i in infos}

    # Housekeeping ----------------------------------------------------------------------------

    async def sweep_orphans(self, min_age_s: float = ORPHAN_AGE_S) -> int:
        """Purge chunks that no object's meta points at (a put cut short by a crash) once the
        newest of them is `min_age_s` old. Returns how many puts' chunks were purged."""
        info = await self.js.stream_info(
            self.stream, subjects_filter=OBJ_ALL_CHUNKS_PRE_TEMPLATE.format(bucket=self.bucket)
        )
        subjects = info.state.subjects or {}
        if not subjects:
            return 0
        try:
            live = {i.nuid for i in await self._store.list(ignore_deletes=True)}
        except NotFoundError:
            live = set()
        purged = 0
        for subject in subjects:
            if subject.rsplit(".", 1)[-1] in live:
                continue
            last = await self.js.get_last_msg(self.stream, subject)
            if last.time is not None and time.time() - last.time.timestamp() < min_age_s:
                continue  # most likely an upload still in progress
            await self.purge_subject(subject)
            purged += 1
        if purged:
            log.info("files bucket: purged the chunks of %d interrupted upload(s)", purged)
        return purged

    # Internals -------------------------------------------------------------------------------

    def meta_subject(self, key: str) -> str:
        return OBJ_META_PRE_TEMPLATE.format(
            bucket=self.bucket, obj=base64.urlsafe_b64encode(key.encode()).decode()
        )

    async def info_or_none(self, key: str) -> api.ObjectInfo | None:
        try:
            info = await self._store.get_info(key)
        except NotFoundError:  # ObjectNotFoundError and ObjectDeletedError subclass it
            return None
        return None if info.deleted else info

    async def _next_chunk(self, subject: str, seq: int, key: str) -> api.RawStreamMsg:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MISSING_CHUNK_WAIT_S
        direct = True
        while True:
            try:
                return await self.js.get_msg(
                    self.stream, seq=seq, subject=subject, direct=direct, next=True
                )
            except NotFoundError:
                if loop.time() > deadline:
                    raise ObjectCorrupt(f"object {key}: a chunk after #{seq} is missing") from None
                if not direct:
                    await asyncio.sleep(0.2)
                direct = False  # a lagging follower answered: ask the leader

    async def purge_subject(self, subject: str) -> None:
        await self.js.purge_stream(self.stream, subject=subject)


class ObjectWriter:
    """One object being written: chunks published as they fill, the meta message on success."""

    def __init__(self, files: FileObjects, key: str, nuid: str) -> None:
        self._files = files
        self.key = key
        self._nuid = nuid
        self._subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=files.bucket, obj=nuid)
        self._digest = sha256()
        self._pending = bytearray()
        self.size = 0
        self.chunks = 0

    async def __aenter__(self) -> ObjectWriter:
        return self

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self._pending += data
        while len(self._pending) >= CHUNK_BYTES:
            chunk = bytes(self._pending[:CHUNK_BYTES])
            del self._pending[:CHUNK_BYTES]
            await self._publish(chunk)

    async def _publish(self, chunk: bytes) -> None:
        # Asked again through a leader election; the message id makes a retried chunk whose
        # first ack was lost a duplicate that JetStream drops, never a second copy.
        msg_id = f"{self._nuid}.{self.chunks}"
        await through_elections(
            lambda: self._files.js.publish(self._subject, chunk, headers={MSG_ID: msg_id}),
            within_s=ELECTION_WAIT_S,
            max_delay_s=ELECTION_POLL_S,
        )
        self._digest.update(chunk)
        self.size += len(chunk)
        self.chunks += 1

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            await self.commit()
        else:
            await self.abort()

    async def abort(self) -> None:
        """Drop what was written (best effort: the sweep purges what this cannot)."""
        await _quietly(self._files.purge_subject(self._subject))

    async def commit(self) -> None:
        """Publish what is left and the meta message: the object now exists."""
        try:
            await self._commit()
        except BaseException:
            await self.abort()
            raise

    async def _commit(self) -> None:
        if self._pending:
            await self._publish(bytes(self._pending))
            self._pending.clear()
        files = self._files
        previous = await files.info_or_none(self.key)
        info = api.ObjectInfo(
            name=self.key,
            bucket=files.bucket,
            nuid=self._nuid,
            size=self.size,
            chunks=self.chunks,
            mtime=datetime.now(UTC).isoformat(),
            digest=_digest_text(self._digest),
            options=api.ObjectMetaOptions(max_chunk_size=CHUNK_BYTES),
        )
        meta = json.dumps(info.as_dict()).encode()
        await through_elections(
            lambda: files.js.publish(
                files.meta_subject(self.key), meta, headers={api.Header.ROLLUP: MSG_ROLLUP_SUBJECT}
            ),
            within_s=ELECTION_WAIT_S,
            max_delay_s=ELECTION_POLL_S,
        )
        if previous is not None and previous.nuid != self._nuid:
            await files.purge_subject(
                OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=files.bucket, obj=previous.nuid)
            )


def _digest_text(digest: Any) -> str:
    return OBJ_DIGEST_TEMPLATE.format(digest=base64.urlsafe_b64encode(digest.digest()).decode())


async def files_bucket(js: JetStreamContext, replicas: int = 1) -> FileObjects:
    """The files bucket, created with `replicas` or raised to it (never lowered), like a
    stream."""
    return FileObjects(js, await through_elections(lambda: _ensure_bucket(js, replicas)))


async def _ensure_bucket(js: JetStreamContext, replicas: int) -> ObjectStore:
    stream = OBJ_STREAM_TEMPLATE.format(bucket=FILES_BUCKET)
    try:
        store = await js.object_store(FILES_BUCKET)
    except NotFoundError:  # BucketNotFoundError subclasses it
        try:
            return await js.create_object_store(
                FILES_BUCKET,
                api.ObjectStoreConfig(
                    description="jetbatch file bytes",
                    storage=api.StorageType.FILE,
                    replicas=replicas,
                ),
            )
        except APIError as e:
            if e.err_code == 10058:  # created meanwhile by another service
                return await js.object_store(FILES_BUCKET)
            raise replicas_error(e, stream, replicas) from e
    info = await js.stream_info(stream)
    await ensure_stream(js, dataclasses.replace(info.config, num_replicas=replicas))
    return store


async def _read_file(path: Path) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as f:
        while data := await f.read(CHUNK_BYTES * 8):
            yield data


async def _quietly(coro: object) -> None:
    try:
        await coro  # type: ignore[misc]
    except Exception as e:
        log.warning("files bucket: cleaning up after a failed put failed too: %r", e)
