-- Idempotency keys (README: Idempotency): the first response to a `POST /v1/files` or
-- `POST /v1/batches` sent with an `Idempotency-Key` header, per project, so a retried request
-- (a client killed before it saved the answer, another api replica) gets that response again
-- instead of creating a second file or batch. `response_status` is NULL while the first request
-- is still running. Pruned by the watchdog 24 h after `created_at`.
CREATE TABLE idempotency_keys (
    project_id      text NOT NULL,
    key             text NOT NULL,
    route           text NOT NULL,
    request_hash    text,
    response_status integer,
    response_body   bytea,
    created_at      bigint NOT NULL,
    PRIMARY KEY (project_id, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

-- Each batch row's version, raised by every update: the id of the batch's progress events
-- (`GET /v1/batches/{id}/events`, resumed with Last-Event-ID), strictly increasing because
-- updates of one row are serialized by its lock.
ALTER TABLE batches ADD COLUMN version bigint NOT NULL DEFAULT 0;
CREATE FUNCTION batches_bump_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.version := OLD.version + 1;
    RETURN NEW;
END;
$$;
CREATE TRIGGER batches_version BEFORE UPDATE ON batches
    FOR EACH ROW EXECUTE FUNCTION batches_bump_version();
