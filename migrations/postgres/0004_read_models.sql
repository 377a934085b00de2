-- Read models, maintained by `spiced project` from the outcome events in the log. Not the
-- registry: every row can be rebuilt from the log at any time.
-- kind: database | class | instance; key: the aggregate id; parent: what the row is listed
-- under ('' for databases, '{db}:{branch}' for classes, '{db}:{branch}:{class}' for instances).
CREATE TABLE read_models (
    kind       text        NOT NULL,
    key        text        NOT NULL,
    parent     text        NOT NULL,
    state      jsonb,
    version    bigint      NOT NULL,
    deleted    boolean     NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (kind, key)
);
-- Keyset pages: WHERE kind = ? AND parent = ? AND NOT deleted AND key > ? ORDER BY key.
CREATE INDEX read_models_page ON read_models (kind, parent, key) WHERE NOT deleted;
