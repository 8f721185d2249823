"""webhook_notifier: tells clients that a batch ended.

Consumes: stream EVENTS, durable `webhook_notifier`, subjects `jetbatch.events.>`,
  message BatchEvent (JSON), ack_wait 60 s, max_deliver 10.
Emits: nothing on the bus; HTTP deliveries to registered endpoints (Standard Webhooks).

This first version records each event in the log and acks it; signed delivery with retries and a
delivery log is the webhooks issue. The consumer is durable already, so events published before
delivery exists are not lost to a later version that reads from the same durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import msgspec

from schemas.messages import BatchEvent
from shared import bus, config, telemetry

log = logging.getLogger(__name__)

_decoder = msgspec.json.Decoder(BatchEvent)


async def handle(event: BatchEvent) -> None:
    log.info("event %s %s batch_id=%s", event.id, event.type, event.batch_id)


async def run(settings: config.Settings, stop: asyncio.Event) -> None:
    if not settings.nats_url:
        raise config.ConfigError("JETBATCH_NATS_URL is not set")
    nc = await bus.connect(settings.nats_url, name="webhook_notifier")
    sub = None
    try:
        js = nc.jetstream()
        await bus.ensure_streams(js)
        sub = await bus.durable_pull(
            js, bus.EVENTS, "webhook_notifier", "jetbatch.events.>",
            ack_wait_s=60, max_deliver=10, max_ack_pending=1000,
        )
        while not stop.is_set():
            for msg in await bus.fetch(sub, 100, timeout_s=1.0):
                try:
                    event = _decoder.decode(msg.data)
                except msgspec.DecodeError as e:
                    log.error("undecodable event on %s: %s", msg.subject, e)
                    await msg.term()
                    continue
                await handle(event)
                await msg.ack()
    finally:
        # An open pull subscription makes drain() wait out its whole timeout.
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await nc.drain()


def main() -> None:
    settings = config.load()
    telemetry.setup("webhook_notifier", settings.log_level)
    asyncio.run(_main(settings))


async def _main(settings: config.Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run(settings, stop)
