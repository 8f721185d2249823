"""A real OTLP/HTTP trace receiver for tests and benchmarks: an aiohttp server on its own thread
that decodes `POST /v1/traces` (protobuf ExportTraceServiceRequest, gzip or not) into `Span`s.

`python -m tests.otlp_receiver --port N` runs one until Ctrl-C/SIGTERM and prints how many spans
it took (bench: `OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:N`)."""

from __future__ import annotations

import argparse
import asyncio
import gzip
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str  # hex
    span_id: str
    parent_id: str  # "" for a root
    kind: int
    attributes: dict[str, object]
    links: tuple[tuple[str, str], ...] = field(default=())  # (trace id, span id)


def _value(v: AnyValue) -> object:
    kind = v.WhichOneof("value")
    return (
        getattr(v, kind)
        if kind in ("string_value", "int_value", "bool_value", "double_value")
        else None
    )


def decode(body: bytes) -> list[Span]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for rs in request.resource_spans:
        service = next(
            (str(_value(a.value)) for a in rs.resource.attributes if a.key == "service.name"), ""
        )
        for ss in rs.scope_spans:
            for s in ss.spans:
                spans.append(
                    Span(
                        service=service,
                        name=s.name,
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex(),
                        kind=s.kind,
                        attributes={a.key: _value(a.value) for a in s.attributes},
                        links=tuple((lk.trace_id.hex(), lk.span_id.hex()) for lk in s.links),
                    )
                )
    return spans


class Receiver:
    """Started by `start()` (returns once it listens), stopped by `stop()`."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.spans: list[Span] = []
        self.requests = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        spans = decode(body)
        with self._lock:
            self.spans.extend(spans)
            self.requests += 1
        reply = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    def start(self) -> Receiver:
        ready = threading.Event()

        async def serve() -> None:
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_post("/v1/traces", self._traces)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            await site.start()
            self.port = self._runner.addresses[0][1]
            ready.set()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="otlp-receiver", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the OTLP receiver did not start")
        return self

    def stop(self) -> None:
        loop, runner = self._loop, self._runner
        if loop is None or runner is None:
            return
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def taken(self) -> list[Span]:
        with self._lock:
            return list(self.spans)

    def wait_for(self, found: Callable[[list[Span]], bool], timeout_s: float = 30) -> list[Span]:
        """The spans once `found(spans)` says they are all there; raises after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.taken()
            if found(spans):
                return spans
            if time.monotonic() > deadline:
                names = sorted({(s.service, s.name) for s in spans})
                raise TimeoutError(f"spans not all received in {timeout_s}s; got {names}")
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.otlp_receiver")
    parser.add_argument("--port", type=int, default=4318)
    port = parser.parse_args().port
    receiver = Receiver(port).start()
    print(f"OTLP/HTTP receiver on {receiver.endpoint}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    receiver.stop()
    print(f"received {len(receiver.spans)} spans in {receiver.requests} requests", flush=True)


if __name__ == "__main__":
    main()
