CREATE TABLE agents (
    id             UUID PRIMARY KEY,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    deleted_at     TIMESTAMPTZ,
    name           VARCHAR(255) NOT NULL,
    cluster_name   VARCHAR(255) NOT NULL,
    last_heartbeat TIMESTAMPTZ,
    status         VARCHAR(50) NOT NULL DEFAULT 'Pending',
    pak_hash       TEXT,
    -- The public part of the agent's key (`brokkr_<prefix>_<secret>`): the API finds
    -- the row by prefix, then compares hashes in constant time.
    pak_prefix     VARCHAR(32),
    is_suspended   BOOLEAN NOT NULL DEFAULT FALSE,
    -- What the agent last reported about itself in a heartbeat.
    agent_version  VARCHAR(64),
    resource_uid   UUID
);

CREATE UNIQUE INDEX agents_name_cluster_live_key ON agents (name, cluster_name) WHERE deleted_at IS NULL;
CREATE UNIQUE INDEX agents_resource_uid_live_key ON agents (resource_uid) WHERE deleted_at IS NULL;
CREATE UNIQUE INDEX agents_pak_prefix_live_key ON agents (pak_prefix) WHERE deleted_at IS NULL;
CREATE INDEX agents_deleted_at_idx ON agents (deleted_at);
CREATE INDEX agents_status_idx ON agents (status);

CREATE TRIGGER update_agent_timestamp
    BEFORE UPDATE ON agents
    FOR EACH ROW EXECUTE FUNCTION update_timestamp();

CREATE FUNCTION cascade_soft_delete_agents() RETURNS trigger AS $$
BEGIN
    UPDATE agent_events SET deleted_at = NEW.deleted_at
        WHERE agent_id = NEW.id AND deleted_at IS NULL;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER cascade_soft_delete_agents
    AFTER UPDATE OF deleted_at ON agents
    FOR EACH ROW
    WHEN (OLD.deleted_at IS NULL AND NEW.deleted_at IS NOT NULL)
    EXECUTE FUNCTION cascade_soft_delete_agents();

CREATE FUNCTION handle_agent_hard_delete() RETURNS trigger AS $$
BEGIN
    DELETE FROM agent_targets WHERE agent_id = OLD.id;
    DELETE FROM agent_events WHERE agent_id = OLD.id;
    RETURN OLD;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER trigger_agent_hard_delete
    BEFORE DELETE ON agents
    FOR EACH ROW EXECUTE FUNCTION handle_agent_hard_delete();
