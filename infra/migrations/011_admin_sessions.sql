-- Admin page sessions (services/api/sessions.py; README: Admin page). The browser holds only a
-- random token in an HttpOnly, SameSite=Strict cookie; this table holds its SHA-256, the admin key
-- it was opened with and its CSRF token. Every request looks the key up again, so a revoked or
-- deleted key ends its sessions at once, on every api replica.
CREATE TABLE admin_sessions (
    id              bytea PRIMARY KEY,                  -- SHA-256 of the cookie's token
    key_id          text REFERENCES api_keys (id) ON DELETE CASCADE,  -- NULL: JETBATCH_API_KEY
    env_key_hash    bytea,                              -- that key's SHA-256 (key_id NULL only)
    csrf_token      text NOT NULL,
    created_at      bigint NOT NULL,
    expires_at      bigint NOT NULL,
    CHECK ((key_id IS NULL) = (env_key_hash IS NOT NULL))
);
CREATE INDEX admin_sessions_expiry ON admin_sessions (expires_at);
