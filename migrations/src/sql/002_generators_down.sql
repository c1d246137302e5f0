DROP TABLE IF EXISTS generators;
DROP FUNCTION IF EXISTS cascade_soft_delete_generators();
DROP FUNCTION IF EXISTS handle_generator_hard_delete();
