-- The pipelined commit (docs/design.md, "Pipelined commit"): a writer reserves a position
-- under a short lock, writes its segment outside any lock, and publishes it (moves
-- `log_head`) in position order. Readers still see only `log_head`, `log_index` and
-- `aggregate_versions`, which publishing alone changes.

-- One row: the last position handed out. Its row lock serialises reservations; it is a row
-- apart from `log_head` so that publishing does not wait for a reservation in progress.
-- The next position is one past the greater of the two (a segment published without a
-- reservation, as the start-up repair does, moves only the head).
CREATE TABLE log_reserved (
    id       smallint PRIMARY KEY CHECK (id = 1),
    position bigint   NOT NULL CHECK (position >= 0)
);
INSERT INTO log_reserved (id, position) SELECT 1, position FROM log_head WHERE id = 1;

-- A position reserved and not published yet, with what its batch holds: a later batch defers
-- a command whose id or aggregate is here, so no aggregate is in two batches in flight. The
-- publish of the position deletes its row in the statement that moves the head; past
-- `expires_at` (server time) anyone may fill the position with a void segment.
CREATE TABLE log_reservations (
    position        bigint      PRIMARY KEY CHECK (position >= 1),
    owner           text        NOT NULL,
    expires_at      timestamptz NOT NULL,
    command_ids     uuid[]      NOT NULL,
    aggregate_types text[]      NOT NULL,
    aggregate_ids   text[]      NOT NULL
);
