CREATE TABLE stacks (
    id           UUID PRIMARY KEY,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    deleted_at   TIMESTAMPTZ,
    name         VARCHAR(255) NOT NULL,
    description  TEXT,
    generator_id UUID NOT NULL REFERENCES generators (id),
    resource_uid UUID
);

CREATE UNIQUE INDEX stacks_name_live_key ON stacks (name) WHERE deleted_at IS NULL;
CREATE UNIQUE INDEX stacks_resource_uid_live_key ON stacks (resource_uid) WHERE deleted_at IS NULL;
CREATE INDEX stacks_generator_id_idx ON stacks (generator_id);
CREATE INDEX stacks_deleted_at_idx ON stacks (deleted_at);

CREATE TRIGGER update_stack_timestamp
    BEFORE UPDATE ON stacks
    FOR EACH ROW EXECUTE FUNCTION update_timestamp();

-- Soft-deleting a stack retires its deployment objects and appends a deletion marker,
-- which is how agents learn to remove what they applied.
CREATE FUNCTION handle_stack_soft_delete() RETURNS trigger AS $$
BEGIN
    UPDATE deployment_objects SET deleted_at = NEW.deleted_at
        WHERE stack_id = NEW.id AND deleted_at IS NULL;
    INSERT INTO deployment_objects
        (id, stack_id, yaml_content, yaml_checksum, submitted_at, is_deletion_marker, generator_id)
        VALUES (uuid_generate_v7(), NEW.id, '', md5(''), now(), TRUE, NEW.generator_id);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER trigger_handle_stack_soft_delete
    AFTER UPDATE OF deleted_at ON stacks
    FOR EACH ROW
    WHEN (OLD.deleted_at IS NULL AND NEW.deleted_at IS NOT NULL)
    EXECUTE FUNCTION handle_stack_soft_delete();

CREATE FUNCTION handle_stack_hard_delete() RETURNS trigger AS $$
BEGIN
    DELETE FROM agent_targets WHERE stack_id = OLD.id;
    DELETE FROM agent_events WHERE deployment_object_id IN
        (SELECT id FROM deployment_objects WHERE stack_id = OLD.id);
    DELETE FROM deployment_objects WHERE stack_id = OLD.id;
    RETURN OLD;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER trigger_stack_hard_delete
    BEFORE DELETE ON stacks
    FOR EACH ROW EXECUTE FUNCTION handle_stack_hard_delete();
