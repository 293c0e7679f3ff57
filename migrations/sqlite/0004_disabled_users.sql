-- A user the operator disabled (`tollgate user disable`) keeps its row, since the
-- ledger names it, but signs in no more and owns no live key.
ALTER TABLE users ADD COLUMN disabled_at TEXT;
