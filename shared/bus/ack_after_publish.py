"""Group commit of "publish a message, then ack the message it came from"."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Sequence

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from shared.bus import nats_private
from shared.bus.publish import MSG_ID, YIELD_EVERY, PublishError, puback_error


class _Waiter:
    """What callers await: one future for a group of publishes, settled when each has been acked
    at its source or has failed."""

    __slots__ = ("future", "left", "errors")

    def __init__(self, n: int) -> None:
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.left = n
        self.errors: dict[int, BaseException] = {}

    def settle(self, index: int, error: BaseException | None = None) -> None:
        if error is not None:
            self.errors[index] = error
        self.left -= 1
        if self.left == 0 and not self.future.done():  # a cancelled caller's future is done
            self.future.set_result(None)


class _Entry:
    __slots__ = ("subject", "payload", "headers", "source", "waiter", "index", "settled")

    def __init__(
        self,
        subject: str,
        payload: bytes,
        headers: dict[str, str],
        source: Msg,
        waiter: _Waiter,
        index: int,
    ) -> None:
        self.subject = subject
        self.payload = payload
        self.headers = headers
        self.source = source
        self.waiter = waiter
        self.index = index
        self.settled = False

    def settle(self, error: BaseException | None = None) -> None:
        if not self.settled:
            self.settled = True
            self.waiter.settle(self.index, error)


class AckAfterPublish:
    """Group commit of "publish a message, then ack the message it came from" (a result for its
    request): callers hand in pairs and await; one flusher publishes everything handed in
    meanwhile in one pipelined burst, and acks each source as soon as its PubAck says the stream
    holds the new message. Under load many messages share one round trip (and the burst grows
    while the previous one is out: self-clocking); alone, one costs what a publish-await-ack
    costs. `publish_many_then_ack` hands in a whole group for one await.

    Publishes are plain core publishes with a reply subject per message under one inbox whose
    queue the flusher drains itself: no future, timer or callback per message (nats-py's
    publish_async has all three). A publish that failed (refused, or no PubAck in time) leaves
    its source unacked, for the caller to nak."""

    def __init__(
        self, nc: NATS | JetStreamContext, *, ack_timeout_s: float = 30, max_burst: int = 4_000
    ) -> None:
        self._nc: NATS = nats_private.client_of(nc)
        self._ack_timeout_s = ack_timeout_s
        self._max_burst = max_burst
        self._inbox = self._nc.new_inbox()
        self._tokens = itertools.count()
        self._sub: Subscription | None = None
        self._queue: list[_Entry] = []
        self._flusher: asyncio.Task[None] | None = None
        self.yield_every = YIELD_EVERY

    async def publish_then_ack(
        self,
        subject: str,
        payload: bytes,
        msg_id: str,
        source: Msg,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Returns once the message is in its stream and `source` is acked; raises if not."""
        hdrs = {MSG_ID: msg_id}
        if headers:
            hdrs.update(headers)
        waiter = _Waiter(1)
        self._queue.append(_Entry(subject, payload, hdrs, source, waiter, 0))
        await self._wait(waiter)
        if waiter.errors:
            raise waiter.errors[0]

    async def publish_many_then_ack(
        self, items: Sequence[tuple[str, bytes, str, Msg]]
    ) -> dict[int, BaseException]:
        """(subject, payload, msg_id, source) each; returns once every one is settled, with the
        failures by index (their sources are left unacked)."""
        if not items:
            return {}
        waiter = _Waiter(len(items))
        self._queue.extend(
            _Entry(subject, payload, {MSG_ID: msg_id}, source, waiter, i)
            for i, (subject, payload, msg_id, source) in enumerate(items)
        )
        await self._wait(waiter)
        return waiter.errors

    async def _wait(self, waiter: _Waiter) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_all())
        await waiter.future

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _flush_all(self) -> None:
        if self._sub is None:
            try:
                self._sub = await self._nc.subscribe(
                    f"{self._inbox}.*", pending_msgs_limit=1_000_000
                )
            except Exception as e:  # closed or draining: nobody waits forever
                burst, self._queue = self._queue, []
                for entry in burst:
                    entry.settle(e)
                return
        while self._queue:
            burst = self._queue[: self._max_burst]
            del self._queue[: self._max_burst]
            try:
                await self._flush(burst)
            except BaseException as e:
                for entry in burst:
                    entry.settle(e if isinstance(e, Exception) else PublishError(repr(e)))
                if not isinstance(e, Exception):
                    raise

    async def _flush(self, burst: list[_Entry]) -> None:
        sub = self._sub
        assert sub is not None
        waiting: dict[str, _Entry] = {}
        for n, entry in enumerate(burst, 1):
            if n % self.yield_every == 0:
                await asyncio.sleep(0)
            token = str(next(self._tokens))
            try:
                await self._nc.publish(
                    entry.subject,
                    entry.payload,
                    reply=f"{self._inbox}.{token}",
                    headers=entry.headers,
                )
            except Exception as e:
                entry.settle(e)
                continue
            waiting[token] = entry
        queue = nats_private.pending_queue(sub)
        deadline = time.monotonic() + self._ack_timeout_s
        taken = 0
        while waiting:
            if queue.empty():
                remaining = deadline - time.monotonic()
                try:
                    if remaining <= 0:
                        raise TimeoutError
                    reply = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    for entry in waiting.values():
                        entry.settle(PublishError("no PubAck in time"))
                    return
            else:
                reply = queue.get_nowait()
                taken += 1
                if taken % self.yield_every == 0:
                    await asyncio.sleep(0)
            nats_private.taken(sub, reply)
            token = reply.subject.rpartition(".")[2]
            if token not in waiting:
                continue  # the PubAck of a burst that gave up waiting
            entry = waiting.pop(token)
            error = puback_error(reply)
            if error is not None:
                entry.settle(PublishError(error))
                continue
            try:
                # Acked even if the caller gave up waiting: the new message is in the stream.
                await entry.source.ack()
            except Exception as e:
                entry.settle(e)
                continue
            entry.settle()
