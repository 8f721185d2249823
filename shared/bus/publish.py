"""Pipelined JetStream publishes with deterministic message ids."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from shared.bus import nats_private
from shared.bus.pull import description_of, status_of

MSG_ID = "Nats-Msg-Id"
# Bulk loops (a burst of publishes, a queue of PubAcks) hand the event loop back this often, so
# a latency-sensitive callback in the same process (a synchronous request) waits for one slice
# (well under a millisecond), not for the whole burst. AckAfterPublish.yield_every may lower it
# while such callbacks are frequent.
YIELD_EVERY = 128


class Publisher:
    """Pipelined JetStream publishes: many in flight, each with a deterministic Nats-Msg-Id, so a
    re-publish after a crash is dropped by the stream's duplicate window. `flush()` waits for every
    PubAck and raises if any publish failed, so callers commit only what the stream holds.

    Plain core publishes, each with its own reply subject under an inbox this publisher
    subscribes to while it has publishes in flight; the PubAcks are counted off that
    subscription's queue in bulk. nats-py's publish_async keeps a future, a random token and a
    callback per message (measured: ~18k msg/s against ~23k/s this way on the 2-core dev box,
    bench/raw.py)."""

    # PubAcks are drained (without waiting) once this many are outstanding, and publishing waits
    # for some when twice as many are: the server's replies must not pile up unread.
    _DRAIN_AT = 4_096

    def __init__(self, js: JetStreamContext, *, ack_timeout_s: float = 30) -> None:
        self._js = js
        self._nc: NATS = nats_private.client_of(js)
        self._ack_timeout_s = ack_timeout_s
        self._sub: Subscription | None = None
        self._inbox = ""
        self._tokens = itertools.count()
        self._outstanding: set[str] = set()
        self._acked = 0
        self._errors: list[BaseException] = []
        self._lock = asyncio.Lock()

    async def publish(
        self, subject: str, payload: bytes, msg_id: str, headers: dict[str, str] | None = None
    ) -> None:
        hdrs = {MSG_ID: msg_id}
        if headers:
            hdrs.update(headers)
        if self._sub is None:
            self._inbox = self._nc.new_inbox()
            self._sub = await self._nc.subscribe(f"{self._inbox}.*", pending_msgs_limit=1_000_000)
        token = str(next(self._tokens))
        await self._nc.publish(subject, payload, reply=f"{self._inbox}.{token}", headers=hdrs)
        self._outstanding.add(token)
        if len(self._outstanding) >= self._DRAIN_AT:
            self._take_acks()
            if len(self._outstanding) >= 2 * self._DRAIN_AT:
                async with self._lock:
                    await self._wait_acks(len(self._outstanding) - self._DRAIN_AT)

    async def flush(self) -> int:
        """Wait for every PubAck; returns how many publishes the stream took since the last
        flush. Raises the first failure (PublishError; TimeoutError when PubAcks are missing)."""
        async with self._lock:
            try:
                await self._wait_acks(0)
            finally:
                sub, self._sub = self._sub, None
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                self._outstanding.clear()
            acked, self._acked = self._acked, 0
            errors, self._errors = self._errors, []
            if errors:
                raise errors[0]
            return acked

    def _take_acks(self) -> None:
        sub = self._sub
        if sub is None:
            return
        queue = nats_private.pending_queue(sub)
        while not queue.empty():
            self._count(queue.get_nowait())

    def _count(self, reply: Msg) -> None:
        assert self._sub is not None
        nats_private.taken(self._sub, reply)
        token = reply.subject.rpartition(".")[2]
        if token not in self._outstanding:
            return
        self._outstanding.discard(token)
        error = puback_error(reply)
        if error is None:
            self._acked += 1
        else:
            self._errors.append(PublishError(error))

    async def _wait_acks(self, until: int) -> None:
        """Until at most `until` publishes await their PubAck."""
        sub = self._sub
        if sub is None:
            return
        queue = nats_private.pending_queue(sub)
        deadline = time.monotonic() + self._ack_timeout_s
        while len(self._outstanding) > until:
            if queue.empty():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(self._outstanding)} PubAcks missing")
                try:
                    reply = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    raise TimeoutError(f"{len(self._outstanding)} PubAcks missing") from None
            else:
                reply = queue.get_nowait()
            self._count(reply)


class PublishError(Exception):
    """The stream did not take a message (its PubAck was an error, or never came)."""


def puback_error(reply: Msg) -> str | None:
    status = status_of(reply)
    if status:  # 503: no stream listens on the subject
        return f"{status} {description_of(reply)}".strip()
    if b'"error"' in reply.data:
        with contextlib.suppress(ValueError):
            return str(json.loads(reply.data).get("error"))
        return reply.data.decode(errors="replace")
    return None
