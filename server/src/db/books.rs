//! The books, written once for both backends.
//!
//! SQLite and PostgreSQL run the same SQL here (sqlx binds `$N` placeholders on
//! both), so the `Store` implementation is generated for each backend by
//! [`impl_store!`] with concrete sqlx types, rather than written twice or made
//! generic over `sqlx::Database` with a wall of trait bounds. What differs is
//! supplied by each backend as inherent items:
//! - `write_connection()`: the connection a write outside the hot path uses
//!   (SQLite: the one writer connection, lent by the batcher; PostgreSQL: one from
//!   the pool), and `BEGIN`, the statement that opens its transaction (SQLite
//!   `BEGIN IMMEDIATE`, PostgreSQL a plain `BEGIN`),
//! - `BOOKS_VERSION`: a query for a number that changes whenever another
//!   connection commits (SQLite `data_version`), when the backend has one: the
//!   batcher then keeps its books from one batch to the next (`db::batch`),
//! - `LOCK`: the suffix that makes the plan read lock the workspace for the rest
//!   of the transaction (PostgreSQL `FOR UPDATE`; nothing on SQLite, where
//!   `BEGIN IMMEDIATE` already holds the write lock).
//!
//! The budget rules themselves stay in `app::domain`; this module only gives them a
//! consistent snapshot and applies their answer (STYLE.md).

use std::{collections::HashMap, str::FromStr};

use app::{
    domain::{
        Counter, ModelId, ModelLimit, ModelState, Nanos, PlanAmounts, PricePerMTok, Prices, Usage,
    },
    store::{PlanRecord, SettingsRecord, StoreError},
};
use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;

/// This deployment's workspace: every row carries it, one deployment serves one.
pub(crate) const WORKSPACE_ID: i64 = 1;
/// `counters.model_id` of the workspace's own total.
pub(crate) const WORKSPACE_TOTAL: &str = "";

/// The plan and settings, read (and on PostgreSQL locked) first in every write.
#[derive(sqlx::FromRow)]
pub(crate) struct PlanRow {
    pub budget_nanos: i64,
    pub overage_nanos: i64,
    pub plan_start: String,
    pub timezone: String,
    pub automatic_fallback: bool,
    pub settings_version: i64,
}

impl PlanRow {
    pub fn plan(&self) -> Result<PlanRecord, StoreError> {
        let start = NaiveDate::parse_from_str(&self.plan_start, "%Y-%m-%d")
            .map_err(|e| corrupt("plans.plan_start", e))?;
        let timezone = self
            .timezone
            .parse()
            .map_err(|e| corrupt("plans.timezone", e))?;
        Ok(PlanRecord {
            amounts: PlanAmounts {
                budget: Nanos::new(self.budget_nanos),
                overage: Nanos::new(self.overage_nanos),
            },
            start,
            timezone,
        })
    }

    pub fn settings(&self) -> SettingsRecord {
        SettingsRecord {
            automatic_fallback: self.automatic_fallback,
            version: self.settings_version,
        }
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct CounterRow {
    pub model_id: String,
    pub spent_nanos: i64,
    pub reserved_nanos: i64,
}

#[derive(sqlx::FromRow)]
pub(crate) struct LimitRow {
    pub model_id: String,
    pub limit_nanos: Option<i64>,
    pub enabled: bool,
    pub version: i64,
}

impl LimitRow {
    pub fn limit(&self) -> ModelLimit {
        ModelLimit {
            limit: self.limit_nanos.map(Nanos::new),
            enabled: self.enabled,
        }
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct ReservationRow {
    pub id: String,
    pub cycle_start: i64,
    pub requested_model: String,
    pub served_model: String,
    pub amount_nanos: i64,
    pub input_eur_per_mtok: String,
    pub cached_input_eur_per_mtok: String,
    pub output_eur_per_mtok: String,
    pub user_id: Option<i64>,
    pub api_key_id: Option<i64>,
}

impl ReservationRow {
    /// The prices in force when the request was admitted (R3).
    pub fn prices(&self) -> Result<Prices, StoreError> {
        Ok(Prices {
            input: price(&self.input_eur_per_mtok)?,
            cached_input: price(&self.cached_input_eur_per_mtok)?,
            output: price(&self.output_eur_per_mtok)?,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct EventRow {
    pub id: i64,
    pub requested_model: String,
    pub served_model: String,
    pub cost_nanos: i64,
    pub estimated: bool,
    pub over_reservation: bool,
}

impl EventRow {
    pub fn record(self, newly_recorded: bool) -> app::store::UsageEventRecord {
        app::store::UsageEventRecord {
            id: self.id,
            requested: ModelId::new(self.requested_model),
            served: ModelId::new(self.served_model),
            cost: Nanos::new(self.cost_nanos),
            estimated: self.estimated,
            over_reservation: self.over_reservation,
            newly_recorded,
        }
    }
}

/// A ledger row recorded under an idempotency key, with what it counted, to tell
/// a retry from another use of the same key.
#[derive(sqlx::FromRow)]
pub(crate) struct RecordedRow {
    #[sqlx(flatten)]
    pub event: EventRow,
    pub prompt_tokens: i64,
    pub cached_tokens: i64,
    pub completion_tokens: i64,
    pub reasoning_tokens: i64,
}

impl RecordedRow {
    /// Whether this row counted `usage` of `model`.
    ///
    /// Errors: [`StoreError::Invalid`] for a token count past `i64::MAX`.
    pub fn is_same(&self, model: &str, usage: &Usage) -> Result<bool, StoreError> {
        Ok(self.event.served_model == model
            && self.prompt_tokens == tokens(usage.prompt_tokens)?
            && self.cached_tokens == tokens(usage.cached_tokens)?
            && self.completion_tokens == tokens(usage.completion_tokens)?
            && self.reasoning_tokens == tokens(usage.reasoning_tokens)?)
    }
}

/// A ledger row with the columns that find it again: the reservation it
/// settled, and the idempotency key it was recorded under.
#[derive(sqlx::FromRow)]
pub(crate) struct LedgerRow {
    #[sqlx(flatten)]
    pub event: EventRow,
    pub reservation_id: Option<String>,
    pub idempotency_key: Option<String>,
}

/// Whether no value of `values` repeats.
pub(crate) fn all_distinct(values: &[&str]) -> bool {
    let mut seen = std::collections::HashSet::with_capacity(values.len());
    values.iter().all(|value| seen.insert(*value))
}

/// A ledger row to insert: the reservation it settles (an empty `id` for usage
/// recorded without one), what was used and what it cost.
pub(crate) struct NewEvent {
    pub row: ReservationRow,
    pub usage: Usage,
    /// Nano-euros charged.
    pub cost: Nanos,
    pub estimated: bool,
    pub over_reservation: bool,
    pub idempotency_key: Option<String>,
    pub now: DateTime<Utc>,
}

/// Most rows one statement inserts or looks up. A batch's rows fit in one
/// statement per kind (`db::batch::MAX_BATCH`): a statement is a round trip to
/// the database, which costs more than preparing a new shape once (the writer
/// connection keeps up to [`STATEMENT_CACHE`] of them).
pub(crate) const ROWS_PER_STATEMENT: usize = super::batch::MAX_BATCH;

/// Prepared statements each connection keeps: every row count up to
/// [`ROWS_PER_STATEMENT`] of the hot path's four multi-row statements, and the rest.
pub(crate) const STATEMENT_CACHE: usize = 4 * ROWS_PER_STATEMENT + 64;

/// `items` in statements of at most [`ROWS_PER_STATEMENT`] rows, in order.
pub(crate) fn chunks<T>(items: &[T]) -> std::slice::Chunks<'_, T> {
    items.chunks(ROWS_PER_STATEMENT)
}

/// `($first, ..., $(first + columns - 1)), (...)` for `rows` rows: the
/// placeholders of a multi-row `VALUES` (or, with one column, an `IN` list).
pub(crate) fn placeholders(rows: usize, columns: usize, first: usize) -> String {
    let mut out = String::with_capacity(rows * columns * 5);
    for row in 0..rows {
        if row > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for column in 0..columns {
            if column > 0 {
                out.push_str(", ");
            }
            out.push('$');
            out.push_str(&(first + row * columns + column).to_string());
        }
        out.push(')');
    }
    out
}

#[derive(sqlx::FromRow)]
pub(crate) struct UserRow {
    pub id: i64,
    pub email: String,
    pub password_hash: String,
    pub role: String,
}

impl UserRow {
    pub fn record(self) -> Result<app::store::UserRecord, StoreError> {
        Ok(app::store::UserRecord {
            id: self.id,
            email: self.email,
            password_hash: self.password_hash,
            role: self.role.parse().map_err(|e| corrupt("users.role", e))?,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct ApiKeyRow {
    pub id: i64,
    pub name: String,
    pub user_id: i64,
    pub owner_email: String,
    pub created_at: String,
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
}

impl ApiKeyRow {
    pub fn record(self) -> Result<app::store::ApiKeyRecord, StoreError> {
        Ok(app::store::ApiKeyRecord {
            id: self.id,
            name: self.name,
            user_id: self.user_id,
            owner_email: self.owner_email,
            created_at: instant("api_keys.created_at", &self.created_at)?,
            last_used_at: self
                .last_used_at
                .as_deref()
                .map(|t| instant("api_keys.last_used_at", t))
                .transpose()?,
            revoked_at: self
                .revoked_at
                .as_deref()
                .map(|t| instant("api_keys.revoked_at", t))
                .transpose()?,
        })
    }
}

/// An API key with its owner, as one query reads them.
#[derive(sqlx::FromRow)]
pub(crate) struct KeyOwnerRow {
    #[sqlx(flatten)]
    pub key: ApiKeyRow,
    pub password_hash: String,
    pub role: String,
}

impl KeyOwnerRow {
    pub fn record(self) -> Result<(app::store::ApiKeyRecord, app::store::UserRecord), StoreError> {
        let user = UserRow {
            id: self.key.user_id,
            email: self.key.owner_email.clone(),
            password_hash: self.password_hash,
            role: self.role,
        };
        Ok((self.key.record()?, user.record()?))
    }
}

/// How often at most a key's `last_used_at` is written, seconds.
pub(crate) const LAST_USED_PRECISION_SECS: i64 = 60;

/// Which API keys to list.
#[derive(Clone, Copy)]
pub(crate) enum KeyFilter<'a> {
    Id(i64),
    /// The key with this hash, unless revoked.
    LiveHash(&'a str),
    OwnerEmail(&'a str),
    All,
}

/// An RFC 3339 timestamp column read back as UTC.
pub(crate) fn instant(what: &str, text: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| corrupt(what, e))
}

#[derive(sqlx::FromRow)]
pub(crate) struct AuditRow {
    pub id: i64,
    pub at: String,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub old_value: String,
    pub new_value: String,
}

fn price(text: &str) -> Result<PricePerMTok, StoreError> {
    let value = Decimal::from_str(text).map_err(|e| corrupt("price", e))?;
    PricePerMTok::new(value).map_err(|e| corrupt("price", e))
}

/// A stored value that cannot be read back: a bug or a hand-edited database.
pub(crate) fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    tracing::error!(what, error = %e, "unreadable value in the database");
    StoreError::Database(format!("unreadable {what}"))
}

/// Map a sqlx error: constraint violations become typed errors (STYLE.md), the rest
/// is logged and answered generically.
pub(crate) fn db_error(e: sqlx::Error) -> StoreError {
    if let sqlx::Error::Database(db) = &e {
        let kind = db.kind();
        if matches!(
            kind,
            sqlx::error::ErrorKind::UniqueViolation
                | sqlx::error::ErrorKind::ForeignKeyViolation
                | sqlx::error::ErrorKind::NotNullViolation
                | sqlx::error::ErrorKind::CheckViolation
        ) {
            tracing::warn!(error = %db, "constraint violation");
            return StoreError::Invalid {
                code: "constraint_violation",
                message: "the change breaks a rule of the books and was not saved".into(),
            };
        }
    }
    tracing::error!(error = %e, "database error");
    StoreError::Database(e.to_string())
}

/// Counters and limits of a cycle as the admission snapshot wants them.
pub(crate) fn model_states(
    counters: &[CounterRow],
    limits: &[LimitRow],
) -> (Counter, HashMap<ModelId, ModelState>) {
    let mut workspace = Counter::default();
    let mut models: HashMap<ModelId, ModelState> =
        HashMap::with_capacity(limits.len() + counters.len());
    for row in counters {
        let counter = Counter {
            spent: Nanos::new(row.spent_nanos),
            reserved: Nanos::new(row.reserved_nanos),
        };
        if row.model_id == WORKSPACE_TOTAL {
            workspace = counter;
        } else {
            models
                .entry(ModelId::new(row.model_id.as_str()))
                .or_default()
                .counter = counter;
        }
    }
    for row in limits {
        models
            .entry(ModelId::new(row.model_id.as_str()))
            .or_default()
            .limit = row.limit();
    }
    (workspace, models)
}

/// The cost of a settlement in nano-euros and its flags `(cost, estimated,
/// over_reservation)`: the usage priced at the admission's prices and rounded once
/// (R2, R3), or the reserved estimate when no usage was reported (DESIGN.md §4).
pub(crate) fn settlement_cost(
    row: &ReservationRow,
    usage: Option<&Usage>,
) -> Result<(Nanos, bool, bool), StoreError> {
    let reserved = Nanos::new(row.amount_nanos);
    let Some(usage) = usage else {
        return Ok((reserved, true, false));
    };
    let cost = app::domain::cost(&row.prices()?, usage)
        .map_err(|e| StoreError::Invalid {
            code: "invalid_usage",
            message: e.to_string(),
        })?
        .to_nanos_rounded()
        .map_err(|e| StoreError::Invalid {
            code: "invalid_usage",
            message: e.to_string(),
        })?;
    Ok((cost, false, cost > reserved))
}

/// Why usage reported through the usage API was refused: it costs `cost`, more
/// than `row` reserved for the bounds its caller declared at admission.
pub(crate) fn usage_exceeds_reservation(cost: Nanos, row: &ReservationRow) -> StoreError {
    use app::domain::format_eur_exact;
    // Exact: rounded to cents, both could read "€0.00".
    StoreError::Invalid {
        code: "usage_exceeds_reservation",
        message: format!(
            "the reported usage costs {}, more than the {} reserved for the bounds given at \
             admission; report usage within those bounds, or record it with POST /api/v1/usage, \
             which checks it against the limits",
            format_eur_exact(cost.to_money()),
            format_eur_exact(Nanos::new(row.amount_nanos).to_money()),
        ),
    }
}

/// Unix seconds of a cycle start, the counters' key.
pub(crate) fn cycle_key(start: DateTime<Utc>) -> i64 {
    start.timestamp()
}

/// Milliseconds since the epoch, for leases.
pub(crate) fn millis(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

/// `u64` token counts as stored (`BIGINT`); counts past `i64::MAX` are refused.
pub(crate) fn tokens(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::Invalid {
        code: "invalid_usage",
        message: format!("a token count of {value} is out of range"),
    })
}

/// Generates `impl Store for $store` over the sqlx backend `$db` from one body.
macro_rules! impl_store {
    ($store:ty, $db:ty) => {
        #[async_trait::async_trait]
        impl app::store::Store for $store {
            async fn apply_setup(
                &self,
                setup: &app::store::WorkspaceSetup,
            ) -> Result<(), app::store::StoreError> {
                use $crate::db::books::*;
                let mut conn = self.write_connection().await?;
                let mut tx = begin(&mut conn, Self::BEGIN).await?;
                sqlx::query(
                    "INSERT INTO workspaces (id, name) VALUES ($1, $2) \
                     ON CONFLICT (id) DO UPDATE SET name = excluded.name",
                )
                .bind(WORKSPACE_ID)
                .bind(&setup.name)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
                sqlx::query(
                    "INSERT INTO plans (workspace_id, budget_nanos, overage_nanos, plan_start, timezone) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (workspace_id) DO UPDATE SET \
                     budget_nanos = excluded.budget_nanos, overage_nanos = excluded.overage_nanos, \
                     plan_start = excluded.plan_start, timezone = excluded.timezone",
                )
                .bind(WORKSPACE_ID)
                .bind(setup.plan.amounts.budget.get())
                .bind(setup.plan.amounts.overage.get())
                .bind(setup.plan.start.format("%Y-%m-%d").to_string())
                .bind(setup.plan.timezone.name())
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
                sqlx::query(
                    "INSERT INTO settings (workspace_id) VALUES ($1) ON CONFLICT (workspace_id) DO NOTHING",
                )
                .bind(WORKSPACE_ID)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
                sqlx::query("DELETE FROM models WHERE workspace_id = $1")
                    .bind(WORKSPACE_ID)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                for (position, model) in setup.catalog.models().iter().enumerate() {
                    sqlx::query(
                        "INSERT INTO models (workspace_id, id, display_name, position, input_eur_per_mtok, \
                         cached_input_eur_per_mtok, output_eur_per_mtok, max_output_tokens) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    )
                    .bind(WORKSPACE_ID)
                    .bind(model.id.as_str())
                    .bind(&model.display_name)
                    .bind(i64::try_from(position).unwrap_or(i64::MAX))
                    .bind(model.prices.input.to_string())
                    .bind(model.prices.cached_input.to_string())
                    .bind(model.prices.output.to_string())
                    .bind(i64::from(model.max_output_tokens))
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                }
                tx.commit().await.map_err(db_error)
            }

            async fn workspace(
                &self,
            ) -> Result<app::store::WorkspaceRecord, app::store::StoreError> {
                use $crate::db::books::*;
                let row: Option<(i64, String)> =
                    sqlx::query_as("SELECT id, name FROM workspaces WHERE id = $1")
                        .bind(WORKSPACE_ID)
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(db_error)?;
                row.map(|(id, name)| app::store::WorkspaceRecord { id, name })
                    .ok_or(app::store::StoreError::NotFound { what: "workspace" })
            }

            async fn reserve(
                &self,
                request: app::store::ReserveRequest,
            ) -> Result<app::store::ReserveOutcome, app::store::StoreError> {
                self.batcher.reserve(request).await
            }

            async fn renew_lease(
                &self,
                reservation: &app::store::ReservationId,
                lease_until: DateTime<Utc>,
            ) -> Result<(), app::store::StoreError> {
                use $crate::db::books::*;
                let mut lent = self.write_connection().await?;
                let conn: &mut <$db as sqlx::Database>::Connection = &mut lent;
                let done = sqlx::query("UPDATE reservations SET lease_until = $1 WHERE id = $2")
                    .bind(millis(lease_until))
                    .bind(&reservation.0)
                    .execute(&mut *conn)
                    .await
                    .map_err(db_error)?;
                if done.rows_affected() == 0 {
                    return Err(app::store::StoreError::NotFound { what: "reservation" });
                }
                Ok(())
            }

            async fn settle(
                &self,
                settlement: app::store::Settlement,
            ) -> Result<app::store::UsageEventRecord, app::store::StoreError> {
                if let Some(usage) = &settlement.usage {
                    usage.validate().map_err(|e| app::store::StoreError::Invalid {
                        code: "invalid_usage",
                        message: e.to_string(),
                    })?;
                }
                self.batcher.settle(settlement).await
            }

            async fn release(
                &self,
                reservation: &app::store::ReservationId,
            ) -> Result<(), app::store::StoreError> {
                self.batcher.release(reservation.clone()).await
            }

            async fn release_expired(
                &self,
                now: DateTime<Utc>,
            ) -> Result<u64, app::store::StoreError> {
                use $crate::db::books::*;
                let mut conn = self.write_connection().await?;
                let mut tx = begin(&mut conn, Self::BEGIN).await?;
                let rows: Vec<(i64, String, i64)> = sqlx::query_as(
                    "DELETE FROM reservations WHERE workspace_id = $1 AND lease_until < $2 \
                     RETURNING cycle_start, served_model, amount_nanos",
                )
                .bind(WORKSPACE_ID)
                .bind(millis(now))
                .fetch_all(&mut *tx)
                .await
                .map_err(db_error)?;
                for (cycle_start, served, amount) in &rows {
                    add_to_counters(&mut tx, *cycle_start, served, 0, -amount).await?;
                }
                tx.commit().await.map_err(db_error)?;
                if !rows.is_empty() {
                    tracing::info!(released = rows.len(), "released reservations whose lease ended");
                }
                Ok(u64::try_from(rows.len()).unwrap_or(u64::MAX))
            }

            async fn record_usage(
                &self,
                records: &[app::store::UsageRecord<'_>],
                spender: app::store::Spender,
                now: DateTime<Utc>,
            ) -> Result<Vec<app::store::RecordOutcome>, app::store::StoreError> {
                use $crate::db::books::*;
                use app::store::RecordOutcome;

                let mut conn = self.write_connection().await?;
                let mut tx = begin(&mut conn, Self::BEGIN).await?;
                let plan_row = read_plan(&mut tx, Self::LOCK).await?;
                let mut books = $crate::db::batch::BatchBooks::default();
                books.set_rules(&plan_row, read_limits(&mut tx).await?)?;
                let key = books.cycle_of(now)?;
                books.load(key, &read_counters(&mut tx, key).await?)?;
                let mut outcomes = Vec::with_capacity(records.len());
                for record in records {
                    let idempotency_key = record.idempotency_key.as_str();
                    let recorded: Option<RecordedRow> = sqlx::query_as(
                        "SELECT id, requested_model, served_model, cost_nanos, estimated, \
                         over_reservation, prompt_tokens, cached_tokens, completion_tokens, \
                         reasoning_tokens FROM usage_events \
                         WHERE workspace_id = $1 AND idempotency_key = $2",
                    )
                    .bind(WORKSPACE_ID)
                    .bind(idempotency_key)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db_error)?;
                    if let Some(recorded) = recorded {
                        // A retry repeats what it reports; the same key for other
                        // usage is a mistake the caller must hear of.
                        let same = recorded.is_same(record.model.id.as_str(), &record.usage)?;
                        let event = recorded.event.record(false);
                        outcomes.push(if same {
                            RecordOutcome::Duplicate(event)
                        } else {
                            RecordOutcome::Conflict(event)
                        });
                        continue;
                    }
                    let row = ReservationRow {
                        id: String::new(),
                        cycle_start: key,
                        requested_model: record.model.id.to_string(),
                        served_model: record.model.id.to_string(),
                        amount_nanos: 0,
                        input_eur_per_mtok: record.model.prices.input.to_string(),
                        cached_input_eur_per_mtok: record.model.prices.cached_input.to_string(),
                        output_eur_per_mtok: record.model.prices.output.to_string(),
                        user_id: spender.user_id,
                        api_key_id: spender.api_key_id,
                    };
                    let (cost, _, _) = settlement_cost(&row, Some(&record.usage))?;
                    // Each item sees the ones before it: the books change as they go.
                    if let Err(blocked) = books.admit_known_cost(now, record.model, cost)? {
                        outcomes.push(RecordOutcome::Blocked(blocked));
                        continue;
                    }
                    books.change(key, &row.served_model, cost.get(), 0);
                    // One at a time: a key repeated within `records` must find the
                    // row its first occurrence wrote.
                    let event = NewEvent {
                        row,
                        usage: record.usage,
                        cost,
                        estimated: false,
                        over_reservation: false,
                        idempotency_key: Some(record.idempotency_key.clone()),
                        now,
                    };
                    let event = insert_events(&mut tx, std::slice::from_ref(&event))
                        .await?
                        .pop()
                        .ok_or_else(|| app::store::StoreError::Database("a ledger row was not written".into()))?
                        .event;
                    outcomes.push(RecordOutcome::Recorded(event.record(true)));
                }
                for (cycle_start, model, spent, reserved) in books.changes() {
                    add_to_counters(&mut tx, cycle_start, model, spent, reserved).await?;
                }
                tx.commit().await.map_err(db_error)?;
                Ok(outcomes)
            }

            async fn spend_snapshot(
                &self,
                at: DateTime<Utc>,
            ) -> Result<app::store::SpendSnapshot, app::store::StoreError> {
                use $crate::db::books::*;
                use app::domain::{Counter, ModelId};
                use app::store::{ModelBooks, SpendSnapshot, StoredLimit};

                // One transaction, so the counters and limits are of one moment.
                let mut tx = self.pool.begin().await.map_err(db_error)?;
                let plan_row = read_plan(&mut tx, "").await?;
                let plan = plan_row.plan()?;
                let cycle = plan.cycle_at(at)?;
                let counters = read_counters(&mut tx, cycle_key(cycle.start)).await?;
                let limits = read_limits(&mut tx).await?;
                tx.commit().await.map_err(db_error)?;
                let mut workspace = Counter::default();
                let mut models: Vec<ModelBooks> = Vec::new();
                let mut index: std::collections::HashMap<String, usize> = Default::default();
                let mut entry = |id: &str, models: &mut Vec<ModelBooks>| -> usize {
                    *index.entry(id.to_owned()).or_insert_with(|| {
                        models.push(ModelBooks {
                            id: ModelId::new(id),
                            counter: Counter::default(),
                            limit: StoredLimit::default(),
                        });
                        models.len() - 1
                    })
                };
                for row in &counters {
                    let counter = Counter {
                        spent: app::domain::Nanos::new(row.spent_nanos),
                        reserved: app::domain::Nanos::new(row.reserved_nanos),
                    };
                    if row.model_id == WORKSPACE_TOTAL {
                        workspace = counter;
                    } else {
                        let i = entry(&row.model_id, &mut models);
                        models[i].counter = counter;
                    }
                }
                for row in &limits {
                    let i = entry(&row.model_id, &mut models);
                    models[i].limit = StoredLimit { limit: row.limit(), version: row.version };
                }
                Ok(SpendSnapshot {
                    plan,
                    cycle,
                    settings: plan_row.settings(),
                    workspace,
                    models,
                })
            }

            async fn ledger_totals(
                &self,
                cycle_start: DateTime<Utc>,
            ) -> Result<app::store::LedgerTotals, app::store::StoreError> {
                use $crate::db::books::*;
                use app::domain::{ModelId, Nanos};
                let rows: Vec<(String, i64, i64)> = sqlx::query_as(
                    "SELECT served_model, CAST(SUM(cost_nanos) AS BIGINT), CAST(COUNT(*) AS BIGINT) \
                     FROM usage_events WHERE workspace_id = $1 AND cycle_start = $2 \
                     GROUP BY served_model ORDER BY served_model",
                )
                .bind(WORKSPACE_ID)
                .bind(cycle_key(cycle_start))
                .fetch_all(&self.pool)
                .await
                .map_err(db_error)?;
                let mut totals = app::store::LedgerTotals::default();
                for (model, sum, count) in rows {
                    totals.total = totals.total + Nanos::new(sum);
                    totals.events += count;
                    totals.by_model.push((ModelId::new(model), Nanos::new(sum)));
                }
                Ok(totals)
            }

            async fn update_settings(
                &self,
                actor: &app::store::Actor,
                expected_version: i64,
                automatic_fallback: bool,
                now: DateTime<Utc>,
            ) -> Result<app::store::SettingsRecord, app::store::StoreError> {
                use $crate::db::books::*;
                let mut conn = self.write_connection().await?;
                let mut tx = begin(&mut conn, Self::BEGIN).await?;
                let current = read_plan(&mut tx, Self::LOCK).await?.settings();
                if current.version != expected_version {
                    tx.rollback().await.map_err(db_error)?;
                    return Err(app::store::StoreError::Conflict {
                        what: "settings".into(),
                        current_version: current.version,
                    });
                }
                if current.automatic_fallback == automatic_fallback {
                    tx.rollback().await.map_err(db_error)?;
                    return Ok(current);
                }
                let version = current.version + 1;
                sqlx::query(
                    "UPDATE settings SET automatic_fallback = $1, version = $2 WHERE workspace_id = $3",
                )
                .bind(automatic_fallback)
                .bind(version)
                .bind(WORKSPACE_ID)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
                audit(
                    &mut tx,
                    actor,
                    now,
                    "settings.automatic_fallback",
                    "workspace",
                    &serde_json::json!({ "automatic_fallback": current.automatic_fallback }),
                    &serde_json::json!({ "automatic_fallback": automatic_fallback }),
                )
                .await?;
                tx.commit().await.map_err(db_error)?;
                Ok(app::store::SettingsRecord { automatic_fallback, version })
            }

            async fn update_model_limits(
                &self,
                actor: &app::store::Actor,
                changes: &[app::store::LimitChange],
                now: DateTime<Utc>,
            ) -> Result<(), app::store::StoreError> {
                use $crate::db::books::*;
                use app::store::StoreError;
                for change in changes {
                    change.limit.validate().map_err(|e| StoreError::Invalid {
                        code: e.code(),
                        message: format!("{}: {e}", change.model),
                    })?;
                }
                let mut conn = self.write_connection().await?;
                let mut tx = begin(&mut conn, Self::BEGIN).await?;
                read_plan(&mut tx, Self::LOCK).await?;
                for change in changes {
                    let known: Option<(String,)> =
                        sqlx::query_as("SELECT id FROM models WHERE workspace_id = $1 AND id = $2")
                            .bind(WORKSPACE_ID)
                            .bind(change.model.as_str())
                            .fetch_optional(&mut *tx)
                            .await
                            .map_err(db_error)?;
                    if known.is_none() {
                        tx.rollback().await.map_err(db_error)?;
                        return Err(StoreError::Invalid {
                            code: "unknown_model",
                            message: format!("{} is not a model of the catalog", change.model),
                        });
                    }
                    let current: Option<LimitRow> = sqlx::query_as(
                        "SELECT model_id, limit_nanos, enabled, version FROM model_limits \
                         WHERE workspace_id = $1 AND model_id = $2",
                    )
                    .bind(WORKSPACE_ID)
                    .bind(change.model.as_str())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db_error)?;
                    let (old, version) = current
                        .map(|row| (row.limit(), row.version))
                        .unwrap_or_default();
                    // A row the editor left as it is now stored changes nothing and
                    // cannot conflict; a row that differs must be based on the
                    // version stored, or it would overwrite someone else's change.
                    if old == change.limit {
                        continue;
                    }
                    if version != change.expected_version {
                        tx.rollback().await.map_err(db_error)?;
                        return Err(StoreError::Conflict {
                            what: change.model.to_string(),
                            current_version: version,
                        });
                    }
                    sqlx::query(
                        "INSERT INTO model_limits (workspace_id, model_id, limit_nanos, enabled, version) \
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (workspace_id, model_id) DO UPDATE SET \
                         limit_nanos = excluded.limit_nanos, enabled = excluded.enabled, version = excluded.version",
                    )
                    .bind(WORKSPACE_ID)
                    .bind(change.model.as_str())
                    .bind(change.limit.limit.map(|n| n.get()))
                    .bind(change.limit.enabled)
                    .bind(version + 1)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                    audit(
                        &mut tx,
                        actor,
                        now,
                        "model_limit",
                        change.model.as_str(),
                        &limit_json(&old),
                        &limit_json(&change.limit),
                    )
                    .await?;
                }
                tx.commit().await.map_err(db_error)
            }

            async fn audit_log(
                &self,
                limit: u32,
            ) -> Result<Vec<app::store::AuditRecord>, app::store::StoreError> {
                use $crate::db::books::*;
                let rows: Vec<AuditRow> = sqlx::query_as(
                    "SELECT id, at, actor, action, subject, old_value, new_value FROM audit_log \
                     WHERE workspace_id = $1 ORDER BY id DESC LIMIT $2",
                )
                .bind(WORKSPACE_ID)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(db_error)?;
                rows.into_iter()
                    .map(|row| {
                        Ok(app::store::AuditRecord {
                            id: row.id,
                            at: instant("audit_log.at", &row.at)?,
                            actor: row.actor,
                            action: row.action,
                            subject: row.subject,
                            old_value: row.old_value,
                            new_value: row.new_value,
                        })
                    })
                    .collect()
            }

            async fn create_user(
                &self,
                email: &str,
                password_hash: &str,
                role: app::store::Role,
                now: DateTime<Utc>,
            ) -> Result<app::store::UserRecord, app::store::StoreError> {
                use $crate::db::books::*;
                let mut conn = self.write_connection().await?;
                let mut tx = begin(&mut conn, Self::BEGIN).await?;
                let taken: Option<(i64,)> =
                    sqlx::query_as("SELECT id FROM users WHERE lower(email) = lower($1)")
                        .bind(email)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(db_error)?;
                if taken.is_some() {
                    tx.rollback().await.map_err(db_error)?;
                    return Err(app::store::StoreError::Invalid {
                        code: "email_taken",
                        message: format!("a user with the email {email} exists already"),
                    });
                }
                let row: UserRow = sqlx::query_as(
                    "INSERT INTO users (workspace_id, email, password_hash, role, created_at) \
                     VALUES ($1, $2, $3, $4, $5) RETURNING id, email, password_hash, role",
                )
                .bind(WORKSPACE_ID)
                .bind(email)
                .bind(password_hash)
                .bind(role.as_str())
                .bind(now.to_rfc3339())
                .fetch_one(&mut *tx)
                .await
                .map_err(db_error)?;
                tx.commit().await.map_err(db_error)?;
                row.record()
            }

            async fn user_by_email(
                &self,
                email: &str,
            ) -> Result<Option<app::store::UserRecord>, app::store::StoreError> {
                find_user(&self.pool, "lower(email) = lower($1)", email.to_owned()).await
            }

            async fn user_by_id(
                &self,
                id: i64,
            ) -> Result<Option<app::store::UserRecord>, app::store::StoreError> {
                find_user(&self.pool, "id = $1", id).await
            }

            async fn create_api_key(
                &self,
                user_id: i64,
                name: &str,
                key_hash: &str,
                now: DateTime<Utc>,
            ) -> Result<app::store::ApiKeyRecord, app::store::StoreError> {
                use $crate::db::books::*;
                let mut lent = self.write_connection().await?;
                let conn: &mut <$db as sqlx::Database>::Connection = &mut lent;
                let id: (i64,) = sqlx::query_as(
                    "INSERT INTO api_keys (workspace_id, user_id, name, key_hash, created_at) \
                     VALUES ($1, $2, $3, $4, $5) RETURNING id",
                )
                .bind(WORKSPACE_ID)
                .bind(user_id)
                .bind(name)
                .bind(key_hash)
                .bind(now.to_rfc3339())
                .fetch_one(&mut *conn)
                .await
                .map_err(db_error)?;
                let mut keys = list_keys(&self.pool, KeyFilter::Id(id.0)).await?;
                keys.pop().ok_or(app::store::StoreError::NotFound { what: "api key" })
            }

            async fn authenticate_api_key(
                &self,
                key_hash: &str,
                now: DateTime<Utc>,
            ) -> Result<Option<(app::store::ApiKeyRecord, app::store::UserRecord)>, app::store::StoreError> {
                use $crate::db::books::*;
                // The key and its owner in one query: this runs for every request.
                let Some((mut key, user)) = fetch_keys(&self.pool, KeyFilter::LiveHash(key_hash))
                    .await?
                    .pop()
                    .map(KeyOwnerRow::record)
                    .transpose()?
                else {
                    return Ok(None);
                };
                // "Last used" is kept to the minute: a write per request would put
                // every request of a busy key through the writer (SQLite) or the
                // key's row lock (PostgreSQL) for a date nobody reads that finely.
                let stale = key
                    .last_used_at
                    .is_none_or(|at| now - at >= chrono::Duration::seconds(LAST_USED_PRECISION_SECS));
                if stale {
                    let mut lent = self.write_connection().await?;
                    let conn: &mut <$db as sqlx::Database>::Connection = &mut lent;
                    sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
                        .bind(now.to_rfc3339())
                        .bind(key.id)
                        .execute(&mut *conn)
                        .await
                        .map_err(db_error)?;
                    key.last_used_at = Some(now);
                }
                Ok(Some((key, user)))
            }

            async fn list_api_keys(
                &self,
                email: Option<&str>,
            ) -> Result<Vec<app::store::ApiKeyRecord>, app::store::StoreError> {
                use $crate::db::books::*;
                match email {
                    Some(email) => list_keys(&self.pool, KeyFilter::OwnerEmail(email)).await,
                    None => list_keys(&self.pool, KeyFilter::All).await,
                }
            }

            async fn revoke_api_key(
                &self,
                id: i64,
                now: DateTime<Utc>,
            ) -> Result<(), app::store::StoreError> {
                use $crate::db::books::*;
                let mut lent = self.write_connection().await?;
                let conn: &mut <$db as sqlx::Database>::Connection = &mut lent;
                let done = sqlx::query(
                    "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
                )
                .bind(now.to_rfc3339())
                .bind(id)
                .execute(&mut *conn)
                .await
                .map_err(db_error)?;
                if done.rows_affected() == 0 {
                    return Err(app::store::StoreError::NotFound { what: "api key" });
                }
                Ok(())
            }
        }

        /// Apply one batch of hot-path writes (see `db::batch`) on the batcher's
        /// writer, answer each operation, and return the writer (none when its
        /// connection failed and should be replaced) with the admitted reservations
        /// nobody waits for.
        async fn execute_batch(
            writer: $crate::db::batch::Writer<sqlx::pool::PoolConnection<$db>>,
            ops: Vec<$crate::db::batch::Op>,
        ) -> $crate::db::batch::BatchEnd<sqlx::pool::PoolConnection<$db>> {
            use $crate::db::batch::{answer_all, Answer, Writer};
            use app::store::StoreError;
            let Writer { mut conn, mut books } = writer;
            if ops.len() > 1 {
                match try_batch(&mut conn, books.take(), &ops).await {
                    Ok((answers, books)) => {
                        return (Some(Writer { conn, books }), answer_all(ops, answers))
                    }
                    Err(e) => tracing::warn!(
                        error = %e,
                        operations = ops.len(),
                        "a batch of writes failed and was rolled back; applying them one by one"
                    ),
                }
            }
            let mut healthy = true;
            let mut orphans = Vec::new();
            for op in ops {
                let answers = match try_batch(&mut conn, books.take(), std::slice::from_ref(&op)).await {
                    Ok((answers, after)) => {
                        books = after;
                        answers
                    }
                    Err(e) => {
                        healthy &= !matches!(e, StoreError::Database(_));
                        vec![Answer::Failed(e)]
                    }
                };
                orphans.extend(answer_all(vec![op], answers));
            }
            // A database error may have broken the connection: the pool checks it
            // and gives the batcher a sound one.
            (healthy.then_some(Writer { conn, books }), orphans)
        }

        /// One transaction over `ops`, in order; any error rolls back all of them.
        /// Blocks and unknown reservations are answers, not errors: they write nothing.
        ///
        /// Whatever the batch's size, it costs a fixed number of statements: the
        /// rules and counters are read once (when it holds an admission), the
        /// reservations it ends are deleted by one statement, its new reservations
        /// and ledger rows are inserted by one each, and each model's counters are
        /// changed once.
        async fn try_batch(
            conn: &mut <$db as sqlx::Database>::Connection,
            carried: Option<$crate::db::batch::BatchBooks>,
            ops: &[$crate::db::batch::Op],
        ) -> Result<(Vec<$crate::db::batch::Answer>, Option<$crate::db::batch::BatchBooks>), app::store::StoreError> {
            use $crate::db::batch::{Answer, Decision, Op};
            use $crate::db::books::*;
            use app::store::{ReserveOutcome, StoreError};

            let keys: Vec<&str> = ops
                .iter()
                .filter_map(|op| match op {
                    Op::Settle(settlement, _) => settlement.idempotency_key.as_deref(),
                    _ => None,
                })
                .collect();
            if ops.len() > 1 && !all_distinct(&keys) {
                // A retried settlement racing its original: one per transaction.
                return Err(StoreError::Database("one idempotency key twice in a batch".into()));
            }
            let mut tx = begin(conn, <$store>::BEGIN).await?;
            let ending: Vec<&str> = ops
                .iter()
                .filter_map(|op| match op {
                    Op::Settle(settlement, _) => Some(settlement.reservation.0.as_str()),
                    Op::Release(id, _) => Some(id.0.as_str()),
                    Op::Reserve(..) => None,
                })
                .collect();
            let mut ended = take_reservations(&mut tx, &ending).await?;
            // A settlement deletes its reservation in the transaction that records
            // it, so only a settlement whose reservation is gone can be a retry of
            // one already recorded: only those keys are looked up.
            let retried: Vec<&str> = ops
                .iter()
                .filter_map(|op| match op {
                    Op::Settle(settlement, _)
                        if !ended.contains_key(settlement.reservation.0.as_str()) =>
                    {
                        settlement.idempotency_key.as_deref()
                    }
                    _ => None,
                })
                .collect();
            let mut recorded = find_events(&mut tx, &retried).await?;

            // Only a backend with a books version carries books (see the end).
            let mut books = carried.unwrap_or_default();
            // The API keys admissions spend on, each checked live under the lock.
            let spenders: Vec<i64> = ops
                .iter()
                .filter_map(|op| match op {
                    Op::Reserve(request, _) => Some(request.spender.api_key_id),
                    _ => None,
                })
                .flatten()
                .collect();
            let admits = ops.iter().any(|op| matches!(op, Op::Reserve(..)));
            if admits {
                if let Some(version) = <$store>::BOOKS_VERSION {
                    let version: i64 = sqlx::query_scalar(version)
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(db_error)?;
                    books.check(version);
                }
                let unknown = books.unknown_keys(&spenders);
                books.know_live_keys(live_keys(&mut tx, &unknown).await?);
            }
            let mut answers = Vec::with_capacity(ops.len());
            let mut reservations = Vec::new();
            let mut events = Vec::new();
            for op in ops {
                answers.push(match op {
                    Op::Reserve(request, _) => 'reserve: {
                        if let Some(key) = request.spender.api_key_id {
                            if !books.key_is_live(key) {
                                break 'reserve Some(Answer::Reserve(Err(StoreError::NotFound {
                                    what: "api key",
                                })));
                            }
                        }
                        if books.needs_rules() {
                            let plan_row = read_plan(&mut tx, <$store>::LOCK).await?;
                            books.set_rules(&plan_row, read_limits(&mut tx).await?)?;
                        }
                        let key = books.cycle_of(request.now)?;
                        if books.needs(key) {
                            books.load(key, &read_counters(&mut tx, key).await?)?;
                        }
                        match books.reserve(request)? {
                            Decision::Block(blocked) => {
                                Some(Answer::Reserve(Ok(ReserveOutcome::Blocked(blocked))))
                            }
                            Decision::Admit(new) => {
                                let reservation = new.reservation.clone();
                                reservations.push((&**request, *new));
                                Some(Answer::Reserve(Ok(ReserveOutcome::Admitted(reservation))))
                            }
                        }
                    }
                    Op::Settle(settlement, _) => 'settle: {
                        let Some(row) = ended.remove(settlement.reservation.0.as_str()) else {
                            let retry = settlement
                                .idempotency_key
                                .as_deref()
                                .and_then(|key| recorded.remove(key));
                            break 'settle Some(Answer::Settle(match retry {
                                Some(event) => Ok(event.record(false)),
                                None => Err(StoreError::NotFound { what: "reservation" }),
                            }));
                        };
                        let (cost, estimated, over) = settlement_cost(&row, settlement.usage.as_ref())?;
                        if over && settlement.within_reservation {
                            // An error, not an answer: the batch is rolled back, so the
                            // reservation just deleted is kept.
                            return Err(usage_exceeds_reservation(cost, &row));
                        }
                        books.change(row.cycle_start, &row.served_model, cost.get(), -row.amount_nanos);
                        events.push(NewEvent {
                            row,
                            usage: settlement.usage.clone().unwrap_or_default(),
                            cost,
                            estimated,
                            over_reservation: over,
                            idempotency_key: settlement.idempotency_key.clone(),
                            now: settlement.now,
                        });
                        // Answered once its ledger row has an id.
                        None
                    }
                    Op::Release(id, _) => match ended.remove(id.0.as_str()) {
                        None => Some(Answer::Release(Err(StoreError::NotFound { what: "reservation" }))),
                        Some(row) => {
                            books.change(row.cycle_start, &row.served_model, 0, -row.amount_nanos);
                            Some(Answer::Release(Ok(())))
                        }
                    },
                });
            }
            insert_reservations(&mut tx, &reservations).await?;
            let mut inserted: std::collections::HashMap<String, EventRow> = insert_events(&mut tx, &events)
                .await?
                .into_iter()
                .filter_map(|row| Some((row.reservation_id?, row.event)))
                .collect();
            for (cycle_start, model, spent, reserved) in books.changes() {
                add_to_counters(&mut tx, cycle_start, model, spent, reserved).await?;
            }
            let answers = ops
                .iter()
                .zip(answers)
                .map(|(op, answer)| match (op, answer) {
                    (_, Some(answer)) => Ok(answer),
                    (Op::Settle(settlement, _), None) => inserted
                        .remove(&settlement.reservation.0)
                        .map(|event| Answer::Settle(Ok(event.record(true))))
                        .ok_or_else(|| StoreError::Database("a ledger row was not written".into())),
                    _ => Err(StoreError::Database("an operation was not answered".into())),
                })
                .collect::<Result<Vec<_>, _>>()?;
            tx.commit().await.map_err(db_error)?;
            Ok((answers, <$store>::BOOKS_VERSION.map(|_| books.carry_over())))
        }

        /// The rows `sql` returns for `values`: `sql` holds `{}` where the
        /// `IN (...)` list of `$2, $3, ...` goes (`$1` is the workspace), and runs
        /// once per chunk of `values`.
        async fn fetch_in<R>(
            tx: &mut Tx<'_>,
            sql: &str,
            values: &[&str],
        ) -> Result<Vec<R>, app::store::StoreError>
        where
            R: for<'r> sqlx::FromRow<'r, <$db as sqlx::Database>::Row> + Send + Unpin,
        {
            use $crate::db::books::*;
            let mut rows = Vec::with_capacity(values.len());
            for chunk in chunks(values) {
                let sql = sql.replacen("{}", &placeholders(1, chunk.len(), 2), 1);
                let mut query = sqlx::query_as(&sql).bind(WORKSPACE_ID);
                for value in chunk {
                    query = query.bind(*value);
                }
                rows.extend(query.fetch_all(&mut **tx).await.map_err(db_error)?);
            }
            Ok(rows)
        }

        /// Of the API keys `ids`, those that exist and are not revoked.
        async fn live_keys(tx: &mut Tx<'_>, ids: &[i64]) -> Result<Vec<i64>, app::store::StoreError> {
            use $crate::db::books::*;
            let mut live = Vec::with_capacity(ids.len());
            for chunk in chunks(ids) {
                let sql = format!(
                    "SELECT id FROM api_keys WHERE workspace_id = $1 AND revoked_at IS NULL AND id IN {}",
                    placeholders(1, chunk.len(), 2)
                );
                let mut query = sqlx::query_scalar::<_, i64>(&sql).bind(WORKSPACE_ID);
                for id in chunk {
                    query = query.bind(*id);
                }
                live.extend(query.fetch_all(&mut **tx).await.map_err(db_error)?);
            }
            Ok(live)
        }

        /// Ledger rows already recorded under `keys`, by key.
        async fn find_events(
            tx: &mut Tx<'_>,
            keys: &[&str],
        ) -> Result<std::collections::HashMap<String, $crate::db::books::EventRow>, app::store::StoreError> {
            use $crate::db::books::*;
            let rows: Vec<LedgerRow> = fetch_in(
                tx,
                "SELECT id, requested_model, served_model, cost_nanos, estimated, over_reservation, \
                 reservation_id, idempotency_key FROM usage_events \
                 WHERE workspace_id = $1 AND idempotency_key IN {}",
                keys,
            )
            .await?;
            Ok(rows
                .into_iter()
                .filter_map(|row| Some((row.idempotency_key?, row.event)))
                .collect())
        }

        /// Delete the reservations `ids` that still exist and return them, by id.
        async fn take_reservations(
            tx: &mut Tx<'_>,
            ids: &[&str],
        ) -> Result<std::collections::HashMap<String, $crate::db::books::ReservationRow>, app::store::StoreError> {
            use $crate::db::books::*;
            let rows: Vec<ReservationRow> = fetch_in(
                tx,
                "DELETE FROM reservations WHERE workspace_id = $1 AND id IN {} \
                 RETURNING id, cycle_start, requested_model, served_model, amount_nanos, \
                 input_eur_per_mtok, cached_input_eur_per_mtok, output_eur_per_mtok, user_id, api_key_id",
                ids,
            )
            .await?;
            Ok(rows.into_iter().map(|row| (row.id.clone(), row)).collect())
        }

        /// Insert the reservations a batch admitted.
        async fn insert_reservations(
            tx: &mut Tx<'_>,
            rows: &[(&app::store::ReserveRequest, $crate::db::batch::NewReservation)],
        ) -> Result<(), app::store::StoreError> {
            use $crate::db::books::*;
            for chunk in chunks(rows) {
                let sql = format!(
                    "INSERT INTO reservations (id, workspace_id, cycle_start, requested_model, served_model, \
                     amount_nanos, input_eur_per_mtok, cached_input_eur_per_mtok, output_eur_per_mtok, \
                     user_id, api_key_id, owner, lease_until, created_at) VALUES {}",
                    placeholders(chunk.len(), 14, 1)
                );
                let mut query = sqlx::query(&sql);
                for (request, new) in chunk {
                    query = query
                        .bind(&new.reservation.id.0)
                        .bind(WORKSPACE_ID)
                        .bind(new.cycle_start)
                        .bind(new.reservation.requested.as_str())
                        .bind(new.reservation.served.as_str())
                        .bind(new.reservation.amount.get())
                        .bind(new.prices.input.to_string())
                        .bind(new.prices.cached_input.to_string())
                        .bind(new.prices.output.to_string())
                        .bind(request.spender.user_id)
                        .bind(request.spender.api_key_id)
                        .bind(&request.owner)
                        .bind(millis(request.lease_until))
                        .bind(request.now.to_rfc3339());
                }
                query.execute(&mut **tx).await.map_err(db_error)?;
            }
            Ok(())
        }

        /// Insert ledger rows; returns them as written, in no particular order.
        ///
        /// Errors: [`app::store::StoreError::Invalid`] for a token count past
        /// `i64::MAX`.
        async fn insert_events(
            tx: &mut Tx<'_>,
            events: &[$crate::db::books::NewEvent],
        ) -> Result<Vec<$crate::db::books::LedgerRow>, app::store::StoreError> {
            use $crate::db::books::*;
            let mut inserted = Vec::with_capacity(events.len());
            for chunk in chunks(events) {
                let sql = format!(
                    "INSERT INTO usage_events (workspace_id, cycle_start, occurred_at, user_id, api_key_id, \
                     requested_model, served_model, prompt_tokens, cached_tokens, completion_tokens, \
                     reasoning_tokens, input_eur_per_mtok, cached_input_eur_per_mtok, output_eur_per_mtok, \
                     cost_nanos, reserved_nanos, estimated, over_reservation, reservation_id, idempotency_key) \
                     VALUES {} RETURNING id, requested_model, served_model, cost_nanos, estimated, \
                     over_reservation, reservation_id, idempotency_key",
                    placeholders(chunk.len(), 20, 1)
                );
                let mut query = sqlx::query_as(&sql);
                for event in chunk {
                    let row = &event.row;
                    query = query
                        .bind(WORKSPACE_ID)
                        .bind(row.cycle_start)
                        .bind(event.now.to_rfc3339())
                        .bind(row.user_id)
                        .bind(row.api_key_id)
                        .bind(&row.requested_model)
                        .bind(&row.served_model)
                        .bind(tokens(event.usage.prompt_tokens)?)
                        .bind(tokens(event.usage.cached_tokens)?)
                        .bind(tokens(event.usage.completion_tokens)?)
                        .bind(tokens(event.usage.reasoning_tokens)?)
                        .bind(&row.input_eur_per_mtok)
                        .bind(&row.cached_input_eur_per_mtok)
                        .bind(&row.output_eur_per_mtok)
                        .bind(event.cost.get())
                        .bind(row.amount_nanos)
                        .bind(event.estimated)
                        .bind(event.over_reservation)
                        .bind((!row.id.is_empty()).then_some(row.id.as_str()))
                        .bind(event.idempotency_key.as_deref());
                }
                let rows: Vec<LedgerRow> = query.fetch_all(&mut **tx).await.map_err(db_error)?;
                inserted.extend(rows);
            }
            Ok(inserted)
        }

        // Statements shared by the operations above, over this backend's transaction.
        type Tx<'c> = sqlx::Transaction<'c, $db>;

        /// A write transaction on `conn`, opened with `statement` (the backend's
        /// `BEGIN`).
        async fn begin<'c>(
            conn: &'c mut <$db as sqlx::Database>::Connection,
            statement: &'static str,
        ) -> Result<Tx<'c>, app::store::StoreError> {
            sqlx::Connection::begin_with(conn, statement)
                .await
                .map_err($crate::db::books::db_error)
        }

        /// The user matching `condition` on `$1`, if any.
        async fn find_user<T>(
            pool: &sqlx::Pool<$db>,
            condition: &str,
            value: T,
        ) -> Result<Option<app::store::UserRecord>, app::store::StoreError>
        where
            T: for<'q> sqlx::Encode<'q, $db> + sqlx::Type<$db> + Send,
        {
            use $crate::db::books::*;
            let sql = format!("SELECT id, email, password_hash, role FROM users WHERE {condition}");
            let row: Option<UserRow> = sqlx::query_as(&sql)
                .bind(value)
                .fetch_optional(pool)
                .await
                .map_err(db_error)?;
            row.map(UserRow::record).transpose()
        }

        async fn list_keys(
            pool: &sqlx::Pool<$db>,
            filter: $crate::db::books::KeyFilter<'_>,
        ) -> Result<Vec<app::store::ApiKeyRecord>, app::store::StoreError> {
            fetch_keys(pool, filter)
                .await?
                .into_iter()
                .map(|row| row.key.record())
                .collect()
        }

        /// The API keys `filter` selects, newest first, each with its owner.
        async fn fetch_keys(
            pool: &sqlx::Pool<$db>,
            filter: $crate::db::books::KeyFilter<'_>,
        ) -> Result<Vec<$crate::db::books::KeyOwnerRow>, app::store::StoreError> {
            use $crate::db::books::*;
            let condition = match filter {
                KeyFilter::Id(_) => "k.id = $2",
                KeyFilter::LiveHash(_) => "k.key_hash = $2 AND k.revoked_at IS NULL",
                KeyFilter::OwnerEmail(_) => "lower(u.email) = lower($2)",
                KeyFilter::All => "$2 = ''",
            };
            let sql = format!(
                "SELECT k.id, k.name, k.user_id, u.email AS owner_email, k.created_at, k.last_used_at, \
                 k.revoked_at, u.password_hash, u.role FROM api_keys k JOIN users u ON u.id = k.user_id \
                 WHERE k.workspace_id = $1 AND {condition} ORDER BY k.id DESC"
            );
            let query = sqlx::query_as(&sql).bind(WORKSPACE_ID);
            let query = match filter {
                KeyFilter::Id(id) => query.bind(id),
                KeyFilter::OwnerEmail(email) => query.bind(email.to_owned()),
                KeyFilter::LiveHash(hash) => query.bind(hash.to_owned()),
                KeyFilter::All => query.bind(String::new()),
            };
            query.fetch_all(pool).await.map_err(db_error)
        }

        async fn read_plan(
            tx: &mut Tx<'_>,
            lock: &str,
        ) -> Result<$crate::db::books::PlanRow, app::store::StoreError> {
            use $crate::db::books::*;
            let sql = format!(
                "SELECT p.budget_nanos, p.overage_nanos, p.plan_start, p.timezone, \
                 s.automatic_fallback, s.version AS settings_version \
                 FROM plans p JOIN settings s ON s.workspace_id = p.workspace_id \
                 WHERE p.workspace_id = $1 {lock}"
            );
            sqlx::query_as(&sql)
                .bind(WORKSPACE_ID)
                .fetch_optional(&mut **tx)
                .await
                .map_err(db_error)?
                .ok_or(app::store::StoreError::NotFound { what: "plan" })
        }

        async fn read_counters(
            tx: &mut Tx<'_>,
            cycle_start: i64,
        ) -> Result<Vec<$crate::db::books::CounterRow>, app::store::StoreError> {
            use $crate::db::books::*;
            sqlx::query_as(
                "SELECT model_id, spent_nanos, reserved_nanos FROM counters \
                 WHERE workspace_id = $1 AND cycle_start = $2",
            )
            .bind(WORKSPACE_ID)
            .bind(cycle_start)
            .fetch_all(&mut **tx)
            .await
            .map_err(db_error)
        }

        async fn read_limits(
            tx: &mut Tx<'_>,
        ) -> Result<Vec<$crate::db::books::LimitRow>, app::store::StoreError> {
            use $crate::db::books::*;
            sqlx::query_as(
                "SELECT model_id, limit_nanos, enabled, version FROM model_limits WHERE workspace_id = $1",
            )
            .bind(WORKSPACE_ID)
            .fetch_all(&mut **tx)
            .await
            .map_err(db_error)
        }

        /// Add to the workspace's and `model`'s counters of a cycle. Rows are created
        /// by the first hold or record; a negative delta only ever applies to rows
        /// that exist (CHECK constraints are tested on the proposed row of an upsert).
        async fn add_to_counters(
            tx: &mut Tx<'_>,
            cycle_start: i64,
            model: &str,
            spent_delta: i64,
            reserved_delta: i64,
        ) -> Result<(), app::store::StoreError> {
            use $crate::db::books::*;
            let sql = if spent_delta >= 0 && reserved_delta >= 0 {
                "INSERT INTO counters (workspace_id, cycle_start, model_id, spent_nanos, reserved_nanos) \
                 VALUES ($1, $2, '', $4, $5), ($1, $2, $3, $4, $5) \
                 ON CONFLICT (workspace_id, cycle_start, model_id) DO UPDATE SET \
                 spent_nanos = counters.spent_nanos + excluded.spent_nanos, \
                 reserved_nanos = counters.reserved_nanos + excluded.reserved_nanos"
            } else {
                "UPDATE counters SET spent_nanos = spent_nanos + $4, reserved_nanos = reserved_nanos + $5 \
                 WHERE workspace_id = $1 AND cycle_start = $2 AND model_id IN ('', $3)"
            };
            sqlx::query(sql)
                .bind(WORKSPACE_ID)
                .bind(cycle_start)
                .bind(model)
                .bind(spent_delta)
                .bind(reserved_delta)
                .execute(&mut **tx)
                .await
                .map_err(db_error)?;
            Ok(())
        }

        #[allow(clippy::too_many_arguments)]
        async fn audit(
            tx: &mut Tx<'_>,
            actor: &app::store::Actor,
            now: DateTime<Utc>,
            action: &str,
            subject: &str,
            old: &serde_json::Value,
            new: &serde_json::Value,
        ) -> Result<(), app::store::StoreError> {
            use $crate::db::books::*;
            sqlx::query(
                "INSERT INTO audit_log (workspace_id, at, actor, action, subject, old_value, new_value) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(WORKSPACE_ID)
            .bind(now.to_rfc3339())
            .bind(actor.to_string())
            .bind(action)
            .bind(subject)
            .bind(old.to_string())
            .bind(new.to_string())
            .execute(&mut **tx)
            .await
            .map_err(db_error)?;
            Ok(())
        }
    };
}

pub(crate) use impl_store;

/// A model limit as the audit log shows it: amounts as exact EUR strings.
pub(crate) fn limit_json(limit: &ModelLimit) -> serde_json::Value {
    serde_json::json!({
        "limit_eur": limit.limit.map(|n| n.to_money().amount().normalize().to_string()),
        "enabled": limit.enabled,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_takes_one_statement_per_kind() {
        let rows: Vec<usize> = (0..super::super::batch::MAX_BATCH).collect();
        assert_eq!(chunks(&rows).count(), 1);
        let more: Vec<usize> = (0..ROWS_PER_STATEMENT * 2 + 1).collect();
        let sizes: Vec<usize> = chunks(&more).map(<[usize]>::len).collect();
        assert_eq!(sizes, [ROWS_PER_STATEMENT, ROWS_PER_STATEMENT, 1]);
    }

    #[test]
    fn placeholders_number_rows_then_columns() {
        assert_eq!(placeholders(2, 3, 1), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(placeholders(1, 3, 2), "($2, $3, $4)");
    }
}
