DROP TRIGGER notify_removal_reported ON agent_events;
DROP FUNCTION notify_removal_reported();
