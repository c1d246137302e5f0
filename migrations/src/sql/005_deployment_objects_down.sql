DROP TABLE IF EXISTS deployment_objects;
DROP FUNCTION IF EXISTS prevent_deployment_object_changes();
