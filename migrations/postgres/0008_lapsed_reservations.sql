-- Holds the sweep released because their lease ran out (DESIGN.md R7), kept for
-- a week. A request can be served although its hold lapsed: while another
-- process held the database's write lock, the gateway could neither renew the
-- lease nor settle, and once the lock was gone the sweep ran first. Its late
-- settlement bills the usage from the lapsed hold (same cycle, same prices), so
-- what the provider bills is never lost. Nothing in this table counts as reserved.
CREATE TABLE lapsed_reservations (
    id                        TEXT    NOT NULL PRIMARY KEY,
    workspace_id              BIGINT  NOT NULL REFERENCES workspaces (id),
    cycle_start               BIGINT  NOT NULL,
    requested_model           TEXT    NOT NULL,
    served_model              TEXT    NOT NULL,
    amount_nanos              BIGINT  NOT NULL CHECK (amount_nanos >= 0),
    input_eur_per_mtok        TEXT    NOT NULL,
    cached_input_eur_per_mtok TEXT    NOT NULL,
    output_eur_per_mtok       TEXT    NOT NULL,
    user_id                   BIGINT  REFERENCES users (id),
    api_key_id                BIGINT  REFERENCES api_keys (id),
    lapsed_at                 BIGINT  NOT NULL   -- Unix milliseconds
);
