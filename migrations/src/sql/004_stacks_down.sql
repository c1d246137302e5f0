DROP TABLE IF EXISTS stacks;
DROP FUNCTION IF EXISTS handle_stack_soft_delete();
DROP FUNCTION IF EXISTS handle_stack_hard_delete();
