-- A deleted stack's deletion marker stays in each targeted agent's desired state until
-- that agent reports removing the stack (a `Delete` `Success` event for the marker).
-- When it does, its desired state changed: `a:<agent id>` on brokkr_desired, so every
-- replica drops the agent's cached view.
CREATE FUNCTION notify_removal_reported() RETURNS trigger AS $$
DECLARE
    changed uuid;
BEGIN
    FOR changed IN
        SELECT DISTINCT e.agent_id
        FROM inserted e
        JOIN deployment_objects d ON d.id = e.deployment_object_id
        WHERE e.event_type = 'Delete' AND e.status = 'Success' AND d.is_deletion_marker
    LOOP
        PERFORM pg_notify('brokkr_desired', 'a:' || changed);
    END LOOP;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER notify_removal_reported
    AFTER INSERT ON agent_events
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION notify_removal_reported();
