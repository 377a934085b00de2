-- What each running stage (relay, worker role, projection) of each process last said about its
-- liveness, reported every few seconds, for `spiced status`. A row whose `reported_at` is old
-- belongs to a process that stopped reporting (stopped, frozen or cut off); a process that
-- stops cleanly deletes its rows. Nothing here is truth about the log: it can be dropped.
CREATE TABLE stage_liveness (
    stage         text        NOT NULL,
    instance      text        NOT NULL,
    progressed_at timestamptz NOT NULL,
    work_waiting  boolean     NOT NULL,
    stalled       boolean     NOT NULL,
    last_error    text,
    reported_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stage, instance)
);
