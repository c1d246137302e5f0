DROP FUNCTION IF EXISTS update_timestamp();
DROP FUNCTION IF EXISTS uuid_generate_v7();
