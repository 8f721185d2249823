"""Messages on the bus. Each type declares the subject it travels on next to its fields.

A request message is what any service publishes to have one request run; its result comes back as
a ResultMessage. See README "Publishing to JetStream directly".
"""

from __future__ import annotations

import re
import time
from typing import ClassVar, Literal

import msgspec

from schemas.projects import DEFAULT_PROJECT_ID

# The last token of a request's subject: its class on the worker. "dispatched": a line of an API
# batch, published by the api's dispatcher in scheduling order; "batch": a line another service
# published straight to JetStream (README "Publishing to JetStream directly"). A worker reads the
# two classes through two consumers and gives each at least half its engine while both wait, so
# direct publishers are a fair-share class of their own ("interactive" is an old token).
Priority = Literal["interactive", "batch", "dispatched"]
DISPATCHED: Priority = "dispatched"
DIRECT: Priority = "batch"


_NOT_IN_A_TOKEN = re.compile(r"[.*> \t]")
_TOKEN = str.maketrans(dict.fromkeys(".*> \t", "_"))


def subject_token(name: str) -> str:
    """A name as one NATS subject token ('.', '*', '>' and spaces are not allowed). On every
    result's path, hence the quick look first (measured: 1.1 -> 0.2 us per id)."""
    return name.translate(_TOKEN) if _NOT_IN_A_TOKEN.search(name) else name


class BusMessage(msgspec.Struct, kw_only=True, frozen=True):
    """A message on the bus. Its subject is declared once, as a template (`subject`) whose
    `{placeholders}` are single tokens: the subject a message is published on, the filter a
    consumer reads with and a stream's subjects are all derived from it, never written again."""

    subject: ClassVar[str]

    @classmethod
    def subject_with(cls, **tokens: str) -> str:
        """The subject for these placeholder values (each made a valid single token)."""
        return cls.subject.format(**{k: subject_token(v) for k, v in tokens.items()})

    @classmethod
    def filter_subject(cls, **bound: str) -> str:
        """The subjects of this type with some placeholders fixed: the others match any token,
        and a run of them at the end matches the rest of the subject (`>`), so that a subject
        that later gains a token is still matched."""
        tokens = [
            subject_token(bound[t[1:-1]]) if t.startswith("{") and t[1:-1] in bound else t
            for t in cls.subject.split(".")
        ]
        if tokens[-1].startswith("{"):
            while tokens and tokens[-1].startswith("{"):
                tokens.pop()
            tokens.append(">")
        return ".".join("*" if t.startswith("{") else t for t in tokens)


def subject_matches(filter_subject: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, a final `>` one or more."""
    want, have = filter_subject.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


class RequestMessage(BusMessage, kw_only=True, frozen=True):
    """One request for the engine. Published to REQUESTS on
    `jetbatch.requests.<model>.<project>.<priority>` with `Nats-Msg-Id: <batch_id>:<line>`.
    The project is a token of its own so that NATS permissions (a publisher may publish under
    its own project only), per-project queue depth and fair share are expressed on subjects. A
    worker trusts the subject's project token: a message whose `project` field disagrees with it
    is rejected. Messages published before projects (`legacy_subject`) are still consumed."""

    subject: ClassVar[str] = "jetbatch.requests.{model}.{project}.{priority}"
    # Before projects (default project): consumer filters and stream subjects still cover it.
    legacy_subject: ClassVar[str] = "jetbatch.requests.{model}.{priority}"

    batch_id: str
    line: int  # 0-based line number in the input file
    custom_id: str
    endpoint: str  # /v1/chat/completions | /v1/completions | /v1/embeddings
    model: str
    body: msgspec.Raw  # the request body, exactly as the client wrote it
    project: str = DEFAULT_PROJECT_ID
    # The batch's priority, -10 (last) .. 10 (first): the worker maps it, aged by the time the
    # message waited, onto the engine's (services/inference/priority.py).
    priority: int = 0

    @staticmethod
    def subject_for(
        model: str, priority: Priority = "batch", *, project: str = DEFAULT_PROJECT_ID
    ) -> str:
        return RequestMessage.subject_with(model=model, project=project, priority=priority)

    @staticmethod
    def class_filters(model: str) -> dict[str, tuple[str, ...]]:
        """A worker's consumer filters for `model`, by class: what the api dispatched, and
        everything else (direct publishers' lines and those of the subjects before projects)."""
        base = f"jetbatch.requests.{subject_token(model)}"
        return {
            DISPATCHED: (f"{base}.*.{DISPATCHED}",),
            DIRECT: (f"{base}.*.{DIRECT}", f"{base}.*.interactive", f"{base}.*"),
        }

    @staticmethod
    def class_durables(model: str) -> dict[str, str]:
        """The workers' durable consumer for each class of `model`'s requests."""
        token = subject_token(model)
        return {DISPATCHED: f"inference-{token}", DIRECT: f"inference-{token}-direct"}

    @staticmethod
    def dispatched(subject: str) -> bool:
        """Whether a request's subject is of the api's dispatched class."""
        return subject.endswith(f".{DISPATCHED}")

    @staticmethod
    def project_in(subject: str) -> str:
        """The project token of a request's subject (a legacy subject: the default project)."""
        tokens = subject.split(".")
        return tokens[3] if len(tokens) >= 5 else DEFAULT_PROJECT_ID

    @property
    def msg_id(self) -> str:
        return f"{self.batch_id}:{self.line}"


class ResultMessage(BusMessage, kw_only=True, frozen=True):
    """The outcome of one request. Published to RESULTS on `jetbatch.results.<project>.<batch_id>`
    (the request's project) with `Nats-Msg-Id: <batch_id>:<line>:r`. Exactly one of
    `response_body` / `error_*` is set."""

    subject: ClassVar[str] = "jetbatch.results.{project}.{batch_id}"
    # Before projects (default project): the results writer's filter still covers it.
    legacy_subject: ClassVar[str] = "jetbatch.results.{batch_id}"

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
    project: str = DEFAULT_PROJECT_ID
    # GPU milliseconds the request used: its share of its engine's busy time (shared equally by
    # the requests in the engine at each moment) times the GPUs the worker owns; 0 when unknown.
    gpu_ms: int = 0

    @staticmethod
    def subject_for(batch_id: str, project: str = DEFAULT_PROJECT_ID) -> str:
        # Not subject_with(): this one is on every result's path.
        return ResultMessage.subject.format(
            project=subject_token(project), batch_id=subject_token(batch_id)
        )

    @property
    def published_on(self) -> str:
        """The subject this result is published on."""
        return ResultMessage.subject_for(self.batch_id, self.project)

    @staticmethod
    def batch_subjects(batch_id: str) -> tuple[str, str]:
        """Every subject a batch's results may be on, whatever their project, legacy included."""
        token = subject_token(batch_id)
        return f"jetbatch.results.*.{token}", ResultMessage.legacy_subject.format(batch_id=token)

    @property
    def msg_id(self) -> str:
        return f"{self.batch_id}:{self.line}:r"

    @property
    def ok(self) -> bool:
        return self.error_code is None and 200 <= self.status_code < 300

    @classmethod
    def failure(
        cls,
        *,
        batch_id: str,
        line: int,
        custom_id: str,
        request_id: str,
        status_code: int,
        code: str,
        message: str,
        worker_id: str,
        project: str = DEFAULT_PROJECT_ID,
    ) -> ResultMessage:
        """An error line that no engine answer produced (no response body): a cancelled or
        expired request, an engine failure on the last delivery, a dead-lettered request."""
        return cls(
            project=project,
            batch_id=batch_id,
            line=line,
            custom_id=custom_id,
            request_id=request_id,
            status_code=status_code,
            error_code=code,
            error_message=message,
            worker_id=worker_id,
            finished_at_ms=int(time.time() * 1000),
        )

    @property
    def has_body(self) -> bool:
        return bytes(self.response_body) not in (b"", b"null")


class BatchEvent(BusMessage, kw_only=True, frozen=True):
    """A batch reached a final state. Published to EVENTS on
    `jetbatch.events.batch.<project>.<status>` with `Nats-Msg-Id: <event_id>`; the webhook
    notifier delivers it. The project is a token of its own, so that a subscriber can be allowed
    one project's events and no other's. Events published before projects (`legacy_subject`)
    are still delivered (the notifier reads `jetbatch.events.batch.>`)."""

    subject: ClassVar[str] = "jetbatch.events.batch.{project}.{status}"
    legacy_subject: ClassVar[str] = "jetbatch.events.batch.{status}"

    id: str  # evt_...
    type: Literal["batch.completed", "batch.failed", "batch.cancelled", "batch.expired"]
    batch_id: str
    created_at: int
    metadata: dict[str, str] | None = None
    project: str = DEFAULT_PROJECT_ID

    @staticmethod
    def subject_for(type_: str, project: str = DEFAULT_PROJECT_ID) -> str:
        return BatchEvent.subject_with(project=project, status=type_.removeprefix("batch."))

    @property
    def published_on(self) -> str:
        """The subject this event is published on."""
        return BatchEvent.subject_for(self.type, self.project)


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
    # What `capacity` is sized from, as vLLM sized its engine (None: an engine without them).
    max_num_seqs: int | None = None
    max_model_len: int | None = None
    kv_cache_blocks: int | None = None  # allocated after profiling memory
    kv_cache_tokens: int | None = None  # what those blocks hold in all
    # Synchronous requests (counted apart from `in_flight` and `capacity`): in the engine now,
    # and aborted since start because the api stopped waiting for them (InteractiveAbort).
    interactive_in_flight: int = 0
    interactive_aborted: int = 0
    # What operators asked of it (KV `jetbatch_worker_control`): "running", "draining" (pulls
    # nothing new, finishing what it holds), "drained" (holds nothing), or "restarting".
    state: str = "running"
    # The key its commands are put under: stable across restarts (`--worker-id`, or
    # host-model-gpu), unlike `worker_id`, which holds the pid when none is configured.
    control_id: str | None = None


class WorkerCommand(msgspec.Struct, kw_only=True, frozen=True):
    """Put into KV bucket `jetbatch_worker_control` under a worker's `control_id` by the api:
    `drain` (pull nothing new, finish what is held, stay up), `resume`, or `restart` (drain,
    then exit 0 for its supervisor to start it again). A restart names the process it is for
    (host, pid, started_at), so the restarted one does not obey it again."""

    action: Literal["drain", "resume", "restart"]
    at: int  # unix seconds
    host: str | None = None
    pid: int | None = None
    started_at: int | None = None


class InteractiveRequest(BusMessage, kw_only=True, frozen=True):
    """A synchronous request over NATS request/reply on `jetbatch.interactive.<model>.<project>`
    (queue group per model); the reply is a ResultMessage. Requests of an api from before
    projects (`legacy_subject`) are still answered."""

    subject: ClassVar[str] = "jetbatch.interactive.{model}.{project}"
    legacy_subject: ClassVar[str] = "jetbatch.interactive.{model}"

    request_id: str
    endpoint: str
    model: str
    body: msgspec.Raw
    project: str = DEFAULT_PROJECT_ID

    @staticmethod
    def subject_for(model: str, project: str = DEFAULT_PROJECT_ID) -> str:
        return InteractiveRequest.subject_with(model=model, project=project)


class InteractiveAbort(BusMessage, kw_only=True, frozen=True):
    """Core NATS (no JetStream, no reply) on `jetbatch.interactive.abort.<model>.<project>`
    (one token more than a request, so neither subject matches the other's filter), from the api
    to every worker of the model (no queue group) when it stops waiting for a synchronous request:
    its client went away, no answer came in time, or the api is stopping. The worker running the
    request aborts it in the engine; the others ignore it."""

    subject: ClassVar[str] = "jetbatch.interactive.abort.{model}.{project}"

    request_id: str
    reason: str = "client_closed"  # "client_closed" | "timeout" | "abandoned"

    @staticmethod
    def subject_for(model: str, project: str = DEFAULT_PROJECT_ID) -> str:
        return InteractiveAbort.subject_with(model=model, project=project)


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


class BatchCommand(BusMessage, kw_only=True, frozen=True):
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
        return BatchCommand.subject_with(action=action)


class DeadLetterMessage(BusMessage, kw_only=True, frozen=True):
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
        return DeadLetterMessage.subject_with(stream=stream)

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
    project: str = DEFAULT_PROJECT_ID


class MaxDeliveriesAdvisory(BusMessage, kw_only=True, frozen=True):
    """JetStream's own `io.nats.jetstream.advisory.v1.max_deliver` (the fields jetbatch reads):
    a message of `stream` reached max deliveries on `consumer`. Captured in DEADLETTERS for
    REQUESTS, so none is missed while the watchdog is down."""

    subject: ClassVar[str] = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{consumer}"

    stream: str
    consumer: str
    stream_seq: int
    deliveries: int
