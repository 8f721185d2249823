"""jetbatch's own API objects, beyond OpenAI's: workers and dead letters (README: Operations)."""

from __future__ import annotations

from typing import Literal

import msgspec


class WorkerStatus(msgspec.Struct, kw_only=True):
    """A worker's last heartbeat (schemas.messages.WorkerHeartbeat) and what the api makes of
    it: `stale` when older than JETBATCH_WORKER_STALE_S, `healthy` as the worker reported."""

    worker_id: str
    host: str
    pid: int
    model: str
    engine: str
    started_at: int
    seen_at: int
    age_s: float
    stale: bool
    healthy: bool
    in_flight: int
    capacity: int
    completed: int
    tokens_per_s: float
    gpu_index: int | None = None
    gpu_name: str | None = None
    gpu_memory_used_mb: int | None = None
    gpu_memory_total_mb: int | None = None
    gpu_temperature_c: int | None = None
    gpu_utilization_pct: int | None = None
    # What the engine allocated (vLLM): capacity is sized from them.
    max_num_seqs: int | None = None
    max_model_len: int | None = None
    kv_cache_blocks: int | None = None
    kv_cache_tokens: int | None = None
    # Synchronous requests, apart from in_flight/capacity: in the engine now, and aborted since
    # the worker started because the api stopped waiting for them (client gone, timeout).
    interactive_in_flight: int = 0
    interactive_aborted: int = 0
    # "running", "draining", "drained" or "restarting" (the heartbeat's), the key operators'
    # commands go under (stable across restarts) and the last command put there, if any.
    state: str = "running"
    control_id: str | None = None
    command: str | None = None
    object: Literal["worker"] = "worker"


class WorkerList(msgspec.Struct, kw_only=True):
    data: list[WorkerStatus]
    object: Literal["list"] = "list"


class DeadLetter(msgspec.Struct, kw_only=True):
    """A message that could not be processed and was set aside (table `dead_letters`)."""

    id: int
    created_at: int
    source: str  # the stream it was read from: REQUESTS, RESULTS, CONTROL
    subject: str
    error: str
    deliveries: int
    stream_seq: int | None = None
    consumer: str | None = None
    batch_id: str | None = None
    custom_id: str | None = None
    line: int | None = None
    replayed_at: int | None = None
    replay_count: int = 0
    payload_bytes: int = 0
    # The message as UTF-8 text (bytes that are not UTF-8 replaced); only on a retrieve.
    payload: str | None = None
    object: Literal["dead_letter"] = "dead_letter"


class DeadLetterList(msgspec.Struct, kw_only=True):
    data: list[DeadLetter]
    first_id: int | None
    last_id: int | None
    has_more: bool
    object: Literal["list"] = "list"


class LogRecord(msgspec.Struct, kw_only=True):
    """A warning-or-worse log record a service shipped to stream LOGS (shared/logship.py);
    `id` is its stream sequence (`before=` pages with it)."""

    id: int
    time: str
    level: str
    service: str
    logger: str
    message: str
    batch_id: str | None = None
    custom_id: str | None = None
    object: Literal["log"] = "log"


class LogCounts(msgspec.Struct, kw_only=True):
    error: int = 0
    warning: int = 0


class LogList(msgspec.Struct, kw_only=True):
    data: list[LogRecord]
    counts: LogCounts
    has_more: bool
    object: Literal["list"] = "list"
