"""The streams (declared once, created idempotently), the KV buckets, the connection and durable
consumers. Subjects come from the message types in schemas.messages."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import (
    APIError,
    BadRequestError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)

from schemas.messages import (
    DeadLetterMessage,
    MaxDeliveriesAdvisory,
    RequestMessage,
    ResultMessage,
    subject_matches,
)
from shared.backoff import BACKOFF
from shared.config import ConfigError
from shared.nats_auth import inbox_prefix, redacted, url_user

log = logging.getLogger(__name__)

T = TypeVar("T")

DAY_S = 86_400


@dataclass(frozen=True)
class Stream:
    name: str
    subjects: tuple[str, ...]
    retention: RetentionPolicy
    max_age_s: float = 0  # 0 = forever
    duplicate_window_s: float = 120
    max_msgs: int | None = None  # None = no limit

    def config(self, replicas: int = 1) -> StreamConfig:
        return StreamConfig(
            max_msgs=self.max_msgs,
            name=self.name,
            subjects=list(self.subjects),
            retention=self.retention,
            storage=StorageType.FILE,
            max_age=self.max_age_s,
            duplicate_window=self.duplicate_window_s,
            num_replicas=replicas,
        )


# Work queue: a request is removed once an inference worker acks it (after publishing its result).
REQUESTS = Stream("REQUESTS", (RequestMessage.filter_subject(),), RetentionPolicy.WORK_QUEUE)
# Limits: the results writer reads everything; other services may read their own batch's subject.
RESULTS = Stream(
    "RESULTS", (ResultMessage.filter_subject(),), RetentionPolicy.LIMITS, max_age_s=7 * DAY_S
)
# Families: every event type's and every command's subject is under them.
EVENTS = Stream("EVENTS", ("jetbatch.events.>",), RetentionPolicy.LIMITS, max_age_s=30 * DAY_S)
# Work queue: the watchdog's orders to the api (re-drive, close out); stale orders are useless.
CONTROL = Stream("CONTROL", ("jetbatch.control.>",), RetentionPolicy.WORK_QUEUE, max_age_s=3_600)
# Work queue read by the watchdog, which records each message in table `dead_letters`: rejected
# messages of services without a database, and JetStream's own advisories of requests that
# reached max deliveries (captured here so none is missed while the watchdog is down).
DEADLETTERS = Stream(
    "DEADLETTERS",
    (
        DeadLetterMessage.filter_subject(),
        MaxDeliveriesAdvisory.filter_subject(stream="REQUESTS"),
    ),
    RetentionPolicy.WORK_QUEUE,
    max_age_s=30 * DAY_S,
)
STREAMS = (REQUESTS, RESULTS, EVENTS, CONTROL, DEADLETTERS)
# Limits, capped: every service's warning-and-worse log records (shared/logship.py), read by
# the api's GET /v1/logs. Each service creates it when it starts shipping (not in STREAMS).
LOGS = Stream(
    "LOGS", ("jetbatch.logs.>",), RetentionPolicy.LIMITS, max_age_s=7 * DAY_S, max_msgs=10_000
)

WORKERS_BUCKET = "jetbatch_workers"
WORKERS_TTL_S = 300
# Batches whose remaining requests must not run (cancelled or expired): key = batch id, value =
# schemas.messages.BatchStop. Kept longer than any request of such a batch waits in REQUESTS.
CANCELLED_BUCKET = "jetbatch_cancelled"
CANCELLED_TTL_S = 7 * DAY_S
# Operators' commands to workers (drain, resume, restart): key = the worker's control id, value
# = schemas.messages.WorkerCommand. The api writes it; workers only read and watch it.
WORKER_CONTROL_BUCKET = "jetbatch_worker_control"
WORKER_CONTROL_TTL_S = 0  # kept until replaced: a drain outlives any restart
# A process starting while its NATS servers do (`jetbatch up`, compose) finds them within this.
CONNECT_WAIT_S = 10.0


async def connect(url: str, name: str) -> NATS:
    """A connection to `url`, one server or a comma-separated list of a cluster's. Once
    connected the client reconnects across them without end; when none answers at first,
    NatsUnreachable (a ConfigError: the process stops naming the setting). The URL carries the
    role's credentials (`nats://user:password@host:4222`, shared.nats_auth); a connection as
    `user` takes its replies under `_INBOX_<user>`, the only inbox its role may read."""
    servers = server_list(url)
    errors: list[Exception] = []
    try:
        # nats-py tries the list without end when no server answers at the first connect.
        return await asyncio.wait_for(_connect(servers, name, errors), CONNECT_WAIT_S)
    except TimeoutError:
        shown = [redacted(s) for s in servers]
        why = "no NATS server answered"
        if any("authorization violation" in str(e).lower() for e in errors):
            why = "the NATS servers refused its credentials (user and password in the URL)"
        raise NatsUnreachable(
            f"JETBATCH_NATS_URL={','.join(shown)}: {why} within {CONNECT_WAIT_S:.0f} s"
            f" (tried {', '.join(shown)})"
        ) from None


async def _connect(servers: list[str], name: str, errors: list[Exception]) -> NATS:
    async def on_error(e: Exception) -> None:
        errors[:] = [e]
        log.warning("nats: %s", e)

    async def on_disconnect() -> None:
        log.warning("nats: disconnected")

    async def on_reconnect() -> None:
        log.info("nats: reconnected")

    user = url_user(servers[0])
    # Given as options too, not only in the URLs: servers a cluster tells the client about
    # (discovered, without credentials) are then tried with them as well.
    first = urlsplit(servers[0] if "://" in servers[0] else f"nats://{servers[0]}")
    credentials = (
        {"user": unquote(first.username), "password": unquote(first.password)}
        if first.username and first.password
        else {}
    )
    return await nats.connect(
        servers=servers,
        name=name,
        inbox_prefix=inbox_prefix(user) if user else "_INBOX",
        **credentials,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        pending_size=64 * 1024 * 1024,
    )


def server_list(url: str) -> list[str]:
    """`nats://a:4222,nats://b:4222` -> both; JETBATCH_NATS_URL takes one or several."""
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise ValueError(f"no NATS server in {url!r}")
    return servers


async def wait_for_jetstream(url: str) -> None:
    """Until JetStream answers at `url` (a new cluster elects its leader first)."""
    nc = await connect(url, "jetbatch-wait")
    try:
        await through_elections(nc.jetstream().account_info)
    finally:
        await nc.close()


class NatsUnreachable(ConfigError):
    """No server of JETBATCH_NATS_URL answered at start."""


class ReplicasUnavailable(ConfigError):
    """More replicas were asked for than the NATS deployment has servers."""


async def ensure_streams(
    js: JetStreamContext, streams: Iterable[Stream] = STREAMS, *, replicas: int = 1
) -> None:
    """Create what is missing, with `replicas`; bring what exists up to it. An existing stream
    keeps every limit an operator changed and is never given fewer replicas: only subjects
    jetbatch declares and lacks are added, and its replica count raised if under `replicas`.
    What differs from jetbatch's declaration is logged."""
    for stream in streams:
        wanted = stream.config(replicas)
        await through_elections(functools.partial(ensure_stream, js, wanted))


# JetStream answers these while a cluster elects a leader (a node was lost, or the cluster is
# new and several services create streams at once): asked again, it succeeds.
TRANSIENT_ERRORS = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    # What `js.publish` raises for no responders: a stream without a leader yet.
    NoStreamResponseError,
    ServiceUnavailableError,
)
TRANSIENT_RETRY_S = 60.0


# JetStream's codes for "no room": the servers' store is full (10047 storage, 10028 memory,
# 10023 insufficient resources) or an operator's byte limit on a stream with discard-new is
# reached (10077 "maximum bytes exceeded", sent with status 503 like an election).
STORE_FULL_CODES = frozenset({10023, 10028, 10047, 10077})


def store_full(e: BaseException) -> bool:
    return isinstance(e, APIError) and (
        e.err_code in STORE_FULL_CODES or "maximum bytes" in str(e.description or "")
    )


async def through_elections(
    call: Callable[[], Awaitable[T]],
    *,
    within_s: float | None = None,
    max_delay_s: float | None = None,
) -> T:
    """`call()`, asked again with the one backoff while JetStream is between leaders, for at
    most `within_s` (default TRANSIENT_RETRY_S), waiting at most `max_delay_s` between tries
    (a request waiting on the call: it goes on as soon as the new leader is there)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (TRANSIENT_RETRY_S if within_s is None else within_s)
    failures = 0
    while True:
        try:
            return await call()
        except TRANSIENT_ERRORS as e:
            if store_full(e):
                raise  # no election ends this; space has to be freed
            failures += 1
            # The last wait is cut to the deadline, not skipped: with 1, 2, 4, 8 s a 15 s
            # window would otherwise end at 7 s, before a typical election does (4-8 s).
            left = deadline - loop.time()
            if left <= 0:
                raise
            delay = min(BACKOFF.delay_s(failures), left, max_delay_s or left)
            log.warning("JetStream not answering (%r); asking again in %.0f s", e, delay)
            await asyncio.sleep(delay)


async def ensure_stream(js: JetStreamContext, wanted: StreamConfig, *, retry: bool = True) -> None:
    assert wanted.name is not None
    name, replicas = wanted.name, wanted.num_replicas or 1
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        try:
            await js.add_stream(wanted)
        except APIError as e:
            if e.err_code == _STREAM_NAME_IN_USE and retry:  # another service created it first
                await ensure_stream(js, wanted, retry=False)
                return
            raise replicas_error(e, name, replicas) from e
        if replicas > 1:
            log.info("stream %s created with %d replicas", name, replicas)
        return
    current = info.config
    changes: dict[str, Any] = {}
    subjects = merged_subjects(list(current.subjects or []), list(wanted.subjects or []))
    if subjects != list(current.subjects or []):
        changes["subjects"] = subjects
    have = current.num_replicas or 1
    if have < replicas:
        changes["num_replicas"] = replicas
    elif have > replicas:
        log.info("stream %s has %d replicas, more than asked (%d): kept", name, have, replicas)
    for field, mine in (("max_age", wanted.max_age), ("duplicate_window", wanted.duplicate_window)):
        theirs = getattr(current, field)
        if theirs != mine:
            log.info("stream %s: %s is %s (jetbatch declares %s): kept", name, field, theirs, mine)
    if changes:
        log.warning(
            "stream %s: updating %s", name, ", ".join(f"{k}={v}" for k, v in changes.items())
        )
        try:
            await js.update_stream(dataclasses.replace(current, **changes))
        except APIError as e:
            raise replicas_error(e, name, replicas) from e


def merged_subjects(current: list[str], wanted: list[str]) -> list[str]:
    """The stream's subjects with jetbatch's added; one of jetbatch's that covers an existing
    one (`a.>` covers `a.*`) takes its place rather than overlap it."""
    kept = [s for s in current if not any(s != w and subject_matches(w, s) for w in wanted)]
    return kept + [w for w in wanted if w not in kept]


_STREAM_NAME_IN_USE = 10058
# JetStream's error codes for "not that many replicas here".
_NO_SUCH_REPLICAS = {10074, 10023}  # replicas > 1 non-clustered; insufficient resources


def replicas_error(e: APIError, name: str, replicas: int) -> Exception:
    text = str(e.description or e)
    if replicas > 1 and (e.err_code in _NO_SUCH_REPLICAS or "replica" in text.lower()):
        return ReplicasUnavailable(
            f"JETBATCH_NATS_REPLICAS={replicas}, but stream {name} cannot have {replicas} replicas"
            f" on this NATS deployment ({text}): a single server holds 1; use a cluster of at"
            f" least {replicas} servers, or lower the setting"
        )
    return e


async def workers_kv(js: JetStreamContext, replicas: int = 1):  # type: ignore[no-untyped-def]
    return await through_elections(lambda: _bucket(js, WORKERS_BUCKET, WORKERS_TTL_S, replicas))


async def cancelled_kv(js: JetStreamContext, replicas: int = 1):  # type: ignore[no-untyped-def]
    return await through_elections(lambda: _bucket(js, CANCELLED_BUCKET, CANCELLED_TTL_S, replicas))


async def worker_control_kv(js: JetStreamContext, replicas: int = 1):  # type: ignore[no-untyped-def]
    return await through_elections(
        lambda: _bucket(js, WORKER_CONTROL_BUCKET, WORKER_CONTROL_TTL_S, replicas)
    )


async def _bucket(js: JetStreamContext, bucket: str, ttl_s: float, replicas: int):  # type: ignore[no-untyped-def]
    """A KV bucket, created with `replicas` or raised to it (never lowered), like a stream."""
    try:
        kv = await js.key_value(bucket)
    except NotFoundError:  # BucketNotFoundError subclasses it
        try:
            return await js.create_key_value(
                KeyValueConfig(bucket=bucket, history=1, ttl=ttl_s, replicas=replicas)
            )
        except APIError as e:
            raise replicas_error(e, f"KV_{bucket}", replicas) from e
    info = await js.stream_info(f"KV_{bucket}")
    await ensure_stream(js, dataclasses.replace(info.config, num_replicas=replicas))
    return kv


async def durable_consumer(
    js: JetStreamContext,
    stream: Stream,
    durable: str,
    filter_subject: str | tuple[str, ...] | None,
    *,
    ack_wait_s: float,
    max_deliver: int,
    max_ack_pending: int,
) -> None:
    """A durable pull consumer, created or updated to this config (None: the whole stream;
    several subjects: NATS 2.10's `filter_subjects`)."""
    several = isinstance(filter_subject, tuple)
    config = ConsumerConfig(
        durable_name=durable,
        filter_subject=None if several else filter_subject,  # type: ignore[arg-type]
        filter_subjects=list(filter_subject) if several else None,  # type: ignore[arg-type]
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait_s,
        max_deliver=max_deliver,
        max_ack_pending=max_ack_pending,
        max_waiting=512,
    )
    try:
        await js.add_consumer(stream.name, config)
    except BadRequestError:
        await js.add_consumer(stream.name, config)  # update of an existing durable
