-- The dead letters of each handler (events that failed after their last attempt), listed by
-- `GET /api/v1/dead-letters` without reading the rest of the registry.
CREATE INDEX processed_events_failed ON processed_events (handler, event_id) WHERE status = 'failed';
