-- The instant a `datetime` property's value names, for the read models' filters, sorts and
-- indexes (`db::read::filter::instant` says which values are instants and tests the same
-- pattern): a UTC timestamp, or NULL for any other text, never an error, so one odd value
-- cannot fail a query. IMMUTABLE, so that the btree of an `indexed` datetime property can be
-- built on it: a matching text carries its own offset, so the result depends on no setting.
CREATE OR REPLACE FUNCTION spiced_instant(value text) RETURNS timestamp
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
BEGIN
    IF value !~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]+)?([Zz]|[+-](0[0-9]|1[0-4]):[0-5][0-9])$' THEN
        RETURN NULL;
    END IF;
    -- An impossible day (02-30) or year 0000 fails the cast: not an instant either.
    RETURN upper(value)::timestamptz AT TIME ZONE 'UTC';
EXCEPTION WHEN others THEN
    RETURN NULL;
END
$$;
