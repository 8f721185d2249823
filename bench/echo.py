"""A bare NATS request/reply, no jetbatch code on its path: the floor under `bench interactive`.

A synchronous request crosses nats-server twice (api -> worker -> api), between Python processes.
This measures exactly that much and nothing more, the same way (one request at a time): a plain
nats-py requester in the benchmark and a plain nats-py responder in a process of its own
(`python -m bench.echo NATS_URL`, which prints "ready" once subscribed). Whatever latency it shows
under load is the machine's (nats-server and the kernel's scheduler sharing two saturated cores),
and no change to jetbatch can take a synchronous request below it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable

import nats

SUBJECT = "bench.echo"
PAYLOAD = b'{"model":"SmolLM2-135M-Instruct","messages":[{"role":"user","content":"ping"}]}'


def start_responder(url: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.echo", url], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"ready":
        proc.kill()
        raise RuntimeError("the echo responder did not start")
    return proc


async def round_trips(
    url: str, *, count: int = 0, until: Callable[[], bool] | None = None
) -> list[float]:
    """Milliseconds per request/reply, one at a time: `count` of them, or until `until()` says
    so (asked between requests, outside the timing)."""
    nc = await nats.connect(url, name="bench-echo-requester")
    out: list[float] = []
    try:
        while (count and len(out) < count) or (until is not None and not until()):
            started = time.perf_counter()
            await nc.request(SUBJECT, PAYLOAD, timeout=10)
            out.append((time.perf_counter() - started) * 1000)
    finally:
        await nc.close()
    return out


async def _respond(url: str) -> None:
    nc = await nats.connect(url, name="bench-echo-responder")

    async def echo(msg):  # type: ignore[no-untyped-def]
        await msg.respond(msg.data)

    await nc.subscribe(SUBJECT, cb=echo)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_respond(sys.argv[1]))
