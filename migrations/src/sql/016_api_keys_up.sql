-- One row per API key of an agent or a generator (issue 13): the public prefix that finds
-- the row, the SHA-256 of the whole key, the scopes it may call, when it was issued, when it
-- expires, when it was last used (written at most once a minute) and when it was revoked.
-- A `revoked_at` in the future means "valid until then": that is how the previous key stays
-- valid for `keyPolicy.overlap` after a rotation.
--
-- The key columns of `agents` (pak_prefix, pak_hash) and `generators` (api_key_hash) are
-- dropped: a second place holding a hash that nothing checks any more is a trap (a reader
-- trusting it would accept a revoked or expired key). Agent keys move here, valid for 90
-- days from now (the default key lifetime), so every running agent keeps working and
-- rotates in time. Generator keys are not moved: only their hash was stored, without the
-- prefix a lookup needs, and no API accepted them yet; the operator issues each Generator a
-- new key into its Secret on its next reconcile. The down puts the newest valid key of each
-- agent and generator back into the old columns.

CREATE TABLE api_keys (
    id           UUID PRIMARY KEY,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The owner: exactly one of agent_id and generator_id.
    agent_id     UUID REFERENCES agents (id) ON DELETE CASCADE,
    generator_id UUID REFERENCES generators (id) ON DELETE CASCADE,
    -- The public part of the key (`brokkr_<prefix>_<secret>`), unique among all keys.
    prefix       VARCHAR(32) NOT NULL,
    -- Hex SHA-256 of the whole key; the key itself is never stored.
    key_hash     TEXT NOT NULL,
    -- What the key may call, space-separated as OAuth writes scopes: `agent` (the agent
    -- API), `generator` (the generator API).
    scopes       TEXT NOT NULL,
    expires_at   TIMESTAMPTZ NOT NULL,
    last_used_at TIMESTAMPTZ,
    revoked_at   TIMESTAMPTZ,
    CONSTRAINT api_keys_one_owner CHECK ((agent_id IS NULL) <> (generator_id IS NULL)),
    CONSTRAINT api_keys_known_scopes CHECK (scopes ~ '^(agent|generator)( (agent|generator))*$')
);

-- The API finds a key by its prefix with one probe of this index.
CREATE UNIQUE INDEX api_keys_prefix_key ON api_keys (prefix);
CREATE INDEX api_keys_agent_id_idx ON api_keys (agent_id) WHERE agent_id IS NOT NULL;
CREATE INDEX api_keys_generator_id_idx ON api_keys (generator_id) WHERE generator_id IS NOT NULL;
CREATE INDEX api_keys_expires_at_idx ON api_keys (expires_at);

-- brokkr_desired, payload `k:<owner id>`: a key was issued, revoked, re-dated or removed.
-- Every hub replica drops its cached entries of that owner, so a revocation takes effect
-- on all of them within a second. `last_used_at` updates do not notify.
CREATE FUNCTION notify_api_key_changed() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('brokkr_desired', 'k:' || COALESCE(OLD.agent_id, OLD.generator_id));
    ELSE
        PERFORM pg_notify('brokkr_desired', 'k:' || COALESCE(NEW.agent_id, NEW.generator_id));
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER notify_api_key_inserted
    AFTER INSERT ON api_keys
    FOR EACH ROW EXECUTE FUNCTION notify_api_key_changed();

CREATE TRIGGER notify_api_key_updated
    AFTER UPDATE OF revoked_at, expires_at, key_hash, scopes ON api_keys
    FOR EACH ROW
    WHEN (OLD.revoked_at IS DISTINCT FROM NEW.revoked_at
          OR OLD.expires_at IS DISTINCT FROM NEW.expires_at
          OR OLD.key_hash IS DISTINCT FROM NEW.key_hash
          OR OLD.scopes IS DISTINCT FROM NEW.scopes)
    EXECUTE FUNCTION notify_api_key_changed();

CREATE TRIGGER notify_api_key_deleted
    AFTER DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION notify_api_key_changed();

-- Agent keys move over; when a deleted and a live agent share a prefix, the live one's wins.
INSERT INTO api_keys (id, agent_id, prefix, key_hash, scopes, expires_at)
SELECT DISTINCT ON (pak_prefix)
       gen_random_uuid(), id, pak_prefix, pak_hash, 'agent', now() + interval '90 days'
FROM agents
WHERE pak_prefix IS NOT NULL AND pak_hash IS NOT NULL
ORDER BY pak_prefix, deleted_at NULLS FIRST, created_at DESC;

-- The access trigger of 011 watched the key columns; it now watches what is left
-- (suspension and deletion). Key changes notify from api_keys.
DROP TRIGGER notify_agent_access_updated ON agents;
CREATE TRIGGER notify_agent_access_updated
    AFTER UPDATE OF is_suspended, deleted_at ON agents
    FOR EACH ROW
    WHEN (OLD.is_suspended IS DISTINCT FROM NEW.is_suspended
          OR OLD.deleted_at IS DISTINCT FROM NEW.deleted_at)
    EXECUTE FUNCTION notify_agent_access_changed();

-- Their indexes (agents_pak_prefix_live_key, agents_pak_prefix_created_idx) go with them.
ALTER TABLE agents DROP COLUMN pak_prefix, DROP COLUMN pak_hash;
ALTER TABLE generators DROP COLUMN api_key_hash;
