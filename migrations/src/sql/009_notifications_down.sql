DROP TRIGGER IF EXISTS notify_agent_status_changed ON agents;
DROP FUNCTION IF EXISTS notify_agent_status_changed();
DROP TRIGGER IF EXISTS notify_agent_events_inserted ON agent_events;
DROP FUNCTION IF EXISTS notify_agent_events_inserted();
DROP TRIGGER IF EXISTS notify_agent_targets_deleted ON agent_targets;
DROP TRIGGER IF EXISTS notify_agent_targets_inserted ON agent_targets;
DROP FUNCTION IF EXISTS notify_agent_targets_inserted();
DROP TRIGGER IF EXISTS notify_deployment_objects_inserted ON deployment_objects;
DROP FUNCTION IF EXISTS notify_deployment_objects_inserted();
