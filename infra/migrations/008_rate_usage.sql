-- What each project used of its per-model request and token rate limits (README: Limits), per
-- fixed window (`m`: the minute, `d`: the day, by its start in unix seconds). Shared by every api
-- replica; only projects with a limit for a model write rows, and the watchdog deletes windows
-- older than two days.
CREATE TABLE rate_usage (
    project_id    text NOT NULL,
    model         text NOT NULL,
    window_kind   char(1) NOT NULL CHECK (window_kind IN ('m', 'd')),
    window_start  bigint NOT NULL,
    requests      integer NOT NULL DEFAULT 0,
    tokens        bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (project_id, model, window_kind, window_start)
);
CREATE INDEX rate_usage_window ON rate_usage (window_start);
