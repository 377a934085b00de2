-- Events a read-model schema could not apply because the read store refused their content
-- (a NUL in text or jsonb, a row over a size limit, a constraint): set aside so that the
-- projection goes on with the events after them, instead of retrying one event for ever.
-- Such an event is missing from that schema's read models until `spiced project failures
-- retry` applies it again (from the log, which keeps it) and deletes its row.
-- schema_name is the read-model schema (`spiced_read` is the live one); a rebuild records its
-- own under its target's name, and the swap exchanges the names here as it does the schemas.
CREATE TABLE projection_failures (
    schema_name   text        NOT NULL,
    event_id      uuid        NOT NULL,
    position      bigint      NOT NULL CHECK (position >= 1),
    aggregate_id  text        NOT NULL,
    error         text        NOT NULL,
    attempts      integer     NOT NULL DEFAULT 1,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schema_name, event_id)
);
