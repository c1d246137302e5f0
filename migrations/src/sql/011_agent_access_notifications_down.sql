DROP TRIGGER IF EXISTS notify_agent_access_deleted ON agents;
DROP TRIGGER IF EXISTS notify_agent_access_updated ON agents;
DROP FUNCTION IF EXISTS notify_agent_access_changed();
