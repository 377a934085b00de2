-- SQLite twin of migrations/postgres/0001_log_index.sql (see there for the why).
CREATE TABLE log_head (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    position INTEGER NOT NULL CHECK (position >= 0)
);
INSERT INTO log_head (id, position) VALUES (1, 0);

CREATE TABLE aggregate_versions (
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    last_seq       INTEGER NOT NULL CHECK (last_seq >= 0),
    PRIMARY KEY (aggregate_type, aggregate_id)
);

CREATE TABLE log_index (
    event_id       TEXT    PRIMARY KEY,
    command_id     TEXT    NOT NULL,
    fingerprint    TEXT    NOT NULL,
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    kind           TEXT    NOT NULL CHECK (kind IN ('command', 'domain')),
    seq            INTEGER NOT NULL CHECK (seq >= 1),
    position       INTEGER NOT NULL CHECK (position >= 1),
    UNIQUE (aggregate_type, aggregate_id, kind, seq)
);
CREATE INDEX log_index_command ON log_index (command_id);
CREATE INDEX log_index_position ON log_index (position);
