DROP INDEX IF EXISTS agents_pak_prefix_created_idx;
