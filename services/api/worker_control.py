"""Workers, for operators (admin keys only; a project key gets a 403):

- `GET /v1/workers`: every worker's last heartbeat, flagged `stale` past JETBATCH_WORKER_STALE_S,
  with its `state` (running, draining, drained, restarting), `control_id` and the last `command`.
- `POST /v1/workers/{worker_id}/drain|resume|restart`: put a WorkerCommand into KV bucket
  `jetbatch_worker_control` under the worker's control id (stable across its restarts), which
  the worker watches wherever it runs (services/inference/control.py). `{worker_id}` is its
  `worker_id` or its `control_id`; one that no heartbeat in `jetbatch_workers` names is a 404.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec
from litestar import get, post

from schemas.admin import WorkerList, WorkerStatus
from schemas.messages import WorkerCommand, WorkerHeartbeat
from services.api.admin import is_stale, kv_values, read_heartbeats
from services.api.auth import ADMIN
from services.api.deps import DepsParam
from shared import bus
from shared.errors import NotFound, Unavailable

log = logging.getLogger(__name__)


_encoder = msgspec.json.Encoder()
_command_decoder = msgspec.json.Decoder(WorkerCommand)


async def control_kv(deps: DepsParam) -> Any:
    if deps.control is None:
        deps.control = await bus.worker_control_kv(deps.js, deps.settings.nats_replicas)
    return deps.control


def control_key(beat: WorkerHeartbeat) -> str:
    return beat.control_id or beat.worker_id


async def read_commands(deps: DepsParam) -> dict[str, WorkerCommand]:
    """Every command in the control bucket, by control id."""
    commands: dict[str, WorkerCommand] = {}
    for key, value in await kv_values(await control_kv(deps), "worker commands"):
        try:
            commands[key] = _command_decoder.decode(value)
        except msgspec.DecodeError:
            log.warning("undecodable worker command under key %s", key)
    return commands


def worker_status(
    b: WorkerHeartbeat, now: float, stale_after_s: float, command: WorkerCommand | None
) -> WorkerStatus:
    fields = {f: getattr(b, f) for f in WorkerStatus.__struct_fields__ if hasattr(b, f)}
    fields.update(
        age_s=round(max(0.0, now - b.seen_at), 1),
        stale=is_stale(b, now, stale_after_s),
        control_id=control_key(b),
        command=command.action if command else None,
    )
    fields.pop("object", None)
    return WorkerStatus(**fields)


@get("/workers", opt=ADMIN)
async def list_workers(deps: DepsParam) -> WorkerList:
    now = time.time()
    stale_after_s = deps.settings.health.worker_stale_s
    beats = sorted(await read_heartbeats(deps), key=lambda b: (b.model, b.worker_id))
    commands = await read_commands(deps) if beats else {}
    return WorkerList(
        data=[worker_status(b, now, stale_after_s, commands.get(control_key(b))) for b in beats]
    )


async def command(deps: DepsParam, worker_id: str, action: str) -> WorkerStatus:
    beats = [b for b in await read_heartbeats(deps) if worker_id in (b.worker_id, b.control_id)]
    if not beats:
        raise NotFound(f"no worker {worker_id}", param="worker_id")
    beat = max(beats, key=lambda b: b.seen_at)  # the latest process under that control id
    order = WorkerCommand(
        action=action,  # type: ignore[arg-type]
        at=int(time.time()),
        host=beat.host,
        pid=beat.pid,
        started_at=beat.started_at,
    )
    try:
        await (await control_kv(deps)).put(control_key(beat), _encoder.encode(order))
    except Exception as e:
        raise Unavailable(f"could not store the command for worker {worker_id}: {e}") from None
    log.info("worker %s (%s): %s ordered", beat.worker_id, control_key(beat), action)
    return worker_status(beat, time.time(), deps.settings.health.worker_stale_s, order)


@post("/workers/{worker_id:str}/drain", status_code=200, opt=ADMIN)
async def drain_worker(worker_id: str, deps: DepsParam) -> WorkerStatus:
    return await command(deps, worker_id, "drain")


@post("/workers/{worker_id:str}/resume", status_code=200, opt=ADMIN)
async def resume_worker(worker_id: str, deps: DepsParam) -> WorkerStatus:
    return await command(deps, worker_id, "resume")


@post("/workers/{worker_id:str}/restart", status_code=200, opt=ADMIN)
async def restart_worker(worker_id: str, deps: DepsParam) -> WorkerStatus:
    return await command(deps, worker_id, "restart")


ROUTES = [list_workers, drain_worker, resume_worker, restart_worker]
