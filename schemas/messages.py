"""Messages on the bus. Each type declares the subject it travels on next to its fields.

A request message is what any service publishes to have one request run; its result comes back as
a ResultMessage. See README "Publishing to JetStream directly".
"""

from __future__ import annotations

from typing import ClassVar, Literal

import msgspec

Priority = Literal["interactive", "batch"]


def subject_token(name: str) -> str:
    """A model name as one NATS subject token ('.', '*', '>' and spaces are not allowed)."""
    return "".join("_" if c in ".*> \t" else c for c in name)


class RequestMessage(msgspec.Struct, kw_only=True, frozen=True):
    """One request for the engine. Published to REQUESTS on `jetbatch.requests.<model>.<priority>`
    with `Nats-Msg-Id: <batch_id>:<line>`."""

    subject: ClassVar[str] = "jetbatch.requests.{model}.{priority}"

    batch_id: str
    line: int  # 0-based line number in the input file
    custom_id: str
    endpoint: str  # /v1/chat/completions | /v1/completions | /v1/embeddings
    model: str
    body: msgspec.Raw  # the request body, exactly as the client wrote it

    @staticmethod
    def subject_for(model: str, priority: Priority = "batch") -> str:
        return f"jetbatch.requests.{subject_token(model)}.{priority}"

    @property
    def msg_id(self) -> str:
        return f"{self.batch_id}:{self.line}"


class ResultMessage(msgspec.Struct, kw_only=True, frozen=True):
    """The outcome of one request. Published to RESULTS on `jetbatch.results.<batch_id>` with
    `Nats-Msg-Id: <batch_id>:<line>:r`. Exactly one of `response_body` / `error_*` is set."""

    subject: ClassVar[str] = "jetbatch.results.{batch_id}"

    batch_id: str
    line: int
    custom_id: str
    request_id: str
    status_code: int
    # The response body JSON (an OpenAI error object for a rejected request); JSON null when
    # there is none (msgspec.Raw cannot be Optional, so absence is the raw `null`).
    response_body: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))
    error_code: str | None = None
    error_message: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    worker_id: str = ""
    finished_at_ms: int = 0

    @staticmethod
    def subject_for(batch_id: str) -> str:
        return f"jetbatch.results.{batch_id}"

    @property
    def msg_id(self) -> str:
        return f"{self.batch_id}:{self.line}:r"

    @property
    def ok(self) -> bool:
        return self.error_code is None and 200 <= self.status_code < 300

    @property
    def has_body(self) -> bool:
        return bytes(self.response_body) not in (b"", b"null")


class BatchEvent(msgspec.Struct, kw_only=True, frozen=True):
    """A batch reached a final state. Published to EVENTS on `jetbatch.events.batch.<status>`
    with `Nats-Msg-Id: <event_id>`; the webhook notifier delivers it."""

    subject: ClassVar[str] = "jetbatch.events.batch.{status}"

    id: str  # evt_...
    type: Literal["batch.completed", "batch.failed", "batch.cancelled", "batch.expired"]
    batch_id: str
    created_at: int
    metadata: dict[str, str] | None = None

    @staticmethod
    def subject_for(type_: str) -> str:
        return f"jetbatch.events.{type_}"


class WorkerHeartbeat(msgspec.Struct, kw_only=True, frozen=True):
    """Put into KV bucket `jetbatch_workers` under the worker id every few seconds."""

    worker_id: str
    host: str
    pid: int
    model: str
    endpoints: list[str]
    engine: str
    started_at: int
    seen_at: int
    in_flight: int = 0  # requests in the engine now (results on their way to RESULTS excluded)
    capacity: int = 0  # how many it keeps in the engine at most
    completed: int = 0
    tokens_per_s: float = 0.0
    gpu_index: int | None = None
    gpu_name: str | None = None
    gpu_memory_used_mb: int | None = None
    gpu_memory_total_mb: int | None = None
    gpu_temperature_c: int | None = None
    gpu_utilization_pct: int | None = None
    healthy: bool = True


class InteractiveRequest(msgspec.Struct, kw_only=True, frozen=True):
    """A synchronous request over NATS request/reply on `jetbatch.interactive.<model>`
    (queue group per model); the reply is a ResultMessage."""

    subject: ClassVar[str] = "jetbatch.interactive.{model}"

    request_id: str
    endpoint: str
    model: str
    body: msgspec.Raw

    @staticmethod
    def subject_for(model: str) -> str:
        return f"jetbatch.interactive.{subject_token(model)}"


StopReason = Literal["cancelled", "expired"]


class BatchStop(msgspec.Struct, kw_only=True, frozen=True):
    """Put into KV bucket `jetbatch_cancelled` under the batch id when a batch's remaining
    requests must not run: it was cancelled, or its completion window passed. Workers answer
    its queued requests with a `batch_cancelled` / `batch_expired` error result without running
    the engine, and abort the ones they are running."""

    batch_id: str
    reason: StopReason
    at: int  # unix seconds

    @property
    def error_code(self) -> str:
        """The code of the error line each of the batch's unfinished requests becomes."""
        return f"batch_{self.reason}"

    @property
    def error_message(self) -> str:
        if self.reason == "cancelled":
            return "The batch was cancelled before this request was run."
        return "This request could not be executed before the completion window expired."


class BatchCommand(msgspec.Struct, kw_only=True, frozen=True):
    """Work the watchdog asks of the api for one batch. Published to CONTROL on
    `jetbatch.control.batch.<action>`; any api replica takes it (durable `api`).

    - `redrive`: re-run the idempotent validate-and-publish of a batch a crashed api left in
      `validating` (or in progress but not fully published).
    - `close_out`: a cancelled or expired batch's grace period is over: every line still without
      a result becomes a `batch_cancelled` / `batch_expired` error line, so it can finalize.
    """

    subject: ClassVar[str] = "jetbatch.control.batch.{action}"

    batch_id: str
    action: Literal["redrive", "close_out"]
    issued_at: int

    @staticmethod
    def subject_for(action: str) -> str:
        return f"jetbatch.control.batch.{action}"


class DeadLetterMessage(msgspec.Struct, kw_only=True, frozen=True):
    """A message a service without a database had to reject (an inference worker: a request
    that does not decode). Published to DEADLETTERS on `jetbatch.deadletters.<stream>` with
    `Nats-Msg-Id: dl:<stream>:<stream_seq>`; the watchdog records it in table `dead_letters`."""

    subject: ClassVar[str] = "jetbatch.deadletters.{stream}"

    stream: str  # where the rejected message was stored
    stream_seq: int
    consumer: str
    original_subject: str
    payload: bytes  # base64 in JSON
    error: str
    deliveries: int = 1
    headers: dict[str, str] | None = None

    @staticmethod
    def subject_for(stream: str) -> str:
        return f"jetbatch.deadletters.{stream}"

    @property
    def msg_id(self) -> str:
        return f"dl:{self.stream}:{self.stream_seq}"


class LineKey(msgspec.Struct, kw_only=True, frozen=True):
    """What request and result messages share, read leniently (every field optional, anything
    else ignored) from a message that does not decode as its own type, to tell which batch line
    a dead letter belongs to."""

    batch_id: str | None = None
    line: int | None = None
    custom_id: str | None = None
