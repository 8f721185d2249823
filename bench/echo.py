"""A bare NATS request/reply, no jetbatch code on its path: the floor under `bench interactive`.

A synchronous request crosses nats-server twice (api -> worker -> api), between Python processes.
This measures exactly that much and nothing more, the same way (one request at a time): a plain
nats-py requester in the benchmark and a plain nats-py responder in a process of its own
(`python -m bench.echo NATS_URL`, which prints "ready" once subscribed). Whatever latency it shows
under load is the machine's (nats-server and the kernel's scheduler sharing two saturated cores),
and no change to jetbatch can take a synchronous request below it.

`python -m bench.echo --relay NATS_URL PORT` starts a second reference: the same responder behind a
bare HTTP relay (uvicorn with httptools and uvloop, as the api runs, and a plain ASGI callable:
no framework, no key, no checks), which forwards each POST's body with `nc.request` and returns
the reply. A request through it takes every hop a synchronous request takes (client -> HTTP
server -> nats-server -> responder -> nats-server -> HTTP server -> client) and runs no jetbatch
code: the gap between it and the bare NATS floor is the HTTP hop's, and the gap between jetbatch
and it is jetbatch's own."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable

import nats
import uvicorn
import uvloop

from shared.embedded import free_port

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


def start_relay(url: str) -> tuple[subprocess.Popen[bytes], str]:
    """The HTTP relay in a process of its own, and its base URL (a responder must be running)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.echo", "--relay", url, str(port)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"ready":
        proc.kill()
        raise RuntimeError("the HTTP relay did not start")
    return proc, f"http://127.0.0.1:{port}"


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


async def _relay(url: str, port: int) -> None:
    nc = await nats.connect(url, name="bench-echo-relay")

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        reply = await nc.request(SUBJECT, body, timeout=10)
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": reply.data})

    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http="httptools", lifespan="off", access_log=False,
        log_level="warning",
    )  # fmt: skip
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            serving.result()
            return
        await asyncio.sleep(0.01)
    print("ready", flush=True)
    await serving


if __name__ == "__main__":
    if sys.argv[1] == "--relay":
        uvloop.run(_relay(sys.argv[2], int(sys.argv[3])))
    else:
        asyncio.run(_respond(sys.argv[1]))
