-- A generator's suspension or deletion changes what its key may do, on every hub replica
-- at once: `k:<generator id>` on brokkr_desired, as for agents (011), so each replica
-- drops the generator's cached key entry. The function of 011 sends `k:<row id>`.
CREATE TRIGGER notify_generator_access_updated
    AFTER UPDATE OF is_active, deleted_at ON generators
    FOR EACH ROW
    WHEN (OLD.is_active IS DISTINCT FROM NEW.is_active
          OR OLD.deleted_at IS DISTINCT FROM NEW.deleted_at)
    EXECUTE FUNCTION notify_agent_access_changed();

CREATE TRIGGER notify_generator_access_deleted
    AFTER DELETE ON generators
    FOR EACH ROW
    EXECUTE FUNCTION notify_agent_access_changed();
