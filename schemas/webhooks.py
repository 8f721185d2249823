"""Webhooks: the event body a receiver gets (OpenAI's shape), the endpoint objects of
`/v1/webhook_endpoints` (OpenAI's own API, so `client.webhooks.create(...)` of the official SDK
works), and jetbatch's delivery log (`/v1/webhook_deliveries`, an extension).

The event body is exactly what is signed and sent: `{"id": "evt_...", "object": "event", "type":
"batch.completed", "created_at": ..., "data": {"id": "batch_...", "metadata": {...}}}`; the batch's
metadata travels inside `data` (an extra field beyond OpenAI's, which SDKs ignore) so a receiver
needs no second call.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

import msgspec
from msgspec import Meta

WebhookEventType = Literal["batch.completed", "batch.failed", "batch.cancelled", "batch.expired"]
WEBHOOK_EVENT_TYPES: tuple[str, ...] = get_args(WebhookEventType)

# pending: waiting for its next attempt (or being attempted); delivered: a 2xx answer; dead: a
# dead letter (attempts or max age exhausted, or refused: unsafe URL, no secret); cancelled: its
# endpoint was removed before it was delivered.
DeliveryStatus = Literal["pending", "delivered", "dead", "cancelled"]
# On the batch object: the worst news across the batch's deliveries, `failed` = a dead letter.
BatchWebhookStatus = Literal["pending", "delivered", "failed"]

WebhookUrl = Annotated[str, Meta(min_length=1, max_length=2048)]


class WebhookEventData(msgspec.Struct, kw_only=True, omit_defaults=False):
    id: str  # the batch id
    metadata: dict[str, str] | None = None  # the batch's metadata (extra field)


class WebhookEvent(msgspec.Struct, kw_only=True, omit_defaults=False):
    """The body of a webhook POST; `client.webhooks.unwrap()` parses it."""

    id: str  # evt_..., also the `webhook-id` header: the same on every retry
    type: WebhookEventType
    created_at: int
    data: WebhookEventData
    object: Literal["event"] = "event"


# Endpoints (operator-registered destinations) -----------------------------------------------


class WebhookEndpoint(msgspec.Struct, kw_only=True, omit_defaults=False):
    id: str  # we_...
    created_at: int
    event_types: list[str]
    name: str
    url: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    signing_secret_hint: str | None = None
    updated_at: int | None = None


class WebhookEndpointWithSecret(WebhookEndpoint, kw_only=True, omit_defaults=False):
    """Returned by create and rotate_secret only: the one time the secret is shown."""

    signing_secret: str


class CreateWebhookEndpointRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    url: WebhookUrl
    event_types: list[str] = msgspec.field(default_factory=lambda: list(WEBHOOK_EVENT_TYPES))
    name: Annotated[str, Meta(max_length=256)] = ""
    # jetbatch extension: bring your own `whsec_...` secret; one is generated when absent.
    secret: str | None = None


class UpdateWebhookEndpointRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    url: WebhookUrl | None = None
    event_types: list[str] | None = None
    name: Annotated[str, Meta(max_length=256)] | None = None


class RotateSecretRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    keep_old_secret_active_for_24_hours: bool = False


class WebhookEndpointList(msgspec.Struct, kw_only=True):
    data: list[WebhookEndpoint]
    first_id: str | None
    last_id: str | None
    has_more: bool
    object: Literal["list"] = "list"


class DeletedWebhookEndpoint(msgspec.Struct, kw_only=True):
    id: str
    deleted: bool = True
    object: Literal["webhook_endpoint.deleted"] = "webhook_endpoint.deleted"


# Deliveries (jetbatch extension): one per (event, destination), with every attempt ----------


class WebhookAttempt(msgspec.Struct, kw_only=True, omit_defaults=False):
    attempt: int  # 1-based, over the delivery's whole life (re-sends included)
    started_at: float  # unix seconds
    status_code: int | None = None  # the receiver's answer; None when there was none
    error: str | None = None  # None for a 2xx
    latency_ms: int | None = None  # None while in flight or when interrupted


class WebhookDelivery(msgspec.Struct, kw_only=True, omit_defaults=False):
    id: str  # whd_...
    event_id: str
    event_type: str
    batch_id: str
    endpoint_id: str | None  # None: the batch's own metadata.webhook_url
    url: str
    status: DeliveryStatus
    attempts: int
    created_at: int
    next_attempt_at: float | None = None  # while pending
    delivered_at: int | None = None
    dead_at: int | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    attempt_log: list[WebhookAttempt] | None = None  # on retrieve only
    object: Literal["webhook_delivery"] = "webhook_delivery"


class WebhookDeliveryList(msgspec.Struct, kw_only=True):
    data: list[WebhookDelivery]
    first_id: str | None
    last_id: str | None
    has_more: bool
    object: Literal["list"] = "list"
