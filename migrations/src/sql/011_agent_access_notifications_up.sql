-- brokkr_desired, payload `k:<agent id>`: an agent's key, suspension or deletion
-- changed. Hub replicas cache authentication for minutes and drop the agent's entry
-- when this arrives, so a suspended agent or a rotated key is refused at once.

CREATE FUNCTION notify_agent_access_changed() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('brokkr_desired', 'k:' || OLD.id);
    ELSE
        PERFORM pg_notify('brokkr_desired', 'k:' || NEW.id);
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER notify_agent_access_updated
    AFTER UPDATE OF pak_hash, pak_prefix, is_suspended, deleted_at ON agents
    FOR EACH ROW
    WHEN (OLD.pak_hash IS DISTINCT FROM NEW.pak_hash
          OR OLD.pak_prefix IS DISTINCT FROM NEW.pak_prefix
          OR OLD.is_suspended IS DISTINCT FROM NEW.is_suspended
          OR OLD.deleted_at IS DISTINCT FROM NEW.deleted_at)
    EXECUTE FUNCTION notify_agent_access_changed();

CREATE TRIGGER notify_agent_access_deleted
    AFTER DELETE ON agents
    FOR EACH ROW
    EXECUTE FUNCTION notify_agent_access_changed();
