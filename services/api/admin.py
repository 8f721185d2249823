"""jetbatch's own routes, beyond OpenAI's (README: Operations, Dead letters); operator routes,
for admin keys only (a project key gets a 403):

- `GET /v1/workers` and drain/resume/restart: services/api/worker_control.py.
- `GET /v1/dead_letters` (`?limit=&after=&batch_id=`), `GET /v1/dead_letters/{id}`: messages set
  aside because they could not be processed.
- `POST /v1/dead_letters/{id}/replay`: publish a dead letter's message again, as it was, to its
  subject (shared/domain/replay.py: requests by the api, results and control messages by the
  watchdog, which alone may publish those). If it was a request whose batch is still in
  progress, the error line its dead letter made is withdrawn first, so the replayed request's
  result takes its place.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

import msgspec
import nats.errors
from litestar import get, post
from litestar.params import Parameter

from schemas.admin import DeadLetter, DeadLetterList
from schemas.messages import WorkerHeartbeat
from services.api import store
from services.api.auth import ADMIN
from services.api.deps import DepsParam
from services.api.pages import list_page
from shared import bus
from shared.domain import replay
from shared.errors import InvalidRequest, NotFound, Unavailable

log = logging.getLogger(__name__)

KV_READ_TIMEOUT_S = 2.0
# Streams whose messages a replay may publish again.
REPLAYABLE_SOURCES = frozenset({bus.REQUESTS.name, bus.RESULTS.name, bus.CONTROL.name})

_heartbeat_decoder = msgspec.json.Decoder(WorkerHeartbeat)


async def read_heartbeats(deps: DepsParam) -> list[WorkerHeartbeat]:
    """Every heartbeat in the workers KV bucket (undecodable ones skipped).

    nats-py's watch can signal "no more initial values" before the values it has already been
    sent are counted (it compares the consumer's num_pending with what its subscription has
    seen so far), so under load an occupied bucket can read as empty; an empty read is asked
    again once."""
    beats = await _read_heartbeats_once(deps)
    return beats or await _read_heartbeats_once(deps)


async def _read_heartbeats_once(deps: DepsParam) -> list[WorkerHeartbeat]:
    beats: list[WorkerHeartbeat] = []
    for key, value in await kv_values(deps.workers, "worker heartbeats"):
        try:
            beats.append(_heartbeat_decoder.decode(value))
        except msgspec.DecodeError:
            log.warning("undecodable heartbeat under key %s", key)
    return beats


async def kv_values(kv: Any, what: str) -> list[tuple[str, bytes]]:
    """Every (key, value) of a KV bucket now, read with one watch; one that does not finish
    within KV_READ_TIMEOUT_S gives what came, with a warning."""
    values: list[tuple[str, bytes]] = []
    watcher = await kv.watchall(ignore_deletes=True)
    try:
        while True:
            try:
                entry = await watcher.updates(timeout=KV_READ_TIMEOUT_S)
            except nats.errors.TimeoutError:
                log.warning("reading %s timed out; the list may be short", what)
                break
            if entry is None:  # the end of the initial values (also for an empty bucket)
                break
            values.append((entry.key, entry.value or b""))
    finally:
        await watcher.stop()
    return values


def is_stale(beat: WorkerHeartbeat, now: float, stale_after_s: float) -> bool:
    return now - beat.seen_at > stale_after_s


async def require_healthy_worker(deps: DepsParam, models: list[str]) -> None:
    """503 unless each model has a worker whose last heartbeat is fresh and says healthy."""
    stale_after_s = deps.settings.health.worker_stale_s
    now = time.time()
    beats = await read_heartbeats(deps)
    for model in models:
        if not any(
            b.model == model and b.healthy and not is_stale(b, now, stale_after_s) for b in beats
        ):
            raise Unavailable(
                f"No healthy worker for model {model!r} has been seen in the last "
                f"{stale_after_s:g} s: the batch would not run. Retry once a worker is up "
                "(GET /v1/workers shows them).",
                param="input_file_id",
                code="no_healthy_worker",
            )


# Dead letters ---------------------------------------------------------------------------------


def dead_letter_from_row(row: store.Row, *, with_payload: bool = False) -> DeadLetter:
    return DeadLetter(
        id=row["id"],
        created_at=row["created_at"],
        source=row["source"],
        subject=row["subject"],
        error=row["error"],
        deliveries=row["deliveries"],
        stream_seq=row["stream_seq"],
        consumer=row["consumer"],
        batch_id=row["batch_id"],
        custom_id=row["custom_id"],
        line=row["line"],
        replayed_at=row["replayed_at"],
        replay_count=row["replay_count"],
        payload_bytes=row["payload_bytes"] or 0,
        payload=bytes(row["payload"]).decode("utf-8", "replace") if with_payload else None,
    )


def dead_letter_not_found(dead_letter_id: int) -> NotFound:
    return NotFound(f"No such dead letter: {dead_letter_id}", param="dead_letter_id")


@get("/dead_letters", opt=ADMIN)
async def list_dead_letters(
    deps: DepsParam,
    limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
    after: int | None = None,
    batch_id: str | None = None,
) -> DeadLetterList:
    rows, has_more = await store.list_dead_letters(
        deps.pool, limit=limit, after=after, batch_id=batch_id
    )
    data = [dead_letter_from_row(r) for r in rows]
    return list_page(DeadLetterList, data, has_more)


@get("/dead_letters/{dead_letter_id:int}", opt=ADMIN)
async def retrieve_dead_letter(dead_letter_id: int, deps: DepsParam) -> DeadLetter:
    row = await store.get_dead_letter(deps.pool, dead_letter_id)
    if row is None:
        raise dead_letter_not_found(dead_letter_id)
    return dead_letter_from_row(row, with_payload=True)


@post("/dead_letters/{dead_letter_id:int}/replay", status_code=200, opt=ADMIN)
async def replay_dead_letter(dead_letter_id: int, deps: DepsParam) -> DeadLetter:
    row = await store.get_dead_letter(deps.pool, dead_letter_id)
    if row is None:
        raise dead_letter_not_found(dead_letter_id)
    if row["source"] not in REPLAYABLE_SOURCES:
        raise InvalidRequest(
            f"dead letter {dead_letter_id} came from {row['source'] or 'outside JetStream'}; "
            f"only messages of {', '.join(sorted(REPLAYABLE_SOURCES))} can be replayed",
            param="dead_letter_id",
        )
    if row["source"] in replay.BY_WATCHDOG:  # subjects only the watchdog may publish
        try:
            answer = await deps.nc.request(
                replay.REPLAY_SUBJECT,
                msgspec.json.encode(replay.ReplayRequest(dead_letter_id)),
                timeout=replay.REPLAY_TIMEOUT_S,
            )
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            raise Unavailable(
                f"dead letter {dead_letter_id} is replayed by the watchdog, and no watchdog"
                " answered; start one and try again",
                code="watchdog_unavailable",
            ) from None
        failed = msgspec.json.decode(answer.data, type=replay.ReplayReply).error
        if failed is not None:
            raise Unavailable(f"the watchdog could not replay it: {failed}")
        updated = await store.get_dead_letter(deps.pool, dead_letter_id)
    else:
        async with deps.pool.acquire() as conn:
            try:
                updated = await replay.replay(conn, deps.js, row)
            except bus.PublishError as e:
                raise Unavailable(f"could not publish the dead letter again: {e}") from None
    assert updated is not None
    return dead_letter_from_row(updated)


ROUTES = [list_dead_letters, retrieve_dead_letter, replay_dead_letter]
