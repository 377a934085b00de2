-- The consumers' durable idempotency registry: one row per (handler, event), with a lease.
CREATE TABLE processed_events (
    handler         text        NOT NULL,
    event_id        uuid        NOT NULL,
    aggregate_id    text        NOT NULL,
    sequence_number bigint      NOT NULL,
    status          text        NOT NULL
        CHECK (status IN ('processing', 'done', 'failed', 'retrying', 'skipped_stale')),
    owner           text        NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT now(),
    heartbeat_at    timestamptz NOT NULL DEFAULT now(),
    processed_at    timestamptz,
    attempt_count   integer     NOT NULL DEFAULT 1,
    last_error      text,
    PRIMARY KEY (handler, event_id)
);
CREATE INDEX processed_events_aggregate ON processed_events (handler, aggregate_id, sequence_number);

-- Per handler and aggregate: the highest sequence applied, for ordering and gap detection.
CREATE TABLE handler_positions (
    handler      text   NOT NULL,
    aggregate_id text   NOT NULL,
    last_seq     bigint NOT NULL,
    PRIMARY KEY (handler, aggregate_id)
);
