-- Retention (README: Retention): a finished batch's per-line rows are folded into usage per
-- minute and deleted; expired files are deleted by the watchdog.

-- What a finished batch used, per model and minute, once its request_results rows are gone.
-- Written in the transaction that deletes those rows (shared/domain/retention.py).
CREATE TABLE usage_minutes (
    batch_id        text NOT NULL,
    model           text NOT NULL,              -- the batch's model ('' if it never had one)
    minute          bigint NOT NULL,            -- unix seconds at the start of the minute
    requests        integer NOT NULL,           -- lines that finished in that minute
    failed          integer NOT NULL,           -- of those, the error file's lines
    input_tokens    bigint NOT NULL,
    cached_tokens   bigint NOT NULL,
    output_tokens   bigint NOT NULL,
    PRIMARY KEY (batch_id, model, minute)
);
CREATE INDEX usage_minutes_minute ON usage_minutes (minute);

-- When a line finished (the result's finished_at_ms, else when it was written), unix seconds.
-- NULL on rows written before this migration: they count in the minute their batch ended.
ALTER TABLE request_results ADD COLUMN finished_at bigint;

-- Set once the batch's request_results rows are folded into usage_minutes and deleted. Existing
-- finished batches start without it: the watchdog's pruning catches up on them, a few per round
-- (an upgrade does not wait for a big table to be rewritten inside this migration).
ALTER TABLE batches ADD COLUMN results_pruned_at bigint;
CREATE INDEX batches_unpruned ON batches (id) WHERE results_pruned_at IS NULL;

-- A file's batches, looked up when the file is deleted (in use? whose copies go with it?).
CREATE INDEX batches_input_file ON batches (input_file_id);
CREATE INDEX batches_output_file ON batches (output_file_id) WHERE output_file_id IS NOT NULL;
CREATE INDEX batches_error_file ON batches (error_file_id) WHERE error_file_id IS NOT NULL;

-- What the watchdog's file expiry scans every round.
CREATE INDEX files_expiry ON files (expires_at) WHERE deleted_at IS NULL AND expires_at IS NOT NULL;
