-- Webhooks: operator-registered endpoints, one delivery per (event, destination), and every
-- attempt. Written by the webhook notifier and the api's /v1/webhook_* routes (README: Webhooks).

CREATE TABLE webhook_endpoints (
    id                      text PRIMARY KEY,          -- we_...
    seq                     bigint GENERATED ALWAYS AS IDENTITY UNIQUE,  -- listing order
    name                    text NOT NULL DEFAULT '',
    url                     text NOT NULL,
    secret                  text NOT NULL,             -- whsec_...
    -- after a rotation that keeps the old secret for a while: deliveries carry both signatures
    previous_secret         text,
    previous_secret_until   bigint,
    event_types             text[] NOT NULL,
    created_at              bigint NOT NULL,
    updated_at              bigint NOT NULL,
    deleted_at              bigint                     -- soft delete: deliveries keep their history
);
CREATE INDEX webhook_endpoints_live ON webhook_endpoints (seq DESC) WHERE deleted_at IS NULL;

-- One row per (event, destination): the notifier inserts it (idempotently) before acking the
-- event, then attempts it until delivered or dead. `destination` is the endpoint id, or
-- 'batch_url' for the batch's own metadata.webhook_url.
CREATE TABLE webhook_deliveries (
    id                  text PRIMARY KEY,              -- whd_..., stable from (event_id, destination)
    seq                 bigint GENERATED ALWAYS AS IDENTITY UNIQUE,  -- listing order
    event_id            text NOT NULL,
    event_type          text NOT NULL,
    batch_id            text NOT NULL,
    destination         text NOT NULL,
    endpoint_id         text REFERENCES webhook_endpoints (id),
    url                 text NOT NULL,
    host                text NOT NULL,                 -- host:port, for per-host concurrency
    payload             text NOT NULL,                 -- the exact body that is signed and sent
    status              text NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'delivered', 'dead', 'cancelled')),
    attempts            integer NOT NULL DEFAULT 0,    -- over the delivery's whole life
    -- the retry policy (max attempts, max age) counts from here; a re-send starts a new cycle
    cycle_attempts      integer NOT NULL DEFAULT 0,
    cycle_started_at    timestamptz NOT NULL,
    -- when the next attempt is due; while an attempt runs, the end of its lease (a notifier
    -- killed mid-attempt leaves the row to be picked up again once the lease is over)
    next_attempt_at     timestamptz NOT NULL,
    created_at          bigint NOT NULL,
    updated_at          bigint NOT NULL,
    delivered_at        bigint,
    dead_at             bigint,
    last_status_code    integer,
    last_error          text,
    UNIQUE (event_id, destination)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_batch ON webhook_deliveries (batch_id);
CREATE INDEX webhook_deliveries_by_status ON webhook_deliveries (status, seq DESC);
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id) WHERE status = 'pending';

CREATE TABLE webhook_attempts (
    delivery_id     text NOT NULL REFERENCES webhook_deliveries (id),
    attempt         integer NOT NULL,                  -- 1-based, = webhook_deliveries.attempts
    started_at      timestamptz NOT NULL,
    finished_at     timestamptz,                       -- NULL: in flight, or interrupted
    status_code     integer,
    error           text,
    latency_ms      integer,
    PRIMARY KEY (delivery_id, attempt)
);

-- The batch object's extra fields (schemas.openai.Batch), kept current by whoever changes a
-- delivery of the batch, in the same transaction.
ALTER TABLE batches
    ADD COLUMN webhook_status   text,
    ADD COLUMN webhook_attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN webhook_error    text;

-- Recomputes batches.webhook_* from the batches' deliveries. Called in the transaction that
-- changed them. Locks the batch rows first (in id order, so two callers cannot deadlock), then
-- aggregates in a fresh statement: under READ COMMITTED each statement of a volatile function
-- takes a new snapshot, so a caller that waited for the lock sees the other's committed changes.
CREATE FUNCTION jetbatch_refresh_batch_webhooks(batch_ids text[]) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM 1 FROM batches WHERE id = ANY(batch_ids) ORDER BY id FOR UPDATE;
    UPDATE batches b SET
        webhook_status = agg.status,
        webhook_attempts = agg.attempts,
        webhook_error = agg.error
    FROM (
        SELECT d.batch_id,
            CASE
                WHEN bool_or(d.status = 'pending') THEN 'pending'
                WHEN bool_or(d.status = 'dead') THEN 'failed'
                WHEN bool_or(d.status = 'delivered') THEN 'delivered'
            END AS status,
            sum(d.attempts)::integer AS attempts,
            (array_agg(d.last_error ORDER BY (d.status = 'dead') DESC, d.updated_at DESC)
                FILTER (WHERE d.status IN ('pending', 'dead') AND d.last_error IS NOT NULL))[1]
                AS error
        FROM webhook_deliveries d
        WHERE d.batch_id = ANY(batch_ids)
        GROUP BY d.batch_id
    ) agg
    WHERE b.id = agg.batch_id;
END
$$;
