"""The worker's intake: pulls as much as the engine can hold from each class's consumer (the
dispatched lines and the direct ones, split by shares.py), starts each request, and publishes
its result then acks it, in groups when answers need no waiting. Drains and hands back on
shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from nats.aio.msg import Msg

from schemas.messages import DIRECT, DISPATCHED, RequestMessage, ResultMessage, subject_token
from services.inference.metrics import WorkerMetrics, published_at_ns
from services.inference.shares import Shares
from shared import bus, logs, tracing
from shared.consumer import Delivery, Runner
from shared.ids import new_id, stable_id

if TYPE_CHECKING:
    from services.inference.service import Worker

log = logging.getLogger(__name__)

FETCH_MAX = 512
# Requests whose result is on its way to RESULTS (published, PubAck pending, then acked) do not
# hold an engine slot: the engine is refilled as soon as a request finishes, and up to this many
# finished ones may wait for their PubAck meanwhile. Bounded, so a stalled stream stops the pulls.
RESULTS_WINDOW = 2_048
# Requests handled per turn of the event loop, so a synchronous request waits for one slice of
# batch work, never a whole fetch. Every turn runs one slice of each busy batch task before the
# sockets are polled again, so while synchronous requests keep coming (one within SYNC_RECENT_S)
# slices shrink: measured on bench interactive, p99 under load 103-113 -> 54-63 ms, at the price
# of ~15% of batch throughput (bench orchestration), which is paid only then.
TAKE_SLICE = 64
TAKE_SLICE_SYNC = 16
YIELD_EVERY_SYNC = 32
SYNC_RECENT_S = 1.0
# While the GPU is unhealthy, how often the pull loop looks again.
UNHEALTHY_POLL_S = 1.0
# A result the stream did not take is retried after this.
REPUBLISH_DELAY_S = 5.0

Ready = list[tuple[Delivery[RequestMessage], ResultMessage | None]]


class Intake:
    """Engine slots, slices and results for one worker."""

    def __init__(self, worker: Worker, runners: Mapping[str, Runner[RequestMessage]]) -> None:
        self.worker = worker
        self.runners = runners  # by class: DISPATCHED first, then DIRECT (bound in that order)
        self.capacity = worker.settings.max_in_flight or worker.engine.capacity
        self.max_unacked = self.capacity + RESULTS_WINDOW
        self.in_flight: dict[str, Msg] = {}  # every message not acked yet
        # Requests in the engine (or about to enter it), by class: `running` is their sum.
        self.shares = Shares((DISPATCHED, DIRECT), self.capacity)
        # By class: lines fetched and not yet started (`running`), or slots an admission
        # reserved for the fetch under way.
        self._held: dict[str, int] = dict.fromkeys(self.shares.running, 0)
        self.sync_seen = -SYNC_RECENT_S  # when the last synchronous request came in
        self.results: bus.AckAfterPublish | None = None  # set by pull
        self.completed = 0
        self.metrics = WorkerMetrics(worker.spec.name)
        self._slot_free = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def running(self) -> int:
        """Of the messages in flight, the requests in the engine (or about to enter it)."""
        return sum(self.shares.running.values())

    # -- admission ------------------------------------------------------------------------------
    async def admit(self, cls: str = DISPATCHED) -> int:
        """How many requests of class `cls` may be pulled now; waits a little while the answer
        is none."""
        if not self.worker.gate.healthy or self.worker.control.draining:
            # The GPU is over a threshold (the heartbeat loop reads it), or an operator drains
            # this worker (control.py): take nothing new until that ends. What is in flight
            # finishes.
            await asyncio.sleep(UNHEALTHY_POLL_S)
            return 0
        # This class's last fetch was handed on whole before this admission (Runner.pull).
        self._held[cls] = 0
        running = self.running
        taken = running + sum(self._held.values())
        free = min(self.capacity - taken, self.max_unacked - len(self.in_flight))
        load = self.worker.engine.load
        room = None if load is None else load.room(running)
        if room is not None:
            # vLLM's own queue already holds what refills it (engine_load.py): the rest waits
            # in JetStream, for whichever worker has room first.
            free = min(free, room)
        if len(self.in_flight) < self.max_unacked and room != 0:
            waiting = self.shares.waiting(cls)
            free = self.shares.allowance(cls, free)
            # A look for one line is not reserved: it may wait a second for a line that may
            # never come, and the other class must not lose a slot meanwhile.
            if waiting and free > 0:
                self._held[cls] = min(free, FETCH_MAX)
        if free <= 0:
            self._slot_free.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._slot_free.wait(), 1.0)
            return 0
        return free

    def sync_traffic(self) -> bool:
        """Whether synchronous requests are coming in now (one within SYNC_RECENT_S)."""
        return time.monotonic() - self.sync_seen < SYNC_RECENT_S

    def slice_size(self) -> int:
        sync = self.sync_traffic()
        if self.results is not None:
            self.results.yield_every = YIELD_EVERY_SYNC if sync else bus.YIELD_EVERY
        return TAKE_SLICE_SYNC if sync else TAKE_SLICE

    async def pull(self, js, stop: asyncio.Event) -> None:  # type: ignore[no-untyped-def]
        """One pull loop per class, on the engine's slots as `shares` splits them."""
        self.results = bus.AckAfterPublish(js)
        for runner in self.runners.values():
            # In this order: the dispatched class's durable, older than the direct one, read
            # the whole model before; narrowed first, it no longer overlaps the new one.
            await runner.bind()
        await asyncio.gather(
            *(
                runner.pull(
                    functools.partial(self.take_slice, cls=cls),
                    stop,
                    admit=functools.partial(self.admit, cls),
                    slice_size=self.slice_size,
                    fetched=functools.partial(self._fetched, cls),
                )
                for cls, runner in self.runners.items()
            )
        )

    def _fetched(self, cls: str, msgs: list[Msg]) -> None:
        # Held until each slice starts (take_slice), so the other class's admission counts them.
        self._held[cls] = len(msgs)
        self.shares.fetched(cls, _pending(msgs[-1]) if msgs else 0)

    async def take(self, msgs: list[Msg]) -> None:
        """Start on a pulled chunk (of one class), a slice at a time (what `pull` does with
        each fetch)."""
        if msgs:
            cls = DISPATCHED if RequestMessage.dispatched(msgs[0].subject) else DIRECT
            take = functools.partial(self.take_slice, cls=cls)
            await self.runners[cls].take(take, msgs, self.slice_size())

    # -- one slice ------------------------------------------------------------------------------
    async def take_slice(
        self, deliveries: list[Delivery[RequestMessage]], cls: str = DISPATCHED
    ) -> None:
        """Requests answered without waiting are published and acked as one group (one task);
        the others each get a task that awaits the engine."""
        runner = self.runners[cls]
        self.shares.running[cls] += len(deliveries)
        self._held[cls] = max(0, self._held[cls] - len(deliveries))
        ready: Ready = []
        for d in deliveries:
            req = d.value
            if subject_token(req.project) != RequestMessage.project_in(d.subject):
                # NATS let its publisher publish under the subject's project only: a body
                # naming another is a forgery (its result would land in that project's batch).
                self._release_slot(cls)
                self._spawn(runner.reject(d, "project differs from the subject's"))
                continue
            now = self.worker.answer_now(
                req, stable_id("req_", req.batch_id, req.custom_id), d.number
            )
            # A traced line takes the one-at-a-time path: its result carries its trace headers.
            if now is self.worker.needs_engine or tracing.traced(d.msg.headers):
                self._spawn(self.process(d, cls))
                continue
            self.in_flight[d.msg.reply or new_id("m")] = d.msg
            self._release_slot(cls)
            ready.append((d, now))  # type: ignore[arg-type]
        if ready:
            self._spawn(self._publish_ready(ready, runner))

    async def _publish_ready(self, ready: Ready, runner: Runner[RequestMessage]) -> None:
        assert self.results is not None
        items: list[tuple[str, bytes, str, Msg]] = []
        results: list[ResultMessage] = []
        retry: list[Delivery[RequestMessage]] = []
        for d, result in ready:
            if result is None:
                retry.append(d)
            else:
                items.append((
                    result.published_on, self.worker.encode(result), result.msg_id, d.msg,
                ))  # fmt: skip
                results.append(result)
        try:
            for d in retry:
                await runner.retry(d)
            failed = await self.results.publish_many_then_ack(items)
            self.completed += len(items) - len(failed)
            runner.counts.add("acked", len(items) - len(failed))
            for index, result in enumerate(results):
                if index not in failed:
                    self.metrics.published(result, items[index][3])
            for index, error in failed.items():
                msg = items[index][3]
                log.warning(
                    "result of %s not published (%r); it will be redelivered", msg.subject, error
                )
                await runner.retry(msg, REPUBLISH_DELAY_S)
        finally:
            for d, _ in ready:
                self.in_flight.pop(d.msg.reply or "", None)
            self._slot_free.set()

    async def process(self, d: Delivery[RequestMessage], cls: str) -> None:
        """One request of class `cls` that waits for the engine; `take_slice` counted it in
        `running` already."""
        runner = self.runners[cls]
        token = d.msg.reply or new_id("m")
        self.in_flight[token] = d.msg
        in_engine = True
        logs.bind_message(d.value)
        # A sampled line's spans (none for the others): this pull, and the engine call in it.
        span = tracing.start_message_span(f"{d.subject} process", d.msg.headers, d.value)
        try:
            started = time.monotonic()
            engine_span = tracing.start_child(span, f"engine {d.value.endpoint}")
            try:
                result = await self.worker.handle(d.value, d.number, published_at_ns(d.msg))
            finally:
                tracing.end(engine_span)
                in_engine = False
                self._release_slot(cls)
                self.metrics.request_seconds.observe(time.monotonic() - started)
            if result is None:
                await runner.retry(d)
                return
            # Acked once RESULTS holds the result; results finishing together share one round
            # trip to the server.
            assert self.results is not None
            await self.results.publish_then_ack(
                result.published_on,
                self.worker.encode(result),
                result.msg_id,
                d.msg,
                headers=tracing.headers_of(span),
            )
            self.completed += 1
            runner.counts.add("acked")
            self.metrics.published(result, d.msg)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request on %s not handled; it will be redelivered", d.subject)
            with contextlib.suppress(Exception):
                await runner.retry(d, REPUBLISH_DELAY_S)
        finally:
            tracing.end(span)
            if in_engine:
                self._release_slot(cls)
            self.in_flight.pop(token, None)
            self._slot_free.set()

    def _release_slot(self, cls: str) -> None:
        self.shares.running[cls] -= 1
        self._slot_free.set()

    # -- keeping and giving back ------------------------------------------------------------------
    async def keep_alive(self, stop: asyncio.Event) -> None:
        """Tell JetStream that long requests are still being worked on, so they aren't redelivered."""
        interval = max(1.0, self.worker.settings.request_ack_wait_s / 3)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            for msg in list(self.in_flight.values()):
                with contextlib.suppress(Exception):
                    await msg.in_progress()

    async def drain(self, timeout_s: float) -> None:
        """Let in-flight requests finish; hand back whatever is still running after the timeout.

        What is still running is stopped first (aborted in the engine), then every message not
        acked is handed back, so JetStream redelivers it at once to another worker. A request
        whose result was published but not yet acked is redelivered too: its result has the same
        msg id, and the results writer keeps one row per line, so nothing is duplicated."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            self._slot_free.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._slot_free.wait(), 0.5)
        leftover = list(self.in_flight.values())
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        # Naks, whichever consumer each came from: any runner hands them back.
        handed_back = await self.runners[DISPATCHED].hand_back(leftover)
        if handed_back:
            log.info("handed back %d in-flight requests", handed_back)

    def spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        self._spawn(coro)

    def _spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _pending(msg: Msg) -> int:
    """How many messages waited on the consumer behind `msg` when it was delivered."""
    try:
        return int(msg.metadata.num_pending or 0)
    except Exception:  # not a JetStream delivery (tests)
        return 0
