CREATE TABLE generators (
    id             UUID PRIMARY KEY,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    deleted_at     TIMESTAMPTZ,
    name           VARCHAR(255) NOT NULL,
    description    TEXT,
    api_key_hash   TEXT,
    last_active_at TIMESTAMPTZ,
    is_active      BOOLEAN NOT NULL DEFAULT TRUE,
    -- metadata.uid of the Generator custom resource this row mirrors; a re-created
    -- resource with the same name gets a new row instead of adopting this one.
    resource_uid   UUID
);

CREATE UNIQUE INDEX generators_name_live_key ON generators (name) WHERE deleted_at IS NULL;
CREATE UNIQUE INDEX generators_resource_uid_live_key ON generators (resource_uid) WHERE deleted_at IS NULL;
CREATE INDEX generators_deleted_at_idx ON generators (deleted_at);

CREATE TRIGGER update_generators_timestamp
    BEFORE UPDATE ON generators
    FOR EACH ROW EXECUTE FUNCTION update_timestamp();

-- Soft-deleting a generator soft-deletes its stacks (whose own trigger writes their
-- deletion markers) and its remaining deployment objects. Deletion markers stay live:
-- they are how agents learn to remove what they applied.
CREATE FUNCTION cascade_soft_delete_generators() RETURNS trigger AS $$
BEGIN
    UPDATE stacks SET deleted_at = NEW.deleted_at
        WHERE generator_id = NEW.id AND deleted_at IS NULL;
    UPDATE deployment_objects SET deleted_at = NEW.deleted_at
        WHERE generator_id = NEW.id AND deleted_at IS NULL AND NOT is_deletion_marker;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER cascade_soft_delete_generators
    AFTER UPDATE OF deleted_at ON generators
    FOR EACH ROW
    WHEN (OLD.deleted_at IS NULL AND NEW.deleted_at IS NOT NULL)
    EXECUTE FUNCTION cascade_soft_delete_generators();

-- Hard-deleting a generator removes everything it created; the stacks' own hard-delete
-- trigger takes their targets, events and deployment objects with them.
CREATE FUNCTION handle_generator_hard_delete() RETURNS trigger AS $$
BEGIN
    DELETE FROM stacks WHERE generator_id = OLD.id;
    DELETE FROM agent_events WHERE deployment_object_id IN
        (SELECT id FROM deployment_objects WHERE generator_id = OLD.id);
    DELETE FROM deployment_objects WHERE generator_id = OLD.id;
    RETURN OLD;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER trigger_generator_hard_delete
    BEFORE DELETE ON generators
    FOR EACH ROW EXECUTE FUNCTION handle_generator_hard_delete();
