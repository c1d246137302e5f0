-- Wake-ups for the hub's long-polls and status mirror, on every hub replica.
--   brokkr_desired: an agent's desired state may have changed. Payload `s:<stack id>`
--                   when a stack gets a new deployment object (or deletion marker),
--                   `a:<agent id>` when an agent's targets change.
--   brokkr_status:  agents reported on a stack. Payload: the stack's name.
-- Statement-level triggers, so a batch of rows sends one notification per stack.

CREATE FUNCTION notify_deployment_objects_inserted() RETURNS trigger AS $$
DECLARE
    changed uuid;
BEGIN
    FOR changed IN SELECT DISTINCT stack_id FROM inserted LOOP
        PERFORM pg_notify('brokkr_desired', 's:' || changed);
    END LOOP;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER notify_deployment_objects_inserted
    AFTER INSERT ON deployment_objects
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION notify_deployment_objects_inserted();

CREATE FUNCTION notify_agent_targets_inserted() RETURNS trigger AS $$
DECLARE
    changed uuid;
BEGIN
    FOR changed IN SELECT DISTINCT agent_id FROM changed_rows LOOP
        PERFORM pg_notify('brokkr_desired', 'a:' || changed);
    END LOOP;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER notify_agent_targets_inserted
    AFTER INSERT ON agent_targets
    REFERENCING NEW TABLE AS changed_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notify_agent_targets_inserted();

CREATE TRIGGER notify_agent_targets_deleted
    AFTER DELETE ON agent_targets
    REFERENCING OLD TABLE AS changed_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notify_agent_targets_inserted();

CREATE FUNCTION notify_agent_events_inserted() RETURNS trigger AS $$
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

CREATE TRIGGER notify_agent_events_inserted
    AFTER INSERT ON agent_events
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION notify_agent_events_inserted();

--   brokkr_agents:  an agent went Online or Offline. Payload: the agent's name.
CREATE FUNCTION notify_agent_status_changed() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('brokkr_agents', NEW.name);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER notify_agent_status_changed
    AFTER UPDATE OF status ON agents
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION notify_agent_status_changed();
