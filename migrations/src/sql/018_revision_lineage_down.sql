-- The whole-row immutability check of 018's up guards 005's columns exactly as 005's
-- function did, so it stays; 005's down drops it.
ALTER TABLE deployment_objects
    DROP COLUMN parent_id,
    DROP COLUMN recorded_by;
