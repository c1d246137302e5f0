-- Deletion markers without the policy line, as in 004_stacks.
CREATE OR REPLACE FUNCTION handle_stack_soft_delete() RETURNS trigger AS $$
BEGIN
    UPDATE deployment_objects SET deleted_at = NEW.deleted_at
        WHERE stack_id = NEW.id AND deleted_at IS NULL;
    INSERT INTO deployment_objects
        (id, stack_id, yaml_content, yaml_checksum, submitted_at, is_deletion_marker, generator_id)
        VALUES (uuid_generate_v7(), NEW.id, '', md5(''), now(), TRUE, NEW.generator_id);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
