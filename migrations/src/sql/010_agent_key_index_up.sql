-- The agent API finds a key's agent by its prefix among live and deleted agents (to tell
-- a deleted agent why it is refused); the live-only unique index cannot serve that.
CREATE INDEX agents_pak_prefix_created_idx ON agents (pak_prefix, created_at DESC);
