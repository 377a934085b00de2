-- SQLite twin of migrations/postgres/0006_projection_failures.sql (see there for the why).
CREATE TABLE projection_failures (
    schema_name   TEXT    NOT NULL,
    event_id      TEXT    NOT NULL,
    position      INTEGER NOT NULL CHECK (position >= 1),
    aggregate_id  TEXT    NOT NULL,
    error         TEXT    NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 1,
    first_seen_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    last_seen_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (schema_name, event_id)
);
