-- Grows each time the user is disabled: a session signed in at an older epoch is
-- over, even once the user is enabled again.
ALTER TABLE users ADD COLUMN session_epoch INTEGER NOT NULL DEFAULT 0;
