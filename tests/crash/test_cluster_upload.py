"""An upload on a real 3-node NATS cluster (3 replicas) while the node that leads the files
bucket's stream is SIGKILLed: one node down keeps a quorum, so the upload either goes on through
the leader election and stores the exact bytes, or fails with a 503 in OpenAI's shape, leaves
nothing behind and succeeds when sent again. A batch then runs from the file with every
custom_id exactly once, and the killed node rejoins and catches up."""

from __future__ import annotations

import asyncio
import hashlib
import io
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from shared import bus
from shared.bus.objects import FILES_BUCKET
from shared.embedded import EmbeddedNatsCluster
from tests.crash.test_cluster_crash import stream_state
from tests.crash.test_crash import FAST_RECOVERY, check_batch
from tests.harness import API_KEY, Harness
from tests.helpers import CHAT, chat_line, wait_until_sync

pytestmark = [pytest.mark.slow, pytest.mark.crash, pytest.mark.cluster]

FILES_STREAM = f"OBJ_{FILES_BUCKET}"
LINES = 5_000
LINE_TEXT_BYTES = 6_000  # ~25 MB in all: under max_batch_lines, and a long upload
# The client sends this fast, so the upload lasts ~3 s and the kill (a third of the way in)
# leaves it seconds to go on through the election.
SEND_BYTES_PER_S = 8 * 1024 * 1024


class Throttled(io.RawIOBase):
    """`data` read at most `rate` bytes a second; `sent` is how far the reader got."""

    def __init__(self, data: bytes, rate: float) -> None:
        self._data, self._rate, self._pos = data, rate, 0
        self._started: float | None = None
        self.sent_bytes = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._data)}[whence]
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        if self._started is None:
            self._started = time.monotonic()
        ahead = self.sent_bytes / self._rate - (time.monotonic() - self._started)
        if ahead > 0:
            time.sleep(ahead)
        chunk = self._data[self._pos : self._pos + len(buffer)]
        buffer[: len(chunk)] = chunk
        self._pos += len(chunk)
        self.sent_bytes += len(chunk)
        return len(chunk)


def big_file() -> bytes:
    filler = " ".join(f"w{j}" for j in range(LINE_TEXT_BYTES // 6))[:LINE_TEXT_BYTES]
    return b"".join(chat_line(f"up-{i}", f"{i} {filler}", max_tokens=4) for i in range(LINES))


async def _objects_and_orphans(url: str) -> tuple[set[str], int]:
    """The files bucket's objects, and how many puts left chunks that no object points at
    (purged by the sweep, as the watchdog's would once they are old enough)."""
    nc = await bus.connect(url, "crash-test")
    try:
        files = await bus.files_bucket(nc.jetstream())
        return await files.keys(), await files.sweep_orphans(min_age_s=0)
    finally:
        await nc.close()


def upload(c: openai.OpenAI, body: Any) -> Any:
    return c.files.create(file=("big.jsonl", body), purpose="batch")


def outcome_of(
    c: openai.OpenAI, h: Harness, pending: Future[Any], url: str, data: bytes
) -> tuple[Any, str]:
    """The upload that was under way at the kill: its file and what happened to it. One that
    failed must have failed with a 503 and left no file, and is sent again (the node still
    down) at full speed."""
    try:
        return pending.result(timeout=120), "succeeded through the election"
    except openai.APIStatusError as e:
        error: Exception = e
    except (openai.APIConnectionError, httpx.HTTPError) as e:
        error = e
    assert isinstance(error, openai.APIStatusError) and error.status_code == 503, (
        repr(error),
        h.log_tail("api", 60),
    )
    assert isinstance(error.body, dict) and error.body.get("type") == "service_unavailable"
    assert c.files.list().data == []
    keys, orphans = asyncio.run(_objects_and_orphans(url))
    assert keys == set()
    # Chunks it could not purge (the purge itself met the election) are the sweep's: gone now.
    assert asyncio.run(_objects_and_orphans(url)) == (set(), 0)
    return upload(c, data), f"503 ({error.body.get('code')}), {orphans} orphan put(s)"


def test_an_upload_survives_a_sigkill_of_the_node_leading_the_files_bucket(
    database_url: str, tmp_path: Path
) -> None:
    cluster = EmbeddedNatsCluster(tmp_path / "cluster").start()
    h = Harness(
        tmp_path / "harness",
        dict(
            FAST_RECOVERY,
            JETBATCH_NATS_REPLICAS="3",
            JETBATCH_INSTANT_DELAY_S="0",
            JETBATCH_MAX_IN_FLIGHT="0",
        ),
        nats=cluster,
        database_url=database_url,
    )
    data = big_file()
    # Retries are the test's to make (a sent body cannot be sent again from where it stopped).
    c = openai.OpenAI(base_url=h.base_url, api_key=API_KEY, max_retries=0, timeout=120)
    try:
        asyncio.run(bus.wait_for_jetstream(cluster.url))
        h.start_servers()
        for name in ("api", "results_writer", "watchdog", "worker-1"):
            h.start(name)
        h.wait_api()
        leader, _ = stream_state(cluster.url, FILES_STREAM)
        body = Throttled(data, SEND_BYTES_PER_S)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(upload, c, body)
            while body.sent_bytes < len(data) // 3 and not pending.done():
                time.sleep(0.01)
            assert not pending.done(), pending.result()
            cluster.node(leader).kill()
            killed_at = body.sent_bytes
            f, outcome = outcome_of(c, h, pending, cluster.url, data)
        print(f"UPLOAD {outcome}; {leader} killed at {killed_at} of {len(data)} bytes")
        assert f.bytes == len(data)
        stored = c.files.content(f.id).read()
        assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(data).hexdigest()
        # The batch runs on the two nodes left.
        batch = c.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
        done = check_batch(h, c, batch.id, LINES, "up", {"completed"})
        assert done.request_counts.completed == LINES
        # The killed node rejoins and catches up: the files bucket and every stream.
        cluster.node(leader).start()
        for stream in [FILES_STREAM, *(s.name for s in bus.STREAMS)]:
            wait_until_sync(
                lambda: stream_state(cluster.url, stream)[1],  # noqa: B023
                f"{leader} to rejoin {stream} and catch up",
                timeout_s=60, interval_s=0.5, retry_on=(Exception,),
            )  # fmt: skip
    finally:
        h.stop_all()
        cluster.stop()
