-- Revisions form a tree: each deployment object knows the revision that was being
-- delivered when it was recorded (`parent_id`), and who changed the content
-- (`recorded_by`, the Stack's field manager). No foreign key: objects are only ever
-- deleted with their whole stack, and an ON DELETE action would be an UPDATE the
-- immutability trigger refuses.
ALTER TABLE deployment_objects
    ADD COLUMN parent_id UUID,
    ADD COLUMN recorded_by VARCHAR(255);

-- The immutability trigger of 005 listed the columns it guards, so every new column had to
-- be added to it by hand. It now compares whole rows: only deleted_at (and the
-- updated_at its own trigger sets) may change, whatever columns the table has.
CREATE OR REPLACE FUNCTION prevent_deployment_object_changes() RETURNS trigger AS $$
BEGIN
    IF OLD.is_deletion_marker THEN
        RETURN NEW;
    END IF;
    IF to_jsonb(NEW) - 'deleted_at' - 'updated_at'
        IS DISTINCT FROM to_jsonb(OLD) - 'deleted_at' - 'updated_at'
    THEN
        RAISE EXCEPTION 'deployment object % is immutable: only deleted_at may change', OLD.id
            USING ERRCODE = 'BR001';
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
