"""OpenAI's Files and Batches objects, field for field (../shared/OPENAI_BATCH.md).

Optional fields are present with null, as the live API answers. Extra fields beyond OpenAI's
(SDKs ignore them) are marked as such.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

BatchStatus = Literal[
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
]
TERMINAL_STATUSES: frozenset[str] = frozenset({"failed", "completed", "expired", "cancelled"})

# The endpoints this deployment serves. Any other (OpenAI's /v1/responses, /v1/moderations, ...)
# is refused with this error code and a message that lists these (services/api/exceptions.py).
Endpoint = Annotated[
    Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"],
    Meta(extra={"error_code": "unsupported_endpoint"}),
]

FilePurpose = Literal[
    "batch", "batch_output", "assistants", "fine-tune", "vision", "user_data", "evals"
]

# A batch's metadata, as OpenAI bounds it: at most 16 pairs, keys <= 64 and values <= 512 characters;
# no NUL (PostgreSQL cannot store it).
NO_NUL = "^[^\x00]*$"
MetadataKey = Annotated[str, Meta(max_length=64, pattern=NO_NUL)]
MetadataValue = Annotated[str, Meta(max_length=512, pattern=NO_NUL)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Meta(max_length=16)]


class ErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct, kw_only=True):
    error: ErrorDetail


class ExpiresAfter(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    anchor: Literal["created_at"]
    seconds: Annotated[int, Meta(ge=3600, le=2592000)]


class OpenAIFile(msgspec.Struct, kw_only=True, omit_defaults=False):
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    object: Literal["file"] = "file"
    expires_at: int | None = None
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None


class FileList(msgspec.Struct, kw_only=True):
    data: list[OpenAIFile]
    first_id: str | None
    last_id: str | None
    has_more: bool
    object: Literal["list"] = "list"


class DeletedFile(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class BatchError(msgspec.Struct, kw_only=True):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(msgspec.Struct, kw_only=True):
    data: list[BatchError] = msgspec.field(default_factory=list)
    object: Literal["list"] = "list"


class RequestCounts(msgspec.Struct, kw_only=True):
    total: int = 0
    completed: int = 0
    failed: int = 0


class InputTokensDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int = 0


class OutputTokensDetails(msgspec.Struct, kw_only=True):
    reasoning_tokens: int = 0


class BatchUsage(msgspec.Struct, kw_only=True):
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    input_tokens_details: InputTokensDetails = msgspec.field(default_factory=InputTokensDetails)
    output_tokens_details: OutputTokensDetails = msgspec.field(default_factory=OutputTokensDetails)


# A batch's priority (jetbatch extension, README: Scheduling): -10 runs last, 10 first.
BatchPriority = Annotated[int, Meta(ge=-10, le=10)]


class CreateBatchRequest(msgspec.Struct, kw_only=True):
    input_file_id: str
    endpoint: Endpoint
    # "24h" (OpenAI's only value); jetbatch also takes "<N>h" / "<N>d" from 1h to 7d
    # (services/api/batch_options.py).
    completion_window: str
    metadata: Metadata | None = None
    output_expires_after: ExpiresAfter | None = None
    # Extension field (SDKs send it with `extra_body`); or metadata `jetbatch_priority`.
    priority: BatchPriority | None = None


class Batch(msgspec.Struct, kw_only=True):
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    created_at: int
    object: Literal["batch"] = "batch"
    model: str | None = None
    errors: BatchErrors | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = msgspec.field(default_factory=RequestCounts)
    usage: BatchUsage = msgspec.field(default_factory=BatchUsage)
    metadata: dict[str, str] | None = None
    # Extra fields beyond OpenAI's: the batch's webhook deliveries (README: Webhooks). Status
    # pending | delivered | failed (a delivery is a dead letter), null when nothing is sent;
    # attempts over all its deliveries; the last error while pending or failed.
    webhook_status: Literal["pending", "delivered", "failed"] | None = None
    webhook_attempts: int = 0
    webhook_error: str | None = None
    # Extra field beyond OpenAI's: since when the watchdog has seen no progress on this open
    # batch (JETBATCH_BATCH_STALL_S); null while it progresses.
    stalled_at: int | None = None
    # Extra field beyond OpenAI's: the GPU time its lines used, in GPU-seconds (README: Usage
    # and costs; each line's share of its engine's busy time times the worker's GPUs).
    gpu_seconds: float = 0.0
    # Extra field beyond OpenAI's: the priority it was created with, -10 (last) .. 10 (first).
    priority: int = 0
    # Extra fields beyond OpenAI's (README: Scheduling), while none of its lines has been
    # dispatched yet: how many of its project's batches for the model are served before it, and
    # when it should start at the model's current rate (null when no rate is known yet). Both
    # null once it has started.
    queue_position: int | None = None
    estimated_start_at: int | None = None


class BatchList(msgspec.Struct, kw_only=True):
    data: list[Batch]
    first_id: str | None
    last_id: str | None
    has_more: bool
    object: Literal["list"] = "list"


class RequestLine(msgspec.Struct, kw_only=True):
    """One line of a batch input file. `body` stays raw: it travels to the engine untouched."""

    custom_id: str
    method: str
    url: str
    body: msgspec.Raw


class LineResponse(msgspec.Struct, kw_only=True):
    status_code: int
    request_id: str
    body: msgspec.Raw


class LineError(msgspec.Struct, kw_only=True):
    code: str | None
    message: str


class OutputLine(msgspec.Struct, kw_only=True, omit_defaults=False):
    """One line of a batch output or error file."""

    id: str
    custom_id: str
    response: LineResponse | None = None
    error: LineError | None = None


class Model(msgspec.Struct, kw_only=True):
    id: str
    created: int
    owned_by: str = "jetbatch"
    object: Literal["model"] = "model"
    # Extra fields beyond OpenAI's.
    endpoints: list[str] = msgspec.field(default_factory=list)
    live_workers: int = 0


class ModelList(msgspec.Struct, kw_only=True):
    data: list[Model]
    object: Literal["list"] = "list"
