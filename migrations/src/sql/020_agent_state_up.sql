-- What an agent reports about itself beyond being alive (issue 16): `status` may be
-- 'Error' (heartbeats arrive, but the agent reports it cannot do its job on the spoke),
-- `state_message` holds the agent's reason while it is, and `state_since` is when the
-- current status began (for alert timing).
-- `status` is a free VARCHAR(50) (no CHECK constraint or enum), so 'Error' needs no
-- schema change of its own.
ALTER TABLE agents
    ADD COLUMN state_message TEXT,
    ADD COLUMN state_since TIMESTAMPTZ;

-- brokkr_agents also fires when the agent's reason changes while it stays in Error, so
-- its Agent resource shows the current reason at once.
DROP TRIGGER notify_agent_status_changed ON agents;
CREATE TRIGGER notify_agent_status_changed
    AFTER UPDATE OF status, state_message ON agents
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          OR OLD.state_message IS DISTINCT FROM NEW.state_message)
    EXECUTE FUNCTION notify_agent_status_changed();
