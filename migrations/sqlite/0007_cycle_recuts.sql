-- When the plan's start date or timezone last moved a cycle's bounds (DESIGN.md
-- R1). The recut rebuilt that cycle's counters from the ledger rows that
-- occurred within its new bounds, whatever cycle they were booked under; the
-- ledger is append-only, so this is how its sums follow the counters: the cycle
-- holds the rows that occurred from its start until `recut_at`, then the rows
-- booked under its key.
CREATE TABLE cycle_recuts (
    workspace_id INTEGER NOT NULL REFERENCES workspaces (id),
    cycle_start  INTEGER NOT NULL,
    recut_at     TEXT    NOT NULL,  -- RFC 3339, UTC, like usage_events.occurred_at
    PRIMARY KEY (workspace_id, cycle_start)
);
