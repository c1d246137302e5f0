DROP TABLE rollout_assignments;
DROP TRIGGER notify_stack_serving_changed ON stacks;
DROP FUNCTION notify_stack_serving_changed();
DROP TRIGGER stamp_stack_serving_change ON stacks;
DROP FUNCTION stamp_serving_change();
ALTER TABLE stacks
    DROP COLUMN pinned_object_id,
    DROP COLUMN progressive,
    DROP COLUMN serving_stamp;
