CREATE TABLE deployment_objects (
    id                 UUID PRIMARY KEY,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    deleted_at         TIMESTAMPTZ,
    sequence_id        BIGSERIAL NOT NULL UNIQUE,
    stack_id           UUID NOT NULL REFERENCES stacks (id),
    yaml_content       TEXT NOT NULL,
    yaml_checksum      TEXT NOT NULL,
    submitted_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    is_deletion_marker BOOLEAN NOT NULL DEFAULT FALSE,
    generator_id       UUID NOT NULL REFERENCES generators (id)
);

CREATE INDEX deployment_objects_stack_id_idx ON deployment_objects (stack_id);
CREATE INDEX deployment_objects_generator_id_idx ON deployment_objects (generator_id);
CREATE INDEX deployment_objects_deleted_at_idx ON deployment_objects (deleted_at);
-- The current desired state of a stack: its newest live deployment object.
CREATE INDEX deployment_objects_stack_latest_live_idx
    ON deployment_objects (stack_id, sequence_id DESC) WHERE deleted_at IS NULL;

CREATE TRIGGER update_deployment_object_timestamp
    BEFORE UPDATE ON deployment_objects
    FOR EACH ROW EXECUTE FUNCTION update_timestamp();

-- A deployment object is history: once written, only its soft deletion may change it
-- (deletion markers excepted).
CREATE FUNCTION prevent_deployment_object_changes() RETURNS trigger AS $$
BEGIN
    IF OLD.is_deletion_marker THEN
        RETURN NEW;
    END IF;
    IF NEW.id IS DISTINCT FROM OLD.id
        OR NEW.created_at IS DISTINCT FROM OLD.created_at
        OR NEW.sequence_id IS DISTINCT FROM OLD.sequence_id
        OR NEW.stack_id IS DISTINCT FROM OLD.stack_id
        OR NEW.yaml_content IS DISTINCT FROM OLD.yaml_content
        OR NEW.yaml_checksum IS DISTINCT FROM OLD.yaml_checksum
        OR NEW.submitted_at IS DISTINCT FROM OLD.submitted_at
        OR NEW.is_deletion_marker IS DISTINCT FROM OLD.is_deletion_marker
        OR NEW.generator_id IS DISTINCT FROM OLD.generator_id
    THEN
        RAISE EXCEPTION 'deployment object % is immutable: only deleted_at may change', OLD.id
            USING ERRCODE = 'BR001';
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER prevent_deployment_object_update
    BEFORE UPDATE ON deployment_objects
    FOR EACH ROW EXECUTE FUNCTION prevent_deployment_object_changes();
