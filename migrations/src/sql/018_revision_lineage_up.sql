-- Revisions form a tree: each deployment object knows the revision that was being
-- delivered when it was recorded (`parent_id`), and who changed the content
-- (`recorded_by`, the Stack's field manager). Both are history, so the immutability
-- trigger guards them like the content. No foreign key: objects are only ever deleted
-- with their whole stack, and an ON DELETE action would be an UPDATE the trigger refuses.
ALTER TABLE deployment_objects
    ADD COLUMN parent_id UUID,
    ADD COLUMN recorded_by VARCHAR(255);

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
        OR NEW.parent_id IS DISTINCT FROM OLD.parent_id
        OR NEW.recorded_by IS DISTINCT FROM OLD.recorded_by
    THEN
        RAISE EXCEPTION 'deployment object % is immutable: only deleted_at may change', OLD.id
            USING ERRCODE = 'BR001';
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
