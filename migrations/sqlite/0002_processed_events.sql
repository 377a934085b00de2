-- SQLite twin of migrations/postgres/0002_processed_events.sql.
CREATE TABLE processed_events (
    handler         TEXT    NOT NULL,
    event_id        TEXT    NOT NULL,
    aggregate_id    TEXT    NOT NULL,
    sequence_number INTEGER NOT NULL,
    status          TEXT    NOT NULL
        CHECK (status IN ('processing', 'done', 'failed', 'retrying', 'skipped_stale')),
    owner           TEXT    NOT NULL,
    started_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    heartbeat_at    TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    processed_at    TEXT,
    attempt_count   INTEGER NOT NULL DEFAULT 1,
    last_error      TEXT,
    PRIMARY KEY (handler, event_id)
);
CREATE INDEX processed_events_aggregate ON processed_events (handler, aggregate_id, sequence_number);

CREATE TABLE handler_positions (
    handler      TEXT    NOT NULL,
    aggregate_id TEXT    NOT NULL,
    last_seq     INTEGER NOT NULL,
    PRIMARY KEY (handler, aggregate_id)
);
