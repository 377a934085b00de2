-- SQLite twin of migrations/postgres/0003_relay.sql. The relay itself needs PostgreSQL; the
-- table exists here so both schemas stay the same shape.
CREATE TABLE relay_state (
    name        TEXT    PRIMARY KEY,
    position    INTEGER NOT NULL DEFAULT 0 CHECK (position >= 0),
    epoch       INTEGER NOT NULL DEFAULT 0,
    leader      TEXT,
    lease_until TEXT,
    updated_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
