CREATE TABLE agent_events (
    -- Made by the agent, so that a retried report is recognised and never duplicated.
    id                   UUID PRIMARY KEY,
    created_at           TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    updated_at           TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    deleted_at           TIMESTAMPTZ,
    agent_id             UUID NOT NULL REFERENCES agents (id),
    deployment_object_id UUID NOT NULL REFERENCES deployment_objects (id),
    event_type           VARCHAR(50) NOT NULL,
    status               VARCHAR(10) NOT NULL,
    message              TEXT
);

CREATE INDEX agent_events_agent_id_idx ON agent_events (agent_id);
CREATE INDEX agent_events_deployment_object_id_idx ON agent_events (deployment_object_id);
CREATE INDEX agent_events_deleted_at_idx ON agent_events (deleted_at);
-- Status: each agent's latest event for a stack's current deployment object.
CREATE INDEX agent_events_object_agent_latest_idx
    ON agent_events (deployment_object_id, agent_id, event_type, created_at DESC)
    WHERE deleted_at IS NULL;

CREATE TRIGGER update_agent_event_timestamp
    BEFORE UPDATE ON agent_events
    FOR EACH ROW EXECUTE FUNCTION update_timestamp();
