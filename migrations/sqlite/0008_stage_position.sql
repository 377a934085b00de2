-- The log position each stage last reported having reached (see the PostgreSQL migration).
ALTER TABLE stage_liveness ADD COLUMN position INTEGER;
