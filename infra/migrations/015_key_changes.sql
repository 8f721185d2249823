-- API keys are cached by every api process (services/api/key_cache.py), so a request with a
-- project key does not query PostgreSQL each time. A change that can end a key's life (revoked,
-- expiry set, deleted; its project archived) notifies `jetbatch_keys` when its transaction
-- commits, whatever made it (the admin API of any api, `jetbatch keys revoke`, plain SQL), and
-- every api drops its cache at once. `last_used_at` updates notify nobody.
CREATE FUNCTION jetbatch_keys_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('jetbatch_keys', TG_TABLE_NAME);
    RETURN NULL;
END;
$$;
CREATE TRIGGER api_keys_changed
    AFTER UPDATE OF revoked_at, expires_at, hash, kind, project_id OR DELETE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION jetbatch_keys_changed();
CREATE TRIGGER projects_archived
    AFTER UPDATE OF archived_at OR DELETE ON projects
    FOR EACH STATEMENT EXECUTE FUNCTION jetbatch_keys_changed();
