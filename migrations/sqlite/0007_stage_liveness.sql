-- What each running stage of each process last said about its liveness, for `spiced status`
-- (see the PostgreSQL migration). Times are RFC 3339 text in UTC.
CREATE TABLE stage_liveness (
    stage         TEXT    NOT NULL,
    instance      TEXT    NOT NULL,
    progressed_at TEXT    NOT NULL,
    work_waiting  INTEGER NOT NULL,
    stalled       INTEGER NOT NULL,
    last_error    TEXT,
    reported_at   TEXT    NOT NULL,
    PRIMARY KEY (stage, instance)
);
