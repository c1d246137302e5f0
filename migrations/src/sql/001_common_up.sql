-- Shared by every table that keeps `updated_at`.
CREATE FUNCTION update_timestamp() RETURNS trigger AS $$
BEGIN
    NEW.updated_at = now();
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

-- UUIDv7 (time-ordered) keys for rows the database writes itself, such as deletion
-- markers; PostgreSQL before 18 has no built-in for it.
CREATE FUNCTION uuid_generate_v7() RETURNS uuid AS $$
    SELECT encode(
        set_bit(
            set_bit(
                overlay(uuid_send(gen_random_uuid())
                        PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                        FROM 1 FOR 6),
                52, 1),
            53, 1),
        'hex')::uuid;
$$ LANGUAGE sql VOLATILE;
