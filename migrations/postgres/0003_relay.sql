-- The relay's checkpoint and leader lease, one row per relay name.
-- `position` is the last log position whose every envelope Kafka acknowledged. `epoch` grows
-- with every change of leader; the checkpoint is only written by the current epoch's leader
-- while its lease holds, so two relays can never both advance it.
CREATE TABLE relay_state (
    name        text        PRIMARY KEY,
    position    bigint      NOT NULL DEFAULT 0 CHECK (position >= 0),
    epoch       bigint      NOT NULL DEFAULT 0,
    leader      text,
    lease_until timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
