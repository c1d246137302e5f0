-- Experiment for BENCHMARKS.md (not a migration): lets Store::find_agent_for_key,
-- which looks a key's prefix up among live and deleted agents ordered by created_at,
-- use an index instead of scanning the agents table on every authentication.
CREATE INDEX bench_agents_pak_prefix_idx ON agents (pak_prefix, created_at DESC);
