DROP TABLE IF EXISTS agents;
DROP FUNCTION IF EXISTS cascade_soft_delete_agents();
DROP FUNCTION IF EXISTS handle_agent_hard_delete();
