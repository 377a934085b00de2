-- The write side's index of the event log: the head position, each aggregate's sequence, and
-- where every event is. Every row can be rebuilt from the log (`spiced verify` compares them).

-- One row: the last log position recorded. Its row lock serialises writers of every process
-- for the duration of one segment write, which makes log order equal sequence order.
CREATE TABLE log_head (
    id       smallint PRIMARY KEY CHECK (id = 1),
    position bigint   NOT NULL CHECK (position >= 0)
);
INSERT INTO log_head (id, position) VALUES (1, 0);

-- Per aggregate: the count of accepted commands, i.e. the number a client sends as
-- expected_seq next.
CREATE TABLE aggregate_versions (
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    last_seq       bigint NOT NULL CHECK (last_seq >= 0),
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- Where each event is in the log. The primary key makes an event_id stored once; the unique
-- key makes (aggregate, kind, sequence) taken once.
CREATE TABLE log_index (
    event_id       uuid   PRIMARY KEY,
    command_id     uuid   NOT NULL,
    fingerprint    text   NOT NULL,
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    kind           text   NOT NULL CHECK (kind IN ('command', 'domain')),
    seq            bigint NOT NULL CHECK (seq >= 1),
    position       bigint NOT NULL CHECK (position >= 1),
    UNIQUE (aggregate_type, aggregate_id, kind, seq)
);
CREATE INDEX log_index_command ON log_index (command_id);
CREATE INDEX log_index_position ON log_index (position);
