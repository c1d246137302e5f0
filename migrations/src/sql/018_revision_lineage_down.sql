CREATE OR REPLACE FUNCTION prevent_deployment_object_changes() RETURNS trigger AS $$
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

ALTER TABLE deployment_objects
    DROP COLUMN parent_id,
    DROP COLUMN recorded_by;
