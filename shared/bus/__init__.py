"""NATS JetStream plumbing: the connection and the streams (streams.py), the files bucket
(objects.py), the fast pull
(pull.py), the pipelined publisher (publish.py) and group commit of publish-then-ack
(ack_after_publish.py). Consumers are declared and run by shared.consumer."""

from shared.bus.ack_after_publish import AckAfterPublish
from shared.bus.objects import FileObjects, ObjectMissing, files_bucket
from shared.bus.publish import MSG_ID, YIELD_EVERY, Publisher, PublishError
from shared.bus.pull import FastPull, ack_all, delivery_count, durable_fast_pull
from shared.bus.streams import (
    CANCELLED_BUCKET,
    CANCELLED_TTL_S,
    CONTROL,
    DEADLETTERS,
    EVENTS,
    LOGS,
    REQUESTS,
    RESULTS,
    STREAMS,
    WORKER_CONTROL_BUCKET,
    WORKERS_BUCKET,
    WORKERS_TTL_S,
    Stream,
    cancelled_kv,
    connect,
    durable_consumer,
    ensure_streams,
    through_elections,
    wait_for_jetstream,
    worker_control_kv,
    workers_kv,
)

__all__ = [
    "CANCELLED_BUCKET",
    "CANCELLED_TTL_S",
    "CONTROL",
    "DEADLETTERS",
    "EVENTS",
    "LOGS",
    "MSG_ID",
    "REQUESTS",
    "RESULTS",
    "STREAMS",
    "WORKER_CONTROL_BUCKET",
    "WORKERS_BUCKET",
    "WORKERS_TTL_S",
    "YIELD_EVERY",
    "AckAfterPublish",
    "FileObjects",
    "ObjectMissing",
    "FastPull",
    "PublishError",
    "Publisher",
    "Stream",
    "ack_all",
    "cancelled_kv",
    "connect",
    "delivery_count",
    "durable_consumer",
    "durable_fast_pull",
    "ensure_streams",
    "files_bucket",
    "through_elections",
    "wait_for_jetstream",
    "worker_control_kv",
    "workers_kv",
]
