-- jetbatch schema v1. Applied by `jetbatch migrate` (idempotent; recorded in schema_migrations).

CREATE TABLE files (
    id              text PRIMARY KEY,
    bytes           bigint NOT NULL,
    created_at      bigint NOT NULL,
    expires_at      bigint,
    filename        text NOT NULL,
    purpose         text NOT NULL,
    status          text NOT NULL DEFAULT 'processed',
    status_details  text,
    -- where the bytes are, relative to the data dir's files/ folder
    storage_key     text NOT NULL,
    -- filled in while the upload streams through (batch input files only)
    line_count      integer,
    models          text[],
    deleted_at      bigint
);
CREATE INDEX files_created ON files (created_at DESC, id DESC) WHERE deleted_at IS NULL;

CREATE TABLE batches (
    id                  text PRIMARY KEY,
    endpoint            text NOT NULL,
    model               text,
    input_file_id       text NOT NULL,
    completion_window   text NOT NULL,
    status              text NOT NULL,
    errors              jsonb,
    output_file_id      text,
    error_file_id       text,
    created_at          bigint NOT NULL,
    in_progress_at      bigint,
    expires_at          bigint,
    finalizing_at       bigint,
    completed_at        bigint,
    failed_at           bigint,
    expired_at          bigint,
    cancelling_at       bigint,
    cancelled_at        bigint,
    total               integer NOT NULL DEFAULT 0,
    completed           integer NOT NULL DEFAULT 0,
    failed              integer NOT NULL DEFAULT 0,
    input_tokens        bigint NOT NULL DEFAULT 0,
    cached_tokens       bigint NOT NULL DEFAULT 0,
    output_tokens       bigint NOT NULL DEFAULT 0,
    metadata            jsonb,
    output_expires_after integer,
    -- set when every request message of the batch has been acknowledged by JetStream
    published_at        bigint,
    updated_at          bigint NOT NULL DEFAULT 0
);
CREATE INDEX batches_created ON batches (created_at DESC, id DESC);
CREATE INDEX batches_open ON batches (status) WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling');

-- One row per request line once it has an outcome. The primary key makes writes idempotent:
-- a redelivered result is a no-op.
CREATE TABLE request_results (
    batch_id        text NOT NULL,
    custom_id       text NOT NULL,
    line            integer NOT NULL,
    ok              boolean NOT NULL,
    status_code     integer NOT NULL,
    request_id      text NOT NULL,
    response_body   text,
    error_code      text,
    error_message   text,
    input_tokens    integer NOT NULL DEFAULT 0,
    cached_tokens   integer NOT NULL DEFAULT 0,
    output_tokens   integer NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, custom_id)
);
