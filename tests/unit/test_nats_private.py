"""nats-py's private attributes that shared/bus/nats_private.py relies on. When a nats-py release
changes them, this fails (and pyproject.toml pins nats-py to the version it passed on)."""

from __future__ import annotations

import asyncio

import nats
from nats.aio.client import Client as NATS

from shared.bus import nats_private
from shared.embedded import EmbeddedNats


async def test_the_pinned_nats_py_is_the_one_these_checks_passed_on() -> None:
    from importlib.metadata import version

    assert version("nats-py") == "2.16.0"


async def test_client_and_api_prefix_of_a_jetstream_context(nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        assert nats_private.client_of(js) is nc
        assert nats_private.client_of(nc) is nc
        assert nats_private.api_prefix(js) == "$JS.API"
        assert nats_private.api_prefix(nc.jetstream(domain="hub")) == "$JS.hub.API"
    finally:
        await nc.close()


async def test_a_subscriptions_queue_can_be_drained_by_hand(nats_server: EmbeddedNats) -> None:
    nc: NATS = await nats.connect(nats_server.url)
    try:
        sub = await nc.subscribe("private.check")
        for i in range(3):
            await nc.publish("private.check", b"x" * (i + 1))
        await nc.flush()
        queue = nats_private.pending_queue(sub)
        assert isinstance(queue, asyncio.Queue)
        for _ in range(50):
            if queue.qsize() == 3:
                break
            await asyncio.sleep(0.01)
        assert sub.pending_msgs == 3 and sub.pending_bytes == 6
        got = []
        while not queue.empty():
            msg = queue.get_nowait()
            nats_private.taken(sub, msg)
            got.append(msg.data)
        assert got == [b"x", b"xx", b"xxx"]
        # The byte count nats-py checks for slow consumers went back to zero with our bookkeeping.
        assert sub.pending_bytes == 0
    finally:
        await nc.close()
