"""Every use of nats-py's private attributes, in one place.

jetbatch's fast bus paths (FastPull, Publisher, AckAfterPublish) read a subscription's message
queue in bulk instead of a callback or a future per message (several times faster; measured in
bench/raw.py). nats-py has no public API for that, so they reach into its internals here and
nowhere else. tests/unit/test_nats_private.py fails when a nats-py release changes any of them;
pyproject.toml pins nats-py to the version that test passed on.
"""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

__all__ = ["api_prefix", "client_of", "pending_queue", "taken"]


def client_of(js: NATS | JetStreamContext) -> NATS:
    """The connection a JetStream context publishes on."""
    return js._nc if isinstance(js, JetStreamContext) else js


def api_prefix(js: JetStreamContext) -> str:
    """The JetStream API prefix (`$JS.API`, or a domain's)."""
    prefix: str = js._prefix
    return prefix


def pending_queue(sub: Subscription) -> asyncio.Queue[Msg]:
    """The queue a callback-less subscription's messages wait in. A message taken off it
    directly must be passed to `taken`, or the subscription's byte count only grows until
    nats-py reports a slow consumer."""
    queue: asyncio.Queue[Msg] = sub._pending_queue
    return queue


def taken(sub: Subscription, msg: Msg) -> None:
    """Account for a message taken off `pending_queue(sub)`."""
    sub._pending_size -= len(msg.data)
