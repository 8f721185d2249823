-- Dead letters and the batch lifecycle's bookkeeping (README: Dead letters, Lifecycle).

-- Messages set aside because they could not be processed: a request that does not decode or
-- reached max deliveries (recorded by the watchdog), a result the results writer cannot store.
-- `payload` is the message exactly as it was on the bus; replay publishes it again.
CREATE TABLE dead_letters (
    id              bigserial PRIMARY KEY,
    created_at      bigint NOT NULL,
    source          text NOT NULL,      -- the stream it was read from: REQUESTS, RESULTS, CONTROL
    stream_seq      bigint,             -- its sequence in that stream, when known
    consumer        text,
    subject         text NOT NULL,
    headers         jsonb,
    payload         bytea NOT NULL,
    error           text NOT NULL,
    deliveries      integer NOT NULL DEFAULT 1,
    batch_id        text,
    custom_id       text,
    line            integer,
    replayed_at     bigint,
    replay_count    integer NOT NULL DEFAULT 0
);
-- One dead letter per stored message, however often its rejection is retried.
CREATE UNIQUE INDEX dead_letters_origin ON dead_letters (source, stream_seq)
    WHERE stream_seq IS NOT NULL;
CREATE INDEX dead_letters_created ON dead_letters (id DESC);
CREATE INDEX dead_letters_batch ON dead_letters (batch_id) WHERE batch_id IS NOT NULL;

ALTER TABLE batches
    -- 'expired': the watchdog found the batch past expires_at; its unfinished lines become
    -- batch_expired error lines and it finalizes to `expired` (not `completed`).
    ADD COLUMN ending           text,
    ADD COLUMN ending_at        bigint,
    -- every line of a cancelled or expired batch has a result row (real or an error line)
    ADD COLUMN closed_out_at    bigint,
    -- set by the watchdog while an open batch makes no progress (see updated_at)
    ADD COLUMN stalled_at       bigint;

-- What the watchdog scans every few seconds.
CREATE INDEX batches_expiry ON batches (expires_at) WHERE status = 'in_progress';
