"""A service process, once for every service: settings (checked before anything connects),
logging, SIGTERM/SIGINT, serve until told to stop, then drain and exit 0.

SIGTERM means: stop taking work, finish or hand back what is in hand (each service's `serve`
does that once `stop` is set), drain the NATS connection, exit. A second SIGINT is the caller's
to handle (the api forces its shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator

from shared import config
from shared.config import ConfigError, Settings
from shared.lane import lower_process_priority

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)

Serve = Callable[[Settings, asyncio.Event], Awaitable[None]]


def load_settings(service: str, requires: tuple[str, ...]) -> Settings:
    """Settings from the environment, or exit 2 with every bad or missing one named."""
    try:
        settings = config.load()
        config.require(settings, service, *requires)
    except ConfigError as e:
        message = str(e)
        print(message if message.startswith(service) else f"{service}: {message}", file=sys.stderr)
        sys.exit(2)
    return settings


def main(
    service: str,
    serve: Serve,
    *,
    requires: tuple[str, ...] = ("nats_url", "database_url"),
    batch_only: bool = False,
) -> None:
    """The process entry point of a service: `serve(settings, stop)` until SIGTERM/SIGINT.
    `batch_only` processes run niced (JETBATCH_BATCH_NICE), yielding the CPU to synchronous
    requests."""
    from shared import telemetry  # not for the light child processes that use on_signals

    settings = load_settings(service, requires)
    telemetry.setup(service, settings.log_level, settings.observability)
    if batch_only:
        lower_process_priority(settings.batch_nice)
    try:
        asyncio.run(_serve(serve, settings))
    except ConfigError as e:  # found once connected (more NATS replicas than servers, say)
        log.error("%s", e)
        sys.exit(2)


async def _serve(serve: Serve, settings: Settings) -> None:
    stop = asyncio.Event()
    with on_signals(lambda _sig: stop.set()):
        await serve(settings, stop)


@contextlib.contextmanager
def on_signals(callback: Callable[[signal.Signals], None]) -> Iterator[None]:
    """Call `callback(signal)` on SIGTERM/SIGINT while the block runs in this event loop."""
    loop = asyncio.get_running_loop()
    for sig in SIGNALS:
        loop.add_signal_handler(sig, callback, sig)
    try:
        yield
    finally:
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)


def on_signals_blocking(callback: Callable[[int], None]) -> None:
    """Call `callback(signal)` on SIGTERM/SIGINT in a program without an event loop (the
    `jetbatch up` supervisor polls its children)."""
    for sig in SIGNALS:
        signal.signal(sig, lambda signum, _frame: callback(signum))


def sigterm_as_interrupt() -> None:
    """SIGTERM (a timeout, a wrapper's Ctrl-C) unwinds like Ctrl-C (KeyboardInterrupt), so a
    command-line tool still stops what it started (the benchmarks, the soak)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
