-- What synchronous requests used (README: Usage and costs), per project, model, key, endpoint
-- and minute: the api adds up its answers in memory and upserts them every few seconds
-- (services/api/sync_usage.py). Read by the usage and costs API as `batch = false`.
CREATE TABLE sync_usage_minutes (
    project_id      text NOT NULL,
    model           text NOT NULL,
    api_key_id      text NOT NULL DEFAULT '',   -- '' = JETBATCH_API_KEY, or no auth
    endpoint        text NOT NULL,
    minute          bigint NOT NULL,            -- unix seconds at the start of the minute
    requests        integer NOT NULL DEFAULT 0, -- answered successfully
    failed          integer NOT NULL DEFAULT 0,
    input_tokens    bigint NOT NULL DEFAULT 0,
    cached_tokens   bigint NOT NULL DEFAULT 0,
    output_tokens   bigint NOT NULL DEFAULT 0,
    gpu_ms          bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (project_id, model, api_key_id, endpoint, minute)
);
CREATE INDEX sync_usage_minutes_minute ON sync_usage_minutes (minute);
