DROP TABLE IF EXISTS agent_targets;
