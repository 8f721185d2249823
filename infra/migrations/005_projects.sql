-- Projects (tenants), their keys and limits (README: Projects and keys). Everything that existed
-- before belongs to the default project, 'proj_default' (schemas/projects.py DEFAULT_PROJECT_ID).

CREATE TABLE projects (
    id                  text PRIMARY KEY,               -- proj_...
    seq                 bigint GENERATED ALWAYS AS IDENTITY UNIQUE,  -- listing order
    name                text NOT NULL,
    created_at          bigint NOT NULL,
    archived_at         bigint,
    -- signs deliveries to its batches' metadata.webhook_url. NULL on the default project: the
    -- deployment's JETBATCH_WEBHOOK_SECRET signs them, until the secret is rotated here.
    webhook_secret      text,
    webhook_secret_updated_at bigint
);
INSERT INTO projects (id, name, created_at)
    VALUES ('proj_default', 'Default project', extract(epoch FROM now())::bigint);

CREATE TABLE service_accounts (
    id              text PRIMARY KEY,                   -- svc_acct_...
    seq             bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    project_id      text NOT NULL REFERENCES projects (id),
    name            text NOT NULL,
    role            text NOT NULL DEFAULT 'member',
    created_at      bigint NOT NULL,
    deleted_at      bigint
);
CREATE INDEX service_accounts_project ON service_accounts (project_id, seq DESC)
    WHERE deleted_at IS NULL;

-- Admin keys (project_id NULL) and project keys (owned by a service account). Only the SHA-256
-- of a key is stored; the key itself is shown once, when it is created. Looked up by hash on
-- every request, so a revoked key is refused on the next call by every api replica.
CREATE TABLE api_keys (
    id              text PRIMARY KEY,                   -- key_...
    seq             bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    kind            text NOT NULL CHECK (kind IN ('admin', 'project')),
    project_id      text REFERENCES projects (id),
    service_account_id text REFERENCES service_accounts (id),
    name            text NOT NULL DEFAULT '',
    hash            bytea NOT NULL UNIQUE,
    redacted_value  text NOT NULL,
    created_at      bigint NOT NULL,
    expires_at      bigint,
    last_used_at    bigint,
    revoked_at      bigint,
    CHECK ((kind = 'admin') = (project_id IS NULL))
);
CREATE INDEX api_keys_project ON api_keys (project_id, seq DESC) WHERE revoked_at IS NULL;

-- OpenAI's per-model rate limits of a project; a model without a row has the defaults.
CREATE TABLE project_rate_limits (
    project_id                      text NOT NULL REFERENCES projects (id),
    model                           text NOT NULL,
    max_requests_per_1_minute       integer,
    max_tokens_per_1_minute         integer,
    max_images_per_1_minute         integer,
    max_audio_megabytes_per_1_minute integer,
    max_requests_per_1_day          integer,
    batch_1_day_max_input_tokens    bigint,
    PRIMARY KEY (project_id, model)
);

-- Every file, batch, webhook endpoint, delivery, dead letter and usage row belongs to one
-- project; the rows already there to the default one.
ALTER TABLE files ADD COLUMN project_id text NOT NULL DEFAULT 'proj_default' REFERENCES projects (id);
ALTER TABLE batches ADD COLUMN project_id text NOT NULL DEFAULT 'proj_default' REFERENCES projects (id);
ALTER TABLE webhook_endpoints ADD COLUMN project_id text NOT NULL DEFAULT 'proj_default' REFERENCES projects (id);
ALTER TABLE webhook_deliveries ADD COLUMN project_id text NOT NULL DEFAULT 'proj_default' REFERENCES projects (id);
ALTER TABLE dead_letters ADD COLUMN project_id text NOT NULL DEFAULT 'proj_default' REFERENCES projects (id);
ALTER TABLE usage_minutes ADD COLUMN project_id text NOT NULL DEFAULT 'proj_default' REFERENCES projects (id);

-- A project's own lists (the admin's lists of all projects keep the indexes above).
CREATE INDEX files_project ON files (project_id, created_at DESC, id DESC) WHERE deleted_at IS NULL;
CREATE INDEX batches_project ON batches (project_id, created_at DESC, id DESC);
CREATE INDEX batches_project_open ON batches (project_id)
    WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling');
CREATE INDEX webhook_endpoints_project ON webhook_endpoints (project_id, seq DESC)
    WHERE deleted_at IS NULL;
CREATE INDEX webhook_deliveries_project ON webhook_deliveries (project_id, seq DESC);
