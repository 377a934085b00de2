-- The log position each stage last reported having reached (the relay: published; a worker
-- role: the last command it finished; the projection: applied), so `spiced status` and
-- `GET /api/v1/status` show every handler's clock. NULL for a stage that has none yet.
ALTER TABLE stage_liveness ADD COLUMN position bigint;
