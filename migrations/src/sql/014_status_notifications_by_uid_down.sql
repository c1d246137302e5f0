CREATE OR REPLACE FUNCTION notify_agent_events_inserted() RETURNS trigger AS $$
DECLARE
    changed text;
BEGIN
    FOR changed IN
        SELECT DISTINCT s.name
        FROM inserted e
        JOIN deployment_objects d ON d.id = e.deployment_object_id
        JOIN stacks s ON s.id = d.stack_id
    LOOP
        PERFORM pg_notify('brokkr_status', changed);
    END LOOP;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
