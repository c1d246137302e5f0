-- A deletion marker carries the agents' policy line of the stack's last content (the
-- first line `# brokkr.io/policy: {...}` of its YAML, see brokkr_crds::policy), so that an
-- agent removing the stack follows the stack's last deletionPolicy (e.g. Orphan) even when
-- it never saw the last content. Stacks without a policy line get an empty marker as before.
CREATE OR REPLACE FUNCTION handle_stack_soft_delete() RETURNS trigger AS $$
DECLARE
    first_line TEXT;
    policy TEXT := '';
BEGIN
    SELECT split_part(yaml_content, E'\n', 1) INTO first_line
        FROM deployment_objects
        WHERE stack_id = NEW.id AND deleted_at IS NULL AND NOT is_deletion_marker
        ORDER BY sequence_id DESC
        LIMIT 1;
    IF first_line LIKE '# brokkr.io/policy: %' THEN
        policy := first_line || E'\n';
    END IF;
    UPDATE deployment_objects SET deleted_at = NEW.deleted_at
        WHERE stack_id = NEW.id AND deleted_at IS NULL;
    INSERT INTO deployment_objects
        (id, stack_id, yaml_content, yaml_checksum, submitted_at, is_deletion_marker, generator_id)
        VALUES (uuid_generate_v7(), NEW.id, policy, md5(policy), now(), TRUE, NEW.generator_id);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
