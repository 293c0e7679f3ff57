-- Fewer pages written per admission and settlement (each is a page in the WAL).
--
-- A reservation lives for the length of one request, and there are only ever as
-- many as requests in flight: a table without a rowid keeps each in one b-tree,
-- keyed by its id, and the sweep for expired leases scans those few rows instead
-- of keeping an index that every admission and every settlement would write.
CREATE TABLE reservations_lean (
    id                        TEXT    NOT NULL PRIMARY KEY,
    workspace_id              INTEGER NOT NULL REFERENCES workspaces (id),
    cycle_start               INTEGER NOT NULL,
    requested_model           TEXT    NOT NULL,
    served_model              TEXT    NOT NULL,
    amount_nanos              INTEGER NOT NULL CHECK (amount_nanos >= 0),
    input_eur_per_mtok        TEXT    NOT NULL,
    cached_input_eur_per_mtok TEXT    NOT NULL,
    output_eur_per_mtok       TEXT    NOT NULL,
    user_id                   INTEGER REFERENCES users (id),
    api_key_id                INTEGER REFERENCES api_keys (id),
    owner                     TEXT    NOT NULL,  -- the replica holding it
    lease_until               INTEGER NOT NULL,  -- Unix milliseconds
    created_at                TEXT    NOT NULL
) WITHOUT ROWID;
INSERT INTO reservations_lean SELECT id, workspace_id, cycle_start, requested_model,
    served_model, amount_nanos, input_eur_per_mtok, cached_input_eur_per_mtok,
    output_eur_per_mtok, user_id, api_key_id, owner, lease_until, created_at
    FROM reservations;
DROP TABLE reservations;
ALTER TABLE reservations_lean RENAME TO reservations;
