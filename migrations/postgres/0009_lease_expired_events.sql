-- A ledger row billed from a hold whose lease had expired (DESIGN.md R7): the
-- sweep had released the hold, so the room it kept was free for other requests
-- before this cost was recorded. Flagged, as an event billed above its
-- reservation is, so that spend above the allowance can be traced to it.
ALTER TABLE usage_events ADD COLUMN lease_expired BOOLEAN NOT NULL DEFAULT false;
