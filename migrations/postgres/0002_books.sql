-- The books of DESIGN.md §6. Money is stored exactly: integer nano-euros (10^-9 EUR)
-- for amounts and counters, decimal strings for prices per 1M tokens (R2). Instants
-- are integer Unix seconds (cycle keys) or RFC 3339 UTC text (timestamps).

-- The plan is the operator's (config file, applied at start); read-only in the UI.
CREATE TABLE plans (
    workspace_id  BIGINT PRIMARY KEY REFERENCES workspaces (id),
    budget_nanos  BIGINT NOT NULL CHECK (budget_nanos >= 0),
    overage_nanos BIGINT NOT NULL CHECK (overage_nanos >= 0),
    plan_start    TEXT    NOT NULL,              -- YYYY-MM-DD
    timezone      TEXT    NOT NULL               -- IANA name
);

-- The catalog as the config last declared it; prices are decimal strings.
CREATE TABLE models (
    workspace_id              BIGINT NOT NULL REFERENCES workspaces (id),
    id                        TEXT    NOT NULL CHECK (length(id) > 0),
    display_name              TEXT    NOT NULL,
    position                  BIGINT NOT NULL,
    input_eur_per_mtok        TEXT    NOT NULL,
    cached_input_eur_per_mtok TEXT    NOT NULL,
    output_eur_per_mtok       TEXT    NOT NULL,
    max_output_tokens         BIGINT NOT NULL CHECK (max_output_tokens > 0),
    PRIMARY KEY (workspace_id, id)
);

-- Automatic fallback (on by default) and the optimistic version of the settings.
CREATE TABLE settings (
    workspace_id       BIGINT PRIMARY KEY REFERENCES workspaces (id),
    automatic_fallback BOOLEAN NOT NULL DEFAULT TRUE,
    version            BIGINT NOT NULL DEFAULT 1
);

-- One optional cap per model (R5); a row exists once a limit was ever saved.
CREATE TABLE model_limits (
    workspace_id BIGINT NOT NULL REFERENCES workspaces (id),
    model_id     TEXT    NOT NULL,
    limit_nanos  BIGINT CHECK (limit_nanos IS NULL OR limit_nanos >= 0),
    enabled      BOOLEAN NOT NULL,
    version      BIGINT NOT NULL,
    CHECK (NOT enabled OR limit_nanos IS NOT NULL),
    PRIMARY KEY (workspace_id, model_id)
);

CREATE TABLE users (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workspace_id  BIGINT NOT NULL REFERENCES workspaces (id),
    email         TEXT    NOT NULL,
    password_hash TEXT    NOT NULL,
    role          TEXT    NOT NULL CHECK (role IN ('admin', 'member')),
    created_at    TEXT    NOT NULL
);
CREATE UNIQUE INDEX users_email ON users (lower(email));

CREATE TABLE api_keys (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workspace_id BIGINT NOT NULL REFERENCES workspaces (id),
    user_id      BIGINT NOT NULL REFERENCES users (id),
    name         TEXT    NOT NULL,
    key_hash     TEXT    NOT NULL UNIQUE,        -- SHA-256 of the key, hex
    created_at   TEXT    NOT NULL,
    last_used_at TEXT,
    revoked_at   TEXT
);

-- Per-cycle counters: one row per (cycle, model) plus the workspace total under
-- model_id ''. Keyed by the cycle's start (Unix seconds), so a new cycle starts
-- from zero without any job.
CREATE TABLE counters (
    workspace_id   BIGINT NOT NULL REFERENCES workspaces (id),
    cycle_start    BIGINT NOT NULL,
    model_id       TEXT    NOT NULL,
    spent_nanos    BIGINT NOT NULL DEFAULT 0 CHECK (spent_nanos >= 0),
    reserved_nanos BIGINT NOT NULL DEFAULT 0 CHECK (reserved_nanos >= 0),
    PRIMARY KEY (workspace_id, cycle_start, model_id)
);

-- Holds for requests in flight (R7), with the price in force at admission (R3).
CREATE TABLE reservations (
    id                        TEXT    PRIMARY KEY,
    workspace_id              BIGINT NOT NULL REFERENCES workspaces (id),
    cycle_start               BIGINT NOT NULL,
    requested_model           TEXT    NOT NULL,
    served_model              TEXT    NOT NULL,
    amount_nanos              BIGINT NOT NULL CHECK (amount_nanos >= 0),
    input_eur_per_mtok        TEXT    NOT NULL,
    cached_input_eur_per_mtok TEXT    NOT NULL,
    output_eur_per_mtok       TEXT    NOT NULL,
    user_id                   BIGINT REFERENCES users (id),
    api_key_id                BIGINT REFERENCES api_keys (id),
    owner                     TEXT    NOT NULL,  -- the replica holding it
    lease_until               BIGINT NOT NULL,  -- Unix milliseconds
    created_at                TEXT    NOT NULL
);
CREATE INDEX reservations_lease ON reservations (lease_until);

-- The append-only usage ledger: one row per settled request (a usage event).
CREATE TABLE usage_events (
    id                        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workspace_id              BIGINT NOT NULL REFERENCES workspaces (id),
    cycle_start               BIGINT NOT NULL,
    occurred_at               TEXT    NOT NULL,
    user_id                   BIGINT REFERENCES users (id),
    api_key_id                BIGINT REFERENCES api_keys (id),
    requested_model           TEXT    NOT NULL,
    served_model              TEXT    NOT NULL,
    prompt_tokens             BIGINT NOT NULL CHECK (prompt_tokens >= 0),
    cached_tokens             BIGINT NOT NULL CHECK (cached_tokens >= 0),
    completion_tokens         BIGINT NOT NULL CHECK (completion_tokens >= 0),
    reasoning_tokens          BIGINT NOT NULL CHECK (reasoning_tokens >= 0),
    input_eur_per_mtok        TEXT    NOT NULL,
    cached_input_eur_per_mtok TEXT    NOT NULL,
    output_eur_per_mtok       TEXT    NOT NULL,
    cost_nanos                BIGINT NOT NULL CHECK (cost_nanos >= 0),
    reserved_nanos            BIGINT NOT NULL CHECK (reserved_nanos >= 0),
    estimated                 BOOLEAN NOT NULL,  -- billed the estimate: no usage reported
    over_reservation          BOOLEAN NOT NULL,  -- cost > reserved (R7)
    reservation_id            TEXT,
    idempotency_key           TEXT,
    UNIQUE (workspace_id, idempotency_key)
);
CREATE INDEX usage_events_cycle ON usage_events (workspace_id, cycle_start, served_model);

CREATE FUNCTION usage_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'usage_events is append-only'; END $$;
CREATE TRIGGER usage_events_append_only BEFORE UPDATE OR DELETE ON usage_events
FOR EACH ROW EXECUTE FUNCTION usage_events_append_only();

-- Every accepted settings change: who, when, old, new (JSON).
CREATE TABLE audit_log (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workspace_id BIGINT NOT NULL REFERENCES workspaces (id),
    at           TEXT    NOT NULL,
    actor        TEXT    NOT NULL,
    action       TEXT    NOT NULL,
    subject      TEXT    NOT NULL,
    old_value    TEXT    NOT NULL,
    new_value    TEXT    NOT NULL
);
