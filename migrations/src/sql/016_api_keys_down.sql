-- Puts the newest valid key of each agent and generator back into the columns 016 dropped,
-- with their indexes and the access trigger of 011 as they were.

ALTER TABLE agents ADD COLUMN pak_hash TEXT, ADD COLUMN pak_prefix VARCHAR(32);
ALTER TABLE generators ADD COLUMN api_key_hash TEXT;

UPDATE agents a SET pak_prefix = k.prefix, pak_hash = k.key_hash
FROM (
    SELECT DISTINCT ON (agent_id) agent_id, prefix, key_hash
    FROM api_keys
    WHERE agent_id IS NOT NULL AND (revoked_at IS NULL OR revoked_at > now())
    ORDER BY agent_id, (expires_at > now()) DESC, created_at DESC
) k
WHERE a.id = k.agent_id;

UPDATE generators g SET api_key_hash = k.key_hash
FROM (
    SELECT DISTINCT ON (generator_id) generator_id, key_hash
    FROM api_keys
    WHERE generator_id IS NOT NULL AND (revoked_at IS NULL OR revoked_at > now())
    ORDER BY generator_id, (expires_at > now()) DESC, created_at DESC
) k
WHERE g.id = k.generator_id;

CREATE UNIQUE INDEX agents_pak_prefix_live_key ON agents (pak_prefix) WHERE deleted_at IS NULL;
CREATE INDEX agents_pak_prefix_created_idx ON agents (pak_prefix, created_at DESC);

DROP TRIGGER notify_agent_access_updated ON agents;
CREATE TRIGGER notify_agent_access_updated
    AFTER UPDATE OF pak_hash, pak_prefix, is_suspended, deleted_at ON agents
    FOR EACH ROW
    WHEN (OLD.pak_hash IS DISTINCT FROM NEW.pak_hash
          OR OLD.pak_prefix IS DISTINCT FROM NEW.pak_prefix
          OR OLD.is_suspended IS DISTINCT FROM NEW.is_suspended
          OR OLD.deleted_at IS DISTINCT FROM NEW.deleted_at)
    EXECUTE FUNCTION notify_agent_access_changed();

DROP TABLE api_keys;
DROP FUNCTION notify_api_key_changed();
