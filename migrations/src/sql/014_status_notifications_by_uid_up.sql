-- brokkr_status names the Stack agents reported on by its resource's metadata.uid, not
-- by `<namespace>/<name>`: rows are keyed by uid going down, so they are coming back up,
-- and a Stack deleted and re-created under the same name is never refreshed for reports
-- on the old one. Stacks without a resource uid (none are written today) send nothing.
CREATE OR REPLACE FUNCTION notify_agent_events_inserted() RETURNS trigger AS $$
DECLARE
    changed uuid;
BEGIN
    FOR changed IN
        SELECT DISTINCT s.resource_uid
        FROM inserted e
        JOIN deployment_objects d ON d.id = e.deployment_object_id
        JOIN stacks s ON s.id = d.stack_id
        WHERE s.resource_uid IS NOT NULL
    LOOP
        PERFORM pg_notify('brokkr_status', changed::text);
    END LOOP;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
