-- The read models move out of the registry's tables into a schema of their own (`spiced_read`;
-- on SQLite, tables named `spiced_read__*`), created right after the migrations with the same
-- DDL a rebuild uses for a fresh schema (src/db/read.rs). The old table held nothing the log
-- does not: the projection builds the new one from position 1.
DROP TABLE read_models;
DELETE FROM relay_state WHERE name = 'projection';
