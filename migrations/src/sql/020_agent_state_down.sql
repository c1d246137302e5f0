DROP TRIGGER notify_agent_status_changed ON agents;
CREATE TRIGGER notify_agent_status_changed
    AFTER UPDATE OF status ON agents
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION notify_agent_status_changed();

-- Before 020 an agent whose heartbeats arrive is Online, whatever it reports.
UPDATE agents SET status = 'Online' WHERE status = 'Error';

ALTER TABLE agents
    DROP COLUMN state_since,
    DROP COLUMN state_message;
