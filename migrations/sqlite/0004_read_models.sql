-- SQLite twin of migrations/postgres/0004_read_models.sql.
CREATE TABLE read_models (
    kind       TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    parent     TEXT    NOT NULL,
    state      TEXT,
    version    INTEGER NOT NULL,
    deleted    INTEGER NOT NULL DEFAULT 0,
    created_at TEXT    NOT NULL,
    updated_at TEXT    NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE INDEX read_models_page ON read_models (kind, parent, key) WHERE deleted = 0;
