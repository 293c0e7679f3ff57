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
//! - `LOCK`: the suffix that makes the plan read lock the workspace for the rest
//!   of the transaction (PostgreSQL `FOR UPDATE`; nothing on SQLite, where
//!   `BEGIN IMMEDIATE` already holds the write lock),
//! - `JSON`: how the hot path's statements unpack their one JSON array argument
//!   ([`JsonDialect`]).
//!
//! The hot path's batches (`db::batch`) run through each backend's
//! `db::batch::HotPath`: sqlx on PostgreSQL, rusqlite on SQLite (`db::sqlite`).
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
    #[sqlx(flatten)]
    pub plan: PlanFields,
    pub automatic_fallback: bool,
    pub settings_version: i64,
}

/// The plan's columns as stored: nano-euros, `YYYY-MM-DD` and an IANA name.
#[derive(sqlx::FromRow, Debug, PartialEq, Eq)]
pub(crate) struct PlanFields {
    pub budget_nanos: i64,
    pub overage_nanos: i64,
    pub plan_start: String,
    pub timezone: String,
}

impl PlanFields {
    pub fn of(plan: &PlanRecord) -> Self {
        PlanFields {
            budget_nanos: plan.amounts.budget.get(),
            overage_nanos: plan.amounts.overage.get(),
            plan_start: plan.start.format("%Y-%m-%d").to_string(),
            timezone: plan.timezone.name().to_owned(),
        }
    }

    /// Whether moving from `self` to `new` moves the bounds of the cycle that
    /// holds `now` (R1), the one whose counters are live. A start date moved by
    /// whole months on the same day (or a zone with the same midnights) moves
    /// none: its counters stay as they are, and a request admitted in the cycle
    /// before and settled in this one stays in the cycle it was booked to. A
    /// stored plan that cannot be read counts as moved.
    ///
    /// Errors: [`StoreError::Invalid`] when `now` is outside `new`'s calendar.
    pub fn recuts_cycle_at(
        &self,
        new: &PlanRecord,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let new = new.cycle_at(now)?;
        Ok(self
            .record()
            .and_then(|old| old.cycle_at(now))
            .map_or(true, |old| old != new))
    }

    /// The audit log's view: amounts as exact EUR strings.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "plan_budget_eur": eur_text(Nanos::new(self.budget_nanos)),
            "overage_limit_eur": eur_text(Nanos::new(self.overage_nanos)),
            "start": self.plan_start,
            "timezone": self.timezone,
        })
    }
}

/// A model of the catalog as the `models` table keeps it (prices as exact
/// decimal text, EUR per million tokens), in the config's order.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct CatalogRow {
    pub id: String,
    pub display_name: String,
    pub input_eur_per_mtok: String,
    pub cached_input_eur_per_mtok: String,
    pub output_eur_per_mtok: String,
    pub max_output_tokens: i64,
}

impl CatalogRow {
    /// `model` as it is stored.
    pub fn of(model: &app::domain::Model) -> CatalogRow {
        CatalogRow {
            id: model.id.to_string(),
            display_name: model.display_name.clone(),
            input_eur_per_mtok: model.prices.input.to_string(),
            cached_input_eur_per_mtok: model.prices.cached_input.to_string(),
            output_eur_per_mtok: model.prices.output.to_string(),
            max_output_tokens: i64::from(model.max_output_tokens),
        }
    }

    /// The row as the audit log shows a catalog change.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "display_name": self.display_name,
            "input_eur_per_mtok": self.input_eur_per_mtok,
            "cached_input_eur_per_mtok": self.cached_input_eur_per_mtok,
            "output_eur_per_mtok": self.output_eur_per_mtok,
            "max_output_tokens": self.max_output_tokens,
        })
    }
}

impl PlanRow {
    pub fn plan(&self) -> Result<PlanRecord, StoreError> {
        self.plan.record()
    }

    pub fn settings(&self) -> SettingsRecord {
        SettingsRecord {
            automatic_fallback: self.automatic_fallback,
            version: self.settings_version,
        }
    }
}

impl PlanFields {
    /// The stored plan read back. Errors: [`StoreError`] for a corrupt date or zone.
    pub fn record(&self) -> Result<PlanRecord, StoreError> {
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
}

#[derive(sqlx::FromRow)]
pub(crate) struct CounterRow {
    pub model_id: String,
    pub spent_nanos: i64,
    pub reserved_nanos: i64,
}

/// One row of [`HotSql::read_books`]: a model limit, a counter or a live API key.
#[derive(sqlx::FromRow, serde::Deserialize)]
pub(crate) struct BooksRow {
    /// `limit`, `counter` or `key`.
    pub kind: String,
    /// The model's id; empty for a key.
    pub model_id: String,
    /// A limit's nano-euros (none when unset), a counter's spent nano-euros, or
    /// a key's id.
    pub amount: Option<i64>,
    /// A counter's reserved nano-euros.
    pub reserved: i64,
    /// A limit's enabled toggle.
    pub enabled: bool,
    /// A limit's version.
    pub version: i64,
}

/// What [`HotSql::read_books`] read, sorted by kind.
#[derive(Default)]
pub(crate) struct ReadBooks {
    pub limits: Vec<LimitRow>,
    pub counters: Vec<CounterRow>,
    /// Ids of live API keys.
    pub live_keys: Vec<i64>,
}

impl ReadBooks {
    /// Sort `rows` by kind.
    ///
    /// Errors: [`StoreError::Database`] for a row of no known kind, or a counter
    /// or key without its amount.
    pub fn sort(rows: Vec<BooksRow>) -> Result<ReadBooks, StoreError> {
        let mut books = ReadBooks::default();
        let missing = || StoreError::Database("a books row without its amount".into());
        for row in rows {
            match row.kind.as_str() {
                "limit" => books.limits.push(LimitRow {
                    model_id: row.model_id,
                    limit_nanos: row.amount,
                    enabled: row.enabled,
                    version: row.version,
                }),
                "counter" => books.counters.push(CounterRow {
                    model_id: row.model_id,
                    spent_nanos: row.amount.ok_or_else(missing)?,
                    reserved_nanos: row.reserved,
                }),
                "key" => books.live_keys.push(row.amount.ok_or_else(missing)?),
                other => return Err(StoreError::Database(format!("a books row of kind {other}"))),
            }
        }
        Ok(books)
    }
}

/// What a batch reads before its operations, in one call where the backend can
/// (`db::batch::HotPath::open`; on PostgreSQL [`BatchFunctions::open_call`],
/// in the round trip of the batch's `BEGIN`).
pub(crate) struct Opened {
    /// The holds the batch ends, deleted.
    pub ended: Vec<ReservationRow>,
    /// When the batch admits: the plan row, locked, and the books read after
    /// its lock.
    pub admitting: Option<OpenedBooks>,
}

/// The books an admitting batch read after the plan's lock ([`Opened`]).
pub(crate) struct OpenedBooks {
    /// The plan row, until the batch's first admission takes it.
    pub plan: Option<PlanRow>,
    /// The `cycle_start` of the latest cycle that has counters; none when no
    /// cycle has any yet.
    pub latest_cycle: Option<i64>,
    /// Every model limit, the counters of `latest_cycle`, and which of the
    /// batch's API keys are live.
    pub books: ReadBooks,
}

impl OpenedBooks {
    /// The books for the cycle keyed `cycle_start`. Those read when it is the
    /// latest cycle with counters; when it is later (the cycle's first batch),
    /// the same without counters, as it has none yet; none when it is earlier
    /// (a request stamped just before the cycle turned, say), whose counters
    /// were not read: the caller reads them ([`HotSql::read_books`]).
    pub fn of_cycle(self, cycle_start: i64) -> Option<ReadBooks> {
        match self.latest_cycle {
            Some(latest) if latest > cycle_start => None,
            Some(latest) if latest < cycle_start => Some(ReadBooks {
                counters: Vec::new(),
                ..self.books
            }),
            _ => Some(self.books),
        }
    }
}

/// A [`PlanRow`] as the JSON object [`BatchFunctions::open_call`] returns (serde's
/// `flatten` would read it through floats).
#[derive(serde::Deserialize)]
struct PlanJson {
    budget_nanos: i64,
    overage_nanos: i64,
    plan_start: String,
    timezone: String,
    automatic_fallback: bool,
    settings_version: i64,
}

impl From<PlanJson> for PlanRow {
    fn from(row: PlanJson) -> PlanRow {
        PlanRow {
            plan: PlanFields {
                budget_nanos: row.budget_nanos,
                overage_nanos: row.overage_nanos,
                plan_start: row.plan_start,
                timezone: row.timezone,
            },
            automatic_fallback: row.automatic_fallback,
            settings_version: row.settings_version,
        }
    }
}

impl Opened {
    /// What [`BatchFunctions::open_call`] returned, as `(kind, JSON object)` rows:
    /// `hold` ([`ReservationRow`]), `plan` ([`PlanRow`]), `cycle` (the latest
    /// counted cycle's start, or `null`) and `books` ([`BooksRow`]). The `cycle`
    /// row comes whenever the books were read, even with no plan.
    ///
    /// Errors: [`StoreError::NotFound`] when the books were read but the
    /// workspace has no plan; [`StoreError::Database`] for a row that cannot be
    /// read.
    pub fn from_rows(rows: Vec<(String, String)>) -> Result<Opened, StoreError> {
        fn parse<T: serde::de::DeserializeOwned>(kind: &str, data: &str) -> Result<T, StoreError> {
            serde_json::from_str(data).map_err(|e| {
                StoreError::Database(format!("a {kind} row of the batch's opening: {e}"))
            })
        }
        let mut ended = Vec::new();
        let mut plan = None;
        let mut latest_cycle = None;
        let mut admitting = false;
        let mut books = Vec::new();
        for (kind, data) in rows {
            match kind.as_str() {
                "hold" => ended.push(parse(&kind, &data)?),
                "plan" => plan = Some(PlanRow::from(parse::<PlanJson>(&kind, &data)?)),
                "cycle" => {
                    admitting = true;
                    latest_cycle = parse(&kind, &data)?;
                }
                "books" => books.push(parse(&kind, &data)?),
                other => {
                    return Err(StoreError::Database(format!(
                        "a row of kind {other} in the batch's opening"
                    )))
                }
            }
        }
        let admitting = match admitting {
            true => Some(OpenedBooks {
                plan: Some(plan.ok_or(StoreError::NotFound { what: "plan" })?),
                latest_cycle,
                books: ReadBooks::sort(books)?,
            }),
            false => None,
        };
        Ok(Opened { ended, admitting })
    }
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

#[derive(sqlx::FromRow, Clone, serde::Serialize, serde::Deserialize)]
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
    /// When the request was admitted, RFC 3339 in UTC: the instant that chose
    /// its cycle (R1). `None` for usage recorded without a hold, and for a hold
    /// that lapsed before this was kept.
    #[serde(default)]
    pub created_at: Option<String>,
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
    pub lease_expired: bool,
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
            lease_expired: self.lease_expired,
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

/// Selects the [`RecordedRow`] of the workspace (`$1`) under an idempotency key (`$2`).
pub(crate) const RECORDED_BY_KEY: &str = "SELECT id, requested_model, served_model, cost_nanos, \
     estimated, over_reservation, lease_expired, prompt_tokens, cached_tokens, completion_tokens, \
     reasoning_tokens FROM usage_events WHERE workspace_id = $1 AND idempotency_key = $2";

/// A ledger row as `Store::usage_events` lists it.
#[derive(sqlx::FromRow)]
pub(crate) struct UsageListingRow {
    #[sqlx(flatten)]
    pub recorded: RecordedRow,
    pub occurred_at: String,
    pub cycle_start: i64,
    pub email: Option<String>,
    pub api_key_id: Option<i64>,
    pub idempotency_key: Option<String>,
}

/// Selects the last `$3` [`UsageListingRow`]s of the workspace (`$1`), newest
/// first; only the flagged ones when `$2` is true.
pub(crate) const USAGE_LISTING: &str = "SELECT e.id, e.requested_model, e.served_model, \
     e.cost_nanos, e.estimated, e.over_reservation, e.lease_expired, e.prompt_tokens, \
     e.cached_tokens, e.completion_tokens, e.reasoning_tokens, e.occurred_at, e.cycle_start, \
     u.email, e.api_key_id, e.idempotency_key \
     FROM usage_events e LEFT JOIN users u ON u.id = e.user_id \
     WHERE e.workspace_id = $1 AND (NOT $2 OR e.estimated OR e.over_reservation OR e.lease_expired) \
     ORDER BY e.id DESC LIMIT $3";

impl UsageListingRow {
    /// The row as the store lists it.
    ///
    /// Errors: [`StoreError::Database`] for a corrupt row (a negative count, an
    /// instant that does not parse).
    pub fn listing(self) -> Result<app::store::UsageListing, StoreError> {
        let occurred_at = instant("usage_events.occurred_at", &self.occurred_at)?;
        let cycle_start = DateTime::from_timestamp(self.cycle_start, 0)
            .ok_or_else(|| corrupt("usage_events.cycle_start", self.cycle_start))?;
        let usage = self.recorded.recorded_usage()?.usage;
        let event = self.recorded.event;
        Ok(app::store::UsageListing {
            id: event.id,
            occurred_at,
            cycle_start,
            user_email: self.email,
            api_key_id: self.api_key_id,
            requested: ModelId::new(event.requested_model),
            served: ModelId::new(event.served_model),
            usage,
            cost: Nanos::new(event.cost_nanos),
            estimated: event.estimated,
            over_reservation: event.over_reservation,
            lease_expired: event.lease_expired,
            idempotency_key: self.idempotency_key,
        })
    }
}

impl RecordedRow {
    /// What this row counted: its usage, or none when it billed an estimate.
    ///
    /// Errors: [`StoreError::Database`] for a negative token count (a corrupt row).
    pub fn recorded_usage(&self) -> Result<app::store::RecordedUsage, StoreError> {
        let count = |value: i64| u64::try_from(value).map_err(|e| corrupt("token count", e));
        let usage = Usage {
            prompt_tokens: count(self.prompt_tokens)?,
            cached_tokens: count(self.cached_tokens)?,
            completion_tokens: count(self.completion_tokens)?,
            reasoning_tokens: count(self.reasoning_tokens)?,
        };
        Ok(app::store::RecordedUsage {
            usage: (!self.event.estimated).then_some(usage),
        })
    }

    /// Whether this row counted `usage` of `record`'s model: the one it resolves
    /// to now, or the one it names (the model the row recorded may have become
    /// an alias since).
    ///
    /// Errors: [`StoreError::Invalid`] for a token count past `i64::MAX`.
    pub fn is_same(&self, record: &app::store::UsageRecord<'_>) -> Result<bool, StoreError> {
        let usage = &record.usage;
        let model = self.event.served_model.as_str();
        Ok(
            (model == record.model.id.as_str() || model == record.model_as_sent)
                && self.prompt_tokens == tokens(usage.prompt_tokens)?
                && self.cached_tokens == tokens(usage.cached_tokens)?
                && self.completion_tokens == tokens(usage.completion_tokens)?
                && self.reasoning_tokens == tokens(usage.reasoning_tokens)?,
        )
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

impl LedgerRow {
    /// A ledger row from a JSON object of its columns, as
    /// [`BatchFunctions::write_call`] returns them.
    ///
    /// Errors: [`StoreError::Database`] when `json` is not one.
    pub fn from_json(json: &str) -> Result<LedgerRow, StoreError> {
        // Field by field: serde's `flatten` would buffer the object first.
        #[derive(serde::Deserialize)]
        struct Columns {
            id: i64,
            requested_model: String,
            served_model: String,
            cost_nanos: i64,
            estimated: bool,
            over_reservation: bool,
            lease_expired: bool,
            reservation_id: Option<String>,
            idempotency_key: Option<String>,
        }
        let row: Columns = serde_json::from_str(json)
            .map_err(|e| StoreError::Database(format!("a ledger row written by a batch: {e}")))?;
        Ok(LedgerRow {
            event: EventRow {
                id: row.id,
                requested_model: row.requested_model,
                served_model: row.served_model,
                cost_nanos: row.cost_nanos,
                estimated: row.estimated,
                over_reservation: row.over_reservation,
                lease_expired: row.lease_expired,
            },
            reservation_id: row.reservation_id,
            idempotency_key: row.idempotency_key,
        })
    }
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
    /// Billed from a hold whose lease had expired (R7).
    pub lease_expired: bool,
    pub idempotency_key: Option<String>,
    pub now: DateTime<Utc>,
}

/// How a column of a hot-path table is read out of a JSON row ([`HotSql`]).
#[derive(Clone, Copy)]
enum Json {
    Text,
    Integer,
    Boolean,
}

/// The columns a batch writes to `reservations`: the keys of [`NewReservationRow`].
const RESERVATION_COLUMNS: &[(&str, Json)] = &[
    ("id", Json::Text),
    ("cycle_start", Json::Integer),
    ("requested_model", Json::Text),
    ("served_model", Json::Text),
    ("amount_nanos", Json::Integer),
    ("input_eur_per_mtok", Json::Text),
    ("cached_input_eur_per_mtok", Json::Text),
    ("output_eur_per_mtok", Json::Text),
    ("user_id", Json::Integer),
    ("api_key_id", Json::Integer),
    ("owner", Json::Text),
    ("lease_until", Json::Integer),
    ("created_at", Json::Text),
];

/// The columns a ledger row is written with: the keys of [`NewEventRow`].
const EVENT_COLUMNS: &[(&str, Json)] = &[
    ("cycle_start", Json::Integer),
    ("occurred_at", Json::Text),
    ("admitted_at", Json::Text),
    ("user_id", Json::Integer),
    ("api_key_id", Json::Integer),
    ("requested_model", Json::Text),
    ("served_model", Json::Text),
    ("prompt_tokens", Json::Integer),
    ("cached_tokens", Json::Integer),
    ("completion_tokens", Json::Integer),
    ("reasoning_tokens", Json::Integer),
    ("input_eur_per_mtok", Json::Text),
    ("cached_input_eur_per_mtok", Json::Text),
    ("output_eur_per_mtok", Json::Text),
    ("cost_nanos", Json::Integer),
    ("reserved_nanos", Json::Integer),
    ("estimated", Json::Boolean),
    ("over_reservation", Json::Boolean),
    ("lease_expired", Json::Boolean),
    ("reservation_id", Json::Text),
    ("idempotency_key", Json::Text),
];

/// The columns a reservation is read back with, a [`ReservationRow`], as a
/// literal for `concat!` (SQLite's hot path reads the same ones).
macro_rules! reservation_columns {
    () => {
        "id, cycle_start, requested_model, served_model, amount_nanos, input_eur_per_mtok, \
         cached_input_eur_per_mtok, output_eur_per_mtok, user_id, api_key_id, created_at"
    };
}
pub(crate) use reservation_columns;

/// What a reservation is returned with when a batch ends it.
const RESERVATION_RETURNING: &str = reservation_columns!();

/// What a user is read or returned with: a [`UserRow`].
pub(crate) const USER_COLUMNS: &str = "id, email, password_hash, role, session_epoch";

/// What a ledger row is returned with: a [`LedgerRow`].
const LEDGER_RETURNING: &str = "id, requested_model, served_model, cost_nanos, estimated, \
    over_reservation, lease_expired, reservation_id, idempotency_key";

/// The hot path's statements for one backend.
///
/// Each statement takes all its rows (or values) as one JSON array, its only
/// argument, which the database unpacks (SQLite `json_each`, PostgreSQL
/// `json_array_elements`). So every statement has one shape whatever the batch's
/// size, and stays prepared.
///
/// A batch's calls depend on what it holds and on the backend (see
/// `db::batch::HotPath`). PostgreSQL runs each statement on its own, in a round
/// trip: they are cut by statements that do several things: all that a batch
/// reads before deciding goes in one call (the holds it ends, the plan's lock,
/// the limits, counters and keys), and all its writes in one statement
/// ([`HotSql::write`]). Both are functions of the session ([`BatchFunctions`]),
/// sent with `BEGIN` and `COMMIT`, so a batch that admits and settles takes two
/// round trips (four with `BEGIN` and `COMMIT` on their own, six before the one
/// call, and ten with one statement each). On SQLite the statements run in the
/// batcher's own thread, where a call costs no round trip.
pub(crate) struct HotSql {
    /// Deletes the reservations whose ids are given, returning [`ReservationRow`]s.
    pub take_reservations: String,
    /// As [`HotSql::take_reservations`], from the lapsed holds.
    pub take_lapsed: String,
    /// The ledger rows recorded under the idempotency keys given, as [`LedgerRow`]s.
    pub find_events: String,
    /// What an admission reads after the plan, in one round trip, as
    /// [`BooksRow`]s: every model limit, the counters of the cycle keyed `$1`,
    /// and which of the API key ids given as `$2` (a JSON array) are live.
    pub read_books: String,
    /// Inserts [`NewEventRow`]s, returning [`LedgerRow`]s.
    pub insert_events: String,
    /// Adds [`CounterChange`]s to their counter rows, creating the missing ones,
    /// in one or two statements (each takes the changes).
    pub add_to_counters: Vec<String>,
    /// On PostgreSQL, the two functions through which a batch goes in two
    /// round trips (see [`BatchFunctions`]), made on each connection of the hot
    /// path before its first batch.
    pub functions: Option<BatchFunctions>,
    /// On PostgreSQL, a batch's writes as one statement (data-modifying `WITH`
    /// queries), one round trip: inserts the new reservations
    /// ([`NewReservationRow`]s), then as [`HotSql::insert_events`] and
    /// [`HotSql::add_to_counters`]; binds the new reservations, the ledger rows
    /// and the counter changes; returns the ledger rows.
    pub write: Option<String>,
}

/// The columns of a [`CounterChange`] read out of a row `r`, named as its fields.
fn change_columns() -> String {
    let columns: Vec<String> = COUNTER_COLUMNS
        .iter()
        .map(|(name, kind)| format!("{} AS {name}", column(name, *kind)))
        .collect();
    columns.join(", ")
}

/// PostgreSQL: the counter changes of argument `$param` as `c`, and `changed`,
/// the counter rows that existed, with the changes added.
fn pg_counter_changes(param: usize) -> String {
    format!(
        "c AS (SELECT {} FROM {}), \
         changed AS (UPDATE counters SET spent_nanos = counters.spent_nanos + c.spent_nanos, \
         reserved_nanos = counters.reserved_nanos + c.reserved_nanos \
         FROM c WHERE counters.workspace_id = {WORKSPACE_ID} \
         AND counters.cycle_start = c.cycle_start AND counters.model_id = c.model_id \
         RETURNING counters.cycle_start, counters.model_id)",
        change_columns(),
        JsonDialect::JsonbElements.rows(param)
    )
}

/// PostgreSQL: inserts the counter rows of `c` that `changed` did not find, with
/// their changes (see [`pg_counter_changes`]).
fn pg_counters_created() -> String {
    format!(
        "INSERT INTO counters (workspace_id, cycle_start, model_id, spent_nanos, reserved_nanos) \
         SELECT {WORKSPACE_ID}, c.cycle_start, c.model_id, c.spent_nanos, c.reserved_nanos FROM c \
         WHERE NOT EXISTS (SELECT 1 FROM changed \
         WHERE changed.cycle_start = c.cycle_start AND changed.model_id = c.model_id)"
    )
}

impl Json {
    fn sql_type(self) -> &'static str {
        match self {
            Json::Text => "text",
            Json::Integer => "bigint",
            Json::Boolean => "boolean",
        }
    }
}

/// The columns of a [`CounterChange`].
const COUNTER_COLUMNS: &[(&str, Json)] = &[
    ("cycle_start", Json::Integer),
    ("model_id", Json::Text),
    ("spent_nanos", Json::Integer),
    ("reserved_nanos", Json::Integer),
];

/// How a backend unpacks the one JSON array argument of a [`HotSql`] statement,
/// and how it adds to counters.
#[derive(Clone, Copy)]
pub(crate) enum JsonDialect {
    /// `json_each(?)` (SQLite).
    JsonEach,
    /// `jsonb_array_elements($1)` (PostgreSQL; with `json` instead of `jsonb`,
    /// every `->>` parses its row again: the gateway's added median at 2,000
    /// requests/s was 21 ms, against 8-9 ms with `jsonb`).
    JsonbElements,
}

impl JsonDialect {
    /// What a statement that reads [`JsonDialect::rows`] starts with.
    ///
    /// On SQLite, a CTE that makes each row's text once. `json_each` makes its
    /// `value` column anew for every reference, and a row of fifteen columns read
    /// as `r.value ->> 'name'` was made fifteen times: with 64 connections that
    /// was about a sixth of the gateway process's CPU time (perf).
    fn with_rows(self) -> &'static str {
        match self {
            JsonDialect::JsonEach => {
                "WITH r (value) AS MATERIALIZED (SELECT value FROM json_each(?)) "
            }
            JsonDialect::JsonbElements => "",
        }
    }

    /// The rows (objects) of the argument as a `FROM` item `r`, in a statement
    /// that starts with [`JsonDialect::with_rows`]. On PostgreSQL the argument is
    /// the statement's `$param` (SQLite's `?` are numbered by their order).
    fn rows(self, param: usize) -> String {
        match self {
            JsonDialect::JsonEach => "r".to_owned(),
            JsonDialect::JsonbElements => {
                format!("jsonb_array_elements(CAST(${param} AS jsonb)) AS r")
            }
        }
    }

    /// A condition: `column` (of type `json`) is one of the argument's scalars.
    /// On PostgreSQL as `= ANY` of an array built once: measured with the
    /// gateway bench at 2,000 requests/s, its added median was 7.1-7.5 ms, and
    /// 10.5-10.9 ms with `IN` over the set-returning function.
    fn any(self, column: &str, json: Json) -> String {
        self.any_of(column, json, None)
    }

    /// As [`JsonDialect::any`], with the argument `$param` instead of the next
    /// (SQLite `?`) or the first (PostgreSQL).
    fn any_of(self, column: &str, json: Json, param: Option<usize>) -> String {
        match self {
            JsonDialect::JsonEach => {
                let param = param.map_or("?".to_owned(), |n| format!("${n}"));
                format!("{column} IN (SELECT r.value FROM json_each({param}) AS r)")
            }
            JsonDialect::JsonbElements => format!(
                "{column} = ANY(ARRAY(SELECT CAST(r.value AS {}) \
                 FROM jsonb_array_elements_text(CAST(${} AS jsonb)) AS r))",
                json.sql_type(),
                param.unwrap_or(1)
            ),
        }
    }
}

/// Column `name` of a row of [`JsonDialect::rows`], as SQL of its type.
fn column(name: &str, json: Json) -> String {
    match json {
        Json::Text => format!("r.value ->> '{name}'"),
        json => format!("CAST(r.value ->> '{name}' AS {})", json.sql_type()),
    }
}

impl HotSql {
    /// The statements for a backend that opens a transaction with `begin`, reads
    /// its books' version with `version`, and unpacks JSON as `json` says.
    pub fn new(json: JsonDialect) -> HotSql {
        // An insert of the rows of argument `param` into `table`.
        let insert = |table: &str, columns: &[(&str, Json)], param: usize| {
            let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
            let values: Vec<String> = columns
                .iter()
                .map(|(name, kind)| column(name, *kind))
                .collect();
            format!(
                "{}INSERT INTO {table} (workspace_id, {}) SELECT {WORKSPACE_ID}, {} FROM {}",
                json.with_rows(),
                names.join(", "),
                values.join(", "),
                json.rows(param)
            )
        };
        let reservation_ids = json.any("id", Json::Text);
        let (with_rows, rows) = (json.with_rows(), json.rows(1));
        let changes = change_columns();
        let take_reservations = format!(
            "DELETE FROM reservations WHERE workspace_id = {WORKSPACE_ID} \
             AND {reservation_ids} RETURNING {RESERVATION_RETURNING}"
        );
        HotSql {
            take_reservations: take_reservations.clone(),
            take_lapsed: format!(
                "DELETE FROM lapsed_reservations WHERE workspace_id = {WORKSPACE_ID} \
                 AND {reservation_ids} RETURNING {RESERVATION_RETURNING}"
            ),
            find_events: format!(
                "SELECT {LEDGER_RETURNING} FROM usage_events WHERE workspace_id = {WORKSPACE_ID} \
                 AND {}",
                json.any("idempotency_key", Json::Text)
            ),
            read_books: read_books(json, "$1", 2),
            insert_events: format!(
                "{} RETURNING {LEDGER_RETURNING}",
                insert("usage_events", EVENT_COLUMNS, 1)
            ),
            add_to_counters: match json {
                // Rows missing are created at zero, then every row is changed. A
                // counter never goes below zero (its CHECK), so a negative change
                // cannot go in through an upsert's proposed row.
                JsonDialect::JsonEach => vec![
                    // `WHERE true` tells SQLite's parser ON CONFLICT is not a join's.
                    format!(
                        "{with_rows}INSERT INTO counters (workspace_id, cycle_start, model_id, spent_nanos, reserved_nanos) \
                         SELECT {WORKSPACE_ID}, c.cycle_start, c.model_id, 0, 0 \
                         FROM (SELECT {changes} FROM {rows}) AS c WHERE true \
                         ON CONFLICT (workspace_id, cycle_start, model_id) DO NOTHING"
                    ),
                    format!(
                        "{with_rows}UPDATE counters SET spent_nanos = counters.spent_nanos + c.spent_nanos, \
                         reserved_nanos = counters.reserved_nanos + c.reserved_nanos \
                         FROM (SELECT {changes} FROM {rows}) AS c WHERE counters.workspace_id = {WORKSPACE_ID} \
                         AND counters.cycle_start = c.cycle_start AND counters.model_id = c.model_id"
                    ),
                ],
                // One statement, one round trip: the rows that exist are changed,
                // the others inserted with the change. Writers that could create
                // the same row hold the plan row's lock.
                JsonDialect::JsonbElements => {
                    vec![format!("WITH {} {}", pg_counter_changes(1), pg_counters_created())]
                }
            },
            functions: matches!(json, JsonDialect::JsonbElements).then(|| {
                let open = format!(
                    "CREATE OR REPLACE FUNCTION {OPEN_BATCH}(text, boolean, text) \
                     RETURNS TABLE (kind text, data text) LANGUAGE plpgsql AS $body$ \
                     DECLARE latest bigint; \
                     BEGIN \
                     RETURN QUERY WITH t AS ({take_reservations}) SELECT 'hold', CAST(to_jsonb(t) AS text) FROM t; \
                     IF $2 THEN \
                     RETURN QUERY SELECT 'plan', CAST(to_jsonb(p) AS text) FROM ({}) AS p; \
                     SELECT max(cycle_start) INTO latest FROM counters WHERE workspace_id = {WORKSPACE_ID}; \
                     RETURN QUERY SELECT 'cycle', COALESCE(CAST(latest AS text), 'null'); \
                     RETURN QUERY SELECT 'books', CAST(to_jsonb(b) AS text) FROM ({}) AS b; \
                     END IF; \
                     END $body$",
                    plan_select(&WORKSPACE_ID.to_string(), "FOR UPDATE"),
                    read_books(json, "latest", 3),
                );
                // The one-statement write below, each ledger row returned as
                // a JSON object of its [`LedgerRow`] columns: a function whose
                // result named a table's type would depend on the table, which
                // a migration could then not drop or change while a replica
                // has it.
                let write = format!(
                    "CREATE OR REPLACE FUNCTION {WRITE_BATCH}(text, text, text) \
                     RETURNS SETOF text LANGUAGE plpgsql AS $body$ \
                     BEGIN \
                     RETURN QUERY WITH new_reservations AS ({}), {}, created AS ({}), \
                     inserted AS ({} RETURNING {LEDGER_RETURNING}) \
                     SELECT CAST(to_jsonb(inserted) AS text) FROM inserted; \
                     END $body$",
                    insert("reservations", RESERVATION_COLUMNS, 1),
                    pg_counter_changes(3),
                    pg_counters_created(),
                    insert("usage_events", EVENT_COLUMNS, 2),
                );
                BatchFunctions {
                    create: format!(
                        "SET standard_conforming_strings = on; {open}; {write}"
                    ),
                }
            }),
            write: matches!(json, JsonDialect::JsonbElements).then(|| {
                format!(
                    "WITH new_reservations AS ({}), {}, created AS ({}) \
                     {} RETURNING {LEDGER_RETURNING}",
                    insert("reservations", RESERVATION_COLUMNS, 1),
                    pg_counter_changes(3),
                    pg_counters_created(),
                    insert("usage_events", EVENT_COLUMNS, 2),
                )
            }),
        }
    }
}

/// Reads the workspace's [`PlanRow`] (the workspace's id bound as `$1`), with
/// `lock` after it (the backend's `LOCK`).
pub(crate) fn plan_query(lock: &str) -> String {
    plan_select("$1", lock)
}

/// As [`plan_query`], for the workspace whose id is the SQL `workspace`.
fn plan_select(workspace: &str, lock: &str) -> String {
    format!(
        "SELECT p.budget_nanos, p.overage_nanos, p.plan_start, p.timezone, \
         s.automatic_fallback, s.version AS settings_version \
         FROM plans p JOIN settings s ON s.workspace_id = p.workspace_id \
         WHERE p.workspace_id = {workspace} {lock}"
    )
}

/// [`HotSql::read_books`] for the cycle whose key is the SQL `cycle`, with the
/// API key ids as the JSON array argument `$keys`.
fn read_books(json: JsonDialect, cycle: &str, keys: usize) -> String {
    format!(
        "SELECT 'limit' AS kind, model_id, limit_nanos AS amount, CAST(0 AS bigint) AS reserved, \
         enabled, version FROM model_limits WHERE workspace_id = {WORKSPACE_ID} \
         UNION ALL SELECT 'counter', model_id, spent_nanos, reserved_nanos, false, 0 \
         FROM counters WHERE workspace_id = {WORKSPACE_ID} AND cycle_start = {cycle} \
         UNION ALL SELECT 'key', '', id, 0, false, 0 FROM api_keys \
         WHERE workspace_id = {WORKSPACE_ID} AND revoked_at IS NULL AND {}",
        json.any_of("id", Json::Integer, Some(keys))
    )
}

/// The name of the function of [`BatchFunctions`] that opens a batch, in the
/// session's own schema.
const OPEN_BATCH: &str = "pg_temp.tollgate_open_batch";

/// The name of the function of [`BatchFunctions`] that writes a batch.
const WRITE_BATCH: &str = "pg_temp.tollgate_write_batch";

/// On PostgreSQL, the hot path in two round trips a batch: the batch's `BEGIN`
/// and everything it reads before deciding go in one, its writes and `COMMIT`
/// in the other. Each is a call of a function the session makes for itself,
/// sent with the statement beside it as one simple query (the protocol that
/// takes several statements at once), so its arguments are written into the
/// text as string literals ([`sql_text`]): a function call is all the server
/// parses, and the function keeps its statements' plans.
///
/// The first function deletes the holds whose ids are its first argument (a
/// JSON array) as [`HotSql::take_reservations`], and when its second is true
/// locks and reads the plan row ([`plan_query`]), then reads what
/// [`HotSql::read_books`] does, with the API key ids of its third argument, for
/// the latest cycle that has counters (which it also returns). Each of its
/// statements sees what was committed before it began (a PL/pgSQL function's
/// statements take their snapshots one by one under READ COMMITTED), so the
/// books are read as the writer before this one left them, as they are when
/// read in a statement of their own after the lock. What it returns is read by
/// [`Opened::from_rows`]. The second is [`HotSql::write`], returning the
/// ledger rows it inserts.
///
/// Temporary functions (`pg_temp`), made from this module's statements by the
/// process that calls them: replicas of different versions never share one,
/// and nothing is added to the schema.
pub(crate) struct BatchFunctions {
    /// Sets the session's `standard_conforming_strings` on, which
    /// [`sql_text`] relies on, and makes both functions (`CREATE OR REPLACE`):
    /// three statements, sent as one simple query, applied all or none.
    pub create: String,
}

impl BatchFunctions {
    /// The opening call, after `begin` (the statement that opens the batch's
    /// transaction) unless it was sent already: deletes and returns the holds of `ids`
    /// (a JSON array of reservation ids), and when `read_books` is true the
    /// plan, locked, and the books for the API key ids `spenders` (a JSON
    /// array); rows of `kind` and `data`, both text.
    pub fn open_call(
        &self,
        begin: Option<&str>,
        ids: &str,
        read_books: bool,
        spenders: &str,
    ) -> String {
        format!(
            "{}SELECT kind, data FROM {OPEN_BATCH}({}, {read_books}, {})",
            begin.map_or_else(String::new, |begin| format!("{begin}; ")),
            sql_text(ids),
            sql_text(spenders)
        )
    }

    /// The writing call, `COMMIT` after it: binds the new reservations, the
    /// ledger rows and the counter changes (JSON arrays, as [`HotSql::write`]);
    /// returns the ledger rows written, one JSON object each in the only
    /// column, as [`LedgerRow::from_json`] reads them.
    pub fn write_call(&self, reservations: &str, events: &str, counters: &str) -> String {
        format!(
            "SELECT row FROM {WRITE_BATCH}({}, {}, {}) AS row; COMMIT",
            sql_text(reservations),
            sql_text(events),
            sql_text(counters)
        )
    }
}

/// `text` as a PostgreSQL string constant: in single quotes, each single quote
/// inside doubled, every other character as it is. That is the whole rule while
/// `standard_conforming_strings` is on, as [`BatchFunctions::create`] sets it
/// in the sessions that use this (with it off, a backslash would escape).
fn sql_text(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A JSON array of `rows`, the one argument of a [`HotSql`] statement.
///
/// Errors: [`StoreError::Database`] if a row cannot be written as JSON.
pub(crate) fn json_rows<T: serde::Serialize>(rows: &[T]) -> Result<String, StoreError> {
    serde_json::to_string(rows).map_err(|e| StoreError::Database(format!("rows as JSON: {e}")))
}

/// A reservation as a batch writes it (`db::batch::HotPath::write`).
#[derive(serde::Serialize)]
pub(crate) struct NewReservationRow<'a> {
    /// What a batch that ends it reads back.
    #[serde(flatten)]
    pub row: ReservationRow,
    pub owner: &'a str,
    /// Unix milliseconds.
    pub lease_until: i64,
}

/// A ledger row as [`HotSql::insert_events`] takes it.
#[derive(serde::Serialize)]
pub(crate) struct NewEventRow<'a> {
    pub cycle_start: i64,
    /// RFC 3339.
    pub occurred_at: String,
    /// RFC 3339: when the hold it settles was taken ([`ReservationRow::created_at`]).
    pub admitted_at: Option<&'a str>,
    pub user_id: Option<i64>,
    pub api_key_id: Option<i64>,
    pub requested_model: &'a str,
    pub served_model: &'a str,
    pub prompt_tokens: i64,
    pub cached_tokens: i64,
    pub completion_tokens: i64,
    pub reasoning_tokens: i64,
    pub input_eur_per_mtok: &'a str,
    pub cached_input_eur_per_mtok: &'a str,
    pub output_eur_per_mtok: &'a str,
    /// Nano-euros charged.
    pub cost_nanos: i64,
    /// Nano-euros that were held for it.
    pub reserved_nanos: i64,
    pub estimated: bool,
    pub over_reservation: bool,
    pub lease_expired: bool,
    pub reservation_id: Option<&'a str>,
    pub idempotency_key: Option<&'a str>,
}

impl NewEvent {
    /// This ledger row as [`HotSql::insert_events`] takes it.
    ///
    /// Errors: [`StoreError::Invalid`] for a token count past `i64::MAX`.
    pub fn json_row(&self) -> Result<NewEventRow<'_>, StoreError> {
        let row = &self.row;
        Ok(NewEventRow {
            cycle_start: row.cycle_start,
            occurred_at: self.now.to_rfc3339(),
            admitted_at: row.created_at.as_deref(),
            user_id: row.user_id,
            api_key_id: row.api_key_id,
            requested_model: &row.requested_model,
            served_model: &row.served_model,
            prompt_tokens: tokens(self.usage.prompt_tokens)?,
            cached_tokens: tokens(self.usage.cached_tokens)?,
            completion_tokens: tokens(self.usage.completion_tokens)?,
            reasoning_tokens: tokens(self.usage.reasoning_tokens)?,
            input_eur_per_mtok: &row.input_eur_per_mtok,
            cached_input_eur_per_mtok: &row.cached_input_eur_per_mtok,
            output_eur_per_mtok: &row.output_eur_per_mtok,
            cost_nanos: self.cost.get(),
            reserved_nanos: row.amount_nanos,
            estimated: self.estimated,
            over_reservation: self.over_reservation,
            lease_expired: self.lease_expired,
            reservation_id: (!row.id.is_empty()).then_some(row.id.as_str()),
            idempotency_key: self.idempotency_key.as_deref(),
        })
    }
}

/// A change to one counter row, as [`HotSql::add_to_counters`] takes it.
#[derive(serde::Serialize, Debug, PartialEq, Eq)]
pub(crate) struct CounterChange<'a> {
    pub cycle_start: i64,
    /// A model's id, or [`WORKSPACE_TOTAL`].
    pub model_id: &'a str,
    /// Nano-euros, either sign.
    pub spent_nanos: i64,
    /// Nano-euros, either sign.
    pub reserved_nanos: i64,
}

/// The counter rows that `changes` (`(cycle_start, model id, spent, reserved)`
/// nano-euros, one per cycle and model) move: each model's, and each cycle's
/// workspace total by their sum.
pub(crate) fn counter_changes<'a>(changes: &[(i64, &'a str, i64, i64)]) -> Vec<CounterChange<'a>> {
    let mut totals: Vec<CounterChange<'a>> = Vec::new();
    let mut rows = Vec::with_capacity(changes.len() + 1);
    for &(cycle_start, model_id, spent, reserved) in changes {
        rows.push(CounterChange {
            cycle_start,
            model_id,
            spent_nanos: spent,
            reserved_nanos: reserved,
        });
        match totals
            .iter_mut()
            .find(|total| total.cycle_start == cycle_start)
        {
            Some(total) => {
                total.spent_nanos = total.spent_nanos.saturating_add(spent);
                total.reserved_nanos = total.reserved_nanos.saturating_add(reserved);
            }
            None => totals.push(CounterChange {
                cycle_start,
                model_id: WORKSPACE_TOTAL,
                spent_nanos: spent,
                reserved_nanos: reserved,
            }),
        }
    }
    rows.extend(totals);
    rows
}

#[derive(sqlx::FromRow)]
pub(crate) struct UserRow {
    pub id: i64,
    pub email: String,
    pub password_hash: String,
    pub role: String,
    pub session_epoch: i64,
}

impl UserRow {
    pub fn record(self) -> Result<app::store::UserRecord, StoreError> {
        Ok(app::store::UserRecord {
            id: self.id,
            email: self.email,
            password_hash: self.password_hash,
            role: self.role.parse().map_err(|e| corrupt("users.role", e))?,
            session_epoch: self.session_epoch,
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
    pub session_epoch: i64,
}

impl KeyOwnerRow {
    pub fn record(self) -> Result<(app::store::ApiKeyRecord, app::store::UserRecord), StoreError> {
        let user = UserRow {
            id: self.key.user_id,
            email: self.key.owner_email.clone(),
            password_hash: self.password_hash,
            role: self.role,
            session_epoch: self.session_epoch,
        };
        Ok((self.key.record()?, user.record()?))
    }
}

/// How long a request waits at most for its key's `last_used_at` to be written
/// before it goes on without (the database busy with another process's write).
pub(crate) const LAST_USED_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

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
    let fault = match e.as_database_error() {
        Some(db)
            if matches!(
                db.kind(),
                sqlx::error::ErrorKind::UniqueViolation
                    | sqlx::error::ErrorKind::ForeignKeyViolation
                    | sqlx::error::ErrorKind::NotNullViolation
                    | sqlx::error::ErrorKind::CheckViolation
            ) =>
        {
            Fault::BrokeARule
        }
        Some(db) if db.code().is_some_and(|code| is_out_of_range_code(&code)) => Fault::BrokeARule,
        Some(db) if db.code().is_some_and(|code| is_busy_code(&code)) => Fault::Busy,
        Some(db) if db.code().is_some_and(|code| is_unavailable_code(&code)) => Fault::Unavailable,
        Some(_) => Fault::Other,
        None if matches!(
            e,
            sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
        ) =>
        {
            Fault::Unavailable
        }
        None => Fault::Other,
    };
    database_error(&e, fault)
}

/// Whether a database error code says the database cannot be reached or cannot
/// write for now, whatever the statement: PostgreSQL's classes `08` (connection
/// exception), `28` (the server refusing the configured user or password) and
/// `53` (insufficient resources: a full disk, no memory, too many connections),
/// `3D000` (the database gone: dropped or renamed), `42P01` and `3F000` (its
/// tables or schema gone: the database emptied, or dropped and made again under
/// a running server, which migrates it only when started), `57P01` to `57P03` (the
/// server shutting down or starting up), `25006` (a read-only server, a
/// standby) and `58030` (an I/O error); SQLite's `SQLITE_READONLY` (8),
/// `SQLITE_IOERR` (10), `SQLITE_FULL` (13) and `SQLITE_CANTOPEN` (14), in their
/// extended forms too.
fn is_unavailable_code(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("28")
        || code.starts_with("53")
        || matches!(
            code,
            "3D000" | "42P01" | "3F000" | "57P01" | "57P02" | "57P03" | "57P05" | "25006" | "58030"
        )
        || sqlite_primary_code(code).is_some_and(|n| matches!(n, 8 | 10 | 13 | 14))
}

/// The primary result code (the low byte) of a SQLite error code as sqlx gives
/// it, a number of at most four digits (extended codes included); `None` for
/// PostgreSQL's five-character SQLSTATEs, some of which are digits only.
fn sqlite_primary_code(code: &str) -> Option<i32> {
    (code.len() < 5)
        .then(|| code.parse::<i32>().ok())
        .flatten()
        .map(|n| n & 0xff)
}

/// A value the books cannot hold: PostgreSQL's `numeric_value_out_of_range`
/// (22003: a BIGINT counter past 2^63), SQLite's trigger that keeps counters
/// integers (`SQLITE_CONSTRAINT_TRIGGER`, 1811). Trying again cannot help.
fn is_out_of_range_code(code: &str) -> bool {
    code == "22003" || code == "1811"
}

/// Whether a database error code says another connection held a lock too long:
/// SQLite `SQLITE_BUSY` (5) or `SQLITE_LOCKED` (6), in their extended forms too
/// (sqlx gives SQLite's extended code as a number), or PostgreSQL's
/// `lock_not_available` (`55P03`).
fn is_busy_code(code: &str) -> bool {
    // 55P03 a lock not granted within `lock_timeout`; 57014 a statement
    // cancelled, as a `statement_timeout` the operator set below it does.
    matches!(code, "55P03" | "57014")
        || sqlite_primary_code(code).is_some_and(|n| matches!(n, 5 | 6))
}

/// What kind of failure a database error is, for [`database_error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// A unique, foreign key, not-null or check constraint of the books.
    BrokeARule,
    /// A lock held by another connection past the wait.
    Busy,
    /// The database out of reach or unable to write (`StoreError::Unavailable`).
    Unavailable,
    /// Anything else.
    Other,
}

/// A database's error as the store answers it, logged: for a [`Fault::BrokeARule`],
/// [`StoreError::Invalid`] `constraint_violation`; for a [`Fault::Busy`],
/// [`StoreError::Busy`]; else [`StoreError::Database`].
pub(crate) fn database_error(e: &dyn std::fmt::Display, fault: Fault) -> StoreError {
    match fault {
        Fault::BrokeARule => {
            tracing::warn!(error = %e, "constraint violation");
            StoreError::Invalid {
                code: "constraint_violation",
                message: "the change breaks a rule of the books and was not saved".into(),
            }
        }
        Fault::Busy => {
            tracing::warn!(error = %e, "another connection held the database's lock too long");
            StoreError::Busy(e.to_string())
        }
        Fault::Unavailable => {
            tracing::error!(error = %e, "the database cannot be reached or cannot write");
            StoreError::Unavailable(e.to_string())
        }
        Fault::Other => {
            tracing::error!(error = %e, "database error");
            StoreError::Database(e.to_string())
        }
    }
}

/// The key of the cycle of `plan` that a hold taken at `created_at` (RFC 3339)
/// is booked to when the books are recut with `current` as the cycle of now
/// (DESIGN.md R1): the cycle of its admission, or `current` for a hold admitted
/// within it (or later, by a clock ahead), and for one whose admission is not
/// known (a lapsed hold kept before it was recorded).
pub(crate) fn admission_cycle_key(
    plan: &PlanRecord,
    current: &app::domain::BillingCycle,
    created_at: Option<&str>,
) -> i64 {
    created_at
        .and_then(|text| DateTime::parse_from_rfc3339(text).ok())
        .map(|at| at.with_timezone(&Utc))
        .filter(|at| *at < current.start)
        .and_then(|at| plan.cycle_at(at).ok())
        .map_or(cycle_key(current.start), |cycle| cycle_key(cycle.start))
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
    let cost = usage_cost(&row.prices()?, usage)?;
    Ok((cost, false, cost > reserved))
}

/// What `usage` costs at `prices` (R3), rounded once to whole nano-euros (R2).
///
/// Errors: [`StoreError::Invalid`] (`invalid_usage`, a sentence about `usage`)
/// when the cost is past what the ledger's nano-euro integers hold (`i64`,
/// about 9.2 billion EUR). Usage is validated when it is read, so only its size
/// can fail to price.
pub(crate) fn usage_cost(prices: &Prices, usage: &Usage) -> Result<Nanos, StoreError> {
    app::domain::cost(prices, usage)
        .ok()
        .and_then(|cost| cost.to_nanos_rounded().ok())
        .ok_or_else(|| StoreError::Invalid {
            code: "invalid_usage",
            message: "`usage` cannot be billed: its cost is more than the ledger can hold \
                      (about €9.2 billion)"
                .to_owned(),
        })
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

/// How long a hold the sweep released when its lease ran out is kept for a late
/// settlement to bill (`lapsed_reservations`, DESIGN.md R7).
pub const LAPSED_KEPT: chrono::TimeDelta = chrono::TimeDelta::days(7);

/// Unix seconds of a cycle start, the counters' key.
pub(crate) fn cycle_key(start: DateTime<Utc>) -> i64 {
    start.timestamp()
}

/// Milliseconds since the epoch, for leases.
pub(crate) fn millis(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

/// A stored `reservations.lease_until` (milliseconds since the epoch, see
/// [`millis`]) as an instant.
///
/// Errors: [`StoreError::Database`] (logged as corrupt) past chrono's range.
pub(crate) fn lease_instant(ms: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_millis(ms).ok_or_else(|| {
        corrupt(
            "reservations.lease_until",
            format!("{ms} ms is out of range"),
        )
    })
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
                now: DateTime<Utc>,
            ) -> Result<(), app::store::StoreError> {
                use $crate::db::books::*;
                let mut conn = self.write_connection().await?;
                let mut tx = begin(&mut conn, Self::BEGIN).await?;
                let previous: Option<PlanFields> = sqlx::query_as(
                    "SELECT budget_nanos, overage_nanos, plan_start, timezone FROM plans \
                     WHERE workspace_id = $1",
                )
                .bind(WORKSPACE_ID)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_error)?;
                let plan = PlanFields::of(&setup.plan);
                let previous_name: Option<String> =
                    sqlx::query_scalar("SELECT name FROM workspaces WHERE id = $1")
                        .bind(WORKSPACE_ID)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(db_error)?;
                let previous_catalog = read_catalog(&mut tx).await?;
                let catalog: Vec<CatalogRow> =
                    setup.catalog.models().iter().map(CatalogRow::of).collect();
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
                .bind(plan.budget_nanos)
                .bind(plan.overage_nanos)
                .bind(&plan.plan_start)
                .bind(&plan.timezone)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
                let config = app::store::Actor::Config;
                // A database set up before has its changes audited, as the
                // tab's are; the first set-up is no change.
                if let Some(name) = previous_name.filter(|name| *name != setup.name) {
                    let (old, new) = (serde_json::json!({ "name": name }), serde_json::json!({ "name": setup.name }));
                    audit(&mut tx, &config, now, "workspace.name", "workspace", &old, &new).await?;
                }
                if previous.is_some() && previous_catalog != catalog {
                    let json = |rows: &[CatalogRow]| serde_json::Value::from_iter(rows.iter().map(CatalogRow::json));
                    audit(&mut tx, &config, now, "catalog", "workspace", &json(&previous_catalog), &json(&catalog)).await?;
                }
                if let Some(previous) = previous.filter(|previous| *previous != plan) {
                    audit(&mut tx, &config, now, "plan", "workspace", &previous.json(), &plan.json()).await?;
                    if previous.recuts_cycle_at(&setup.plan, now)? {
                        recut_current_cycle(&mut tx, &setup.plan, now).await?;
                    }
                }
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
                for (position, model) in catalog.iter().enumerate() {
                    sqlx::query(
                        "INSERT INTO models (workspace_id, id, display_name, position, input_eur_per_mtok, \
                         cached_input_eur_per_mtok, output_eur_per_mtok, max_output_tokens) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    )
                    .bind(WORKSPACE_ID)
                    .bind(&model.id)
                    .bind(&model.display_name)
                    .bind(i64::try_from(position).unwrap_or(i64::MAX))
                    .bind(&model.input_eur_per_mtok)
                    .bind(&model.cached_input_eur_per_mtok)
                    .bind(&model.output_eur_per_mtok)
                    .bind(model.max_output_tokens)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                }
                tx.commit().await.map_err(db_error)
            }

            fn write_held_for(&self) -> Option<std::time::Duration> {
                self.batcher.busy_for()
            }

            async fn check_write_lock(&self) -> Result<(), app::store::StoreError> {
                self.check_held_write_lock().await
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
                now: DateTime<Utc>,
            ) -> Result<DateTime<Utc>, app::store::StoreError> {
                use $crate::db::books::*;
                let mut lent = self.write_connection().await?;
                let conn: &mut <$db as sqlx::Database>::Connection = &mut lent;
                let until: Option<i64> = sqlx::query_scalar(
                    "UPDATE reservations \
                     SET lease_until = CASE WHEN lease_until < $1 THEN $1 ELSE lease_until END \
                     WHERE id = $2 AND lease_until >= $3 RETURNING lease_until",
                )
                .bind(millis(lease_until))
                .bind(&reservation.0)
                .bind(millis(now))
                .fetch_optional(&mut *conn)
                .await
                .map_err(db_error)?;
                lease_instant(until.ok_or(app::store::StoreError::NotFound { what: "reservation" })?)
            }

            async fn reservation_spender(
                &self,
                reservation: &app::store::ReservationId,
                settlement_key: &str,
            ) -> Result<Option<app::store::ReservationAccess>, app::store::StoreError> {
                use $crate::db::books::*;
                // One of the two at most: settling deletes the reservation and
                // records the row in one transaction.
                type Row = (Option<i64>, Option<i64>, Option<i64>, Option<String>);
                let row: Option<Row> = sqlx::query_as(
                    "SELECT user_id, api_key_id, lease_until, owner FROM reservations WHERE id = $1 \
                     UNION ALL \
                     SELECT user_id, api_key_id, NULL, NULL FROM usage_events \
                     WHERE workspace_id = $2 AND idempotency_key = $3",
                )
                .bind(&reservation.0)
                .bind(WORKSPACE_ID)
                .bind(settlement_key)
                .fetch_optional(&self.pool)
                .await
                .map_err(db_error)?;
                row.map(|(user_id, api_key_id, lease_until, owner)| {
                    let held = match (lease_until, owner) {
                        (Some(lease_until), Some(owner)) => Some(app::store::Held {
                            lease_until: lease_instant(lease_until)?,
                            owner,
                        }),
                        _ => None,
                    };
                    Ok(app::store::ReservationAccess {
                        spender: app::store::Spender { user_id, api_key_id },
                        held,
                    })
                })
                .transpose()
            }

            async fn recorded_usage(
                &self,
                idempotency_key: &str,
            ) -> Result<Option<app::store::RecordedUsage>, app::store::StoreError> {
                use $crate::db::books::*;
                let row: Option<RecordedRow> = sqlx::query_as(RECORDED_BY_KEY)
                    .bind(WORKSPACE_ID)
                    .bind(idempotency_key)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db_error)?;
                row.as_ref().map(RecordedRow::recorded_usage).transpose()
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

            async fn list_reservations(
                &self,
            ) -> Result<Vec<app::store::ReservationListing>, app::store::StoreError> {
                use $crate::db::books::*;
                type Row = (String, String, String, i64, Option<String>, Option<i64>, String, String, i64);
                let rows: Vec<Row> = sqlx::query_as(
                    "SELECT r.id, r.requested_model, r.served_model, r.amount_nanos, u.email, \
                     r.api_key_id, r.owner, r.created_at, r.lease_until \
                     FROM reservations r LEFT JOIN users u ON u.id = r.user_id \
                     WHERE r.workspace_id = $1 ORDER BY r.created_at, r.id",
                )
                .bind(WORKSPACE_ID)
                .fetch_all(&self.pool)
                .await
                .map_err(db_error)?;
                rows.into_iter()
                    .map(|(id, requested, served, amount, user_email, api_key_id, owner, created_at, lease_until)| {
                        Ok(app::store::ReservationListing {
                            id: app::store::ReservationId(id),
                            requested: app::domain::ModelId::new(requested),
                            served: app::domain::ModelId::new(served),
                            amount: app::domain::Nanos::new(amount),
                            user_email,
                            api_key_id,
                            owner,
                            created_at: instant("reservations.created_at", &created_at)?,
                            lease_until: lease_instant(lease_until)?,
                        })
                    })
                    .collect()
            }

            async fn release_expired(
                &self,
                now: DateTime<Utc>,
            ) -> Result<u64, app::store::StoreError> {
                use $crate::db::books::*;
                // The sweep comes again a few seconds later: on SQLite it does not
                // hold up this process's writes while another process has the lock.
                let mut conn = self.sweep_connection().await?;
                let mut tx = begin(&mut conn, Self::BEGIN).await?;
                // Kept, so that a request served all the same is billed when its
                // settlement comes late (`Settlement::bill_if_lapsed`).
                sqlx::query(
                    "INSERT INTO lapsed_reservations (id, workspace_id, cycle_start, \
                     requested_model, served_model, amount_nanos, input_eur_per_mtok, \
                     cached_input_eur_per_mtok, output_eur_per_mtok, user_id, api_key_id, created_at, \
                     lapsed_at) \
                     SELECT id, workspace_id, cycle_start, requested_model, served_model, \
                     amount_nanos, input_eur_per_mtok, cached_input_eur_per_mtok, \
                     output_eur_per_mtok, user_id, api_key_id, created_at, $3 FROM reservations \
                     WHERE workspace_id = $1 AND lease_until < $2 ON CONFLICT (id) DO NOTHING",
                )
                .bind(WORKSPACE_ID)
                .bind(millis(now))
                .bind(millis(now))
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
                sqlx::query("DELETE FROM lapsed_reservations WHERE workspace_id = $1 AND lapsed_at < $2")
                    .bind(WORKSPACE_ID)
                    .bind(millis(now - LAPSED_KEPT))
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                let rows: Vec<(i64, String, i64)> = sqlx::query_as(
                    "DELETE FROM reservations WHERE workspace_id = $1 AND lease_until < $2 \
                     RETURNING cycle_start, served_model, amount_nanos",
                )
                .bind(WORKSPACE_ID)
                .bind(millis(now))
                .fetch_all(&mut *tx)
                .await
                .map_err(db_error)?;
                let mut released = $crate::db::batch::BatchBooks::default();
                for (cycle_start, served, amount) in &rows {
                    released.change(*cycle_start, served, 0, -amount);
                }
                add_to_counters(&mut tx, &counter_changes(&released.changes())).await?;
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
                    let recorded: Option<RecordedRow> = sqlx::query_as(RECORDED_BY_KEY)
                    .bind(WORKSPACE_ID)
                    .bind(idempotency_key)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db_error)?;
                    if let Some(recorded) = recorded {
                        // A retry repeats what it reports; the same key for other
                        // usage is a mistake the caller must hear of.
                        let same = recorded.is_same(record)?;
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
                        created_at: None,
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
                        lease_expired: false,
                        idempotency_key: Some(record.idempotency_key.clone()),
                        now,
                    };
                    let event = insert_events(&mut tx, &[event.json_row()?])
                        .await?
                        .pop()
                        .ok_or_else(|| app::store::StoreError::Database("a ledger row was not written".into()))?
                        .event;
                    outcomes.push(RecordOutcome::Recorded(event.record(true)));
                }
                add_to_counters(&mut tx, &counter_changes(&books.changes())).await?;
                tx.commit().await.map_err(db_error)?;
                Ok(outcomes)
            }

            async fn spend_snapshot(
                &self,
                at: DateTime<Utc>,
            ) -> Result<app::store::SpendSnapshot, app::store::StoreError> {
                use $crate::db::books::*;
                use app::domain::{Counter, ModelId};
                use app::store::{CatalogEntry, ModelBooks, SpendSnapshot, StoredLimit};

                // One transaction, so the counters and limits are of one moment.
                let mut tx = self.pool.begin().await.map_err(db_error)?;
                let plan_row = read_plan(&mut tx, "").await?;
                let plan = plan_row.plan()?;
                let cycle = plan.cycle_at(at)?;
                let counters = read_counters(&mut tx, cycle_key(cycle.start)).await?;
                let limits = read_limits(&mut tx).await?;
                let catalog = read_catalog(&mut tx).await?;
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
                    catalog: catalog
                        .into_iter()
                        .map(|row| CatalogEntry { id: ModelId::new(row.id), display_name: row.display_name })
                        .collect(),
                })
            }

            async fn ledger_totals(
                &self,
                cycle_start: DateTime<Utc>,
            ) -> Result<app::store::LedgerTotals, app::store::StoreError> {
                use $crate::db::books::*;
                use app::domain::{ModelId, Nanos};
                let key = cycle_key(cycle_start);
                let recut_at: Option<String> = sqlx::query_scalar(
                    "SELECT recut_at FROM cycle_recuts WHERE workspace_id = $1 AND cycle_start = $2",
                )
                .bind(WORKSPACE_ID)
                .bind(key)
                .fetch_optional(&self.pool)
                .await
                .map_err(db_error)?;
                let rows: Vec<(String, i64, i64)> = match recut_at {
                    None => sqlx::query_as(
                        "SELECT served_model, CAST(SUM(cost_nanos) AS BIGINT), CAST(COUNT(*) AS BIGINT) \
                         FROM usage_events WHERE workspace_id = $1 AND cycle_start = $2 \
                         GROUP BY served_model ORDER BY served_model",
                    )
                    .bind(WORKSPACE_ID)
                    .bind(key)
                    .fetch_all(&self.pool)
                    .await,
                    // As `recut_current_cycle` rebuilt the counters: the rows
                    // recorded up to its recut whose request was admitted in the
                    // cycle, whatever their key, then the rows booked under its
                    // key. (RFC 3339 texts in UTC with the same offset sort as
                    // their instants.)
                    Some(recut_at) => sqlx::query_as(
                        "SELECT served_model, CAST(SUM(cost_nanos) AS BIGINT), CAST(COUNT(*) AS BIGINT) \
                         FROM usage_events WHERE workspace_id = $1 \
                         AND ((COALESCE(admitted_at, occurred_at) >= $3 AND occurred_at <= $4) \
                              OR (cycle_start = $2 AND occurred_at > $4)) \
                         GROUP BY served_model ORDER BY served_model",
                    )
                    .bind(WORKSPACE_ID)
                    .bind(key)
                    .bind(cycle_start.to_rfc3339())
                    .bind(recut_at)
                    .fetch_all(&self.pool)
                    .await,
                }
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
                expected_version: Option<i64>,
                automatic_fallback: bool,
                now: DateTime<Utc>,
            ) -> Result<app::store::SettingsRecord, app::store::StoreError> {
                use $crate::db::books::*;
                let mut conn = self.write_connection().await?;
                let mut tx = begin(&mut conn, Self::BEGIN).await?;
                let current = read_plan(&mut tx, Self::LOCK).await?.settings();
                if expected_version.is_some_and(|expected| expected != current.version) {
                    tx.rollback().await.map_err(db_error)?;
                    return Err(app::store::StoreError::Conflict {
                        what: app::store::SETTINGS.into(),
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
                    let current: Option<LimitRow> = sqlx::query_as(
                        "SELECT model_id, limit_nanos, enabled, version FROM model_limits \
                         WHERE workspace_id = $1 AND model_id = $2",
                    )
                    .bind(WORKSPACE_ID)
                    .bind(change.model.as_str())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db_error)?;
                    // The limit of a model the catalog dropped can still be
                    // cleared, so that it does not come back with the model.
                    let clears_a_stored_limit =
                        change.limit == app::domain::ModelLimit::default() && current.is_some();
                    if known.is_none() && !clears_a_stored_limit {
                        tx.rollback().await.map_err(db_error)?;
                        return Err(StoreError::Invalid {
                            code: "unknown_model",
                            message: format!("{} is not a model of the catalog", app::text::quoted(change.model.as_str())),
                        });
                    }
                    let (old, version) = current
                        .map(|row| (row.limit(), row.version))
                        .unwrap_or_default();
                    // A row the editor left as it is now stored changes nothing and
                    // cannot conflict; a row that differs must be based on the
                    // version stored, or it would overwrite someone else's change.
                    if old == change.limit {
                        continue;
                    }
                    if change.expected_version.is_some_and(|expected| expected != version) {
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

            async fn usage_events(
                &self,
                limit: u32,
                flagged_only: bool,
            ) -> Result<Vec<app::store::UsageListing>, app::store::StoreError> {
                use $crate::db::books::*;
                let rows: Vec<UsageListingRow> = sqlx::query_as(USAGE_LISTING)
                    .bind(WORKSPACE_ID)
                    .bind(flagged_only)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_error)?;
                rows.into_iter().map(UsageListingRow::listing).collect()
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
                actor: &app::store::Actor,
                email: &str,
                password_hash: &str,
                role: app::store::Role,
                now: DateTime<Utc>,
            ) -> Result<app::store::UserRecord, app::store::StoreError> {
                use $crate::db::books::*;
                let email = app::store::normalized_email(email);
                let mut conn = self.write_connection().await?;
                let mut tx = begin(&mut conn, Self::BEGIN).await?;
                // One address is one user, and two addresses drawn alike (a
                // Cyrillic `е` for a Latin `e`) would be two users that `user
                // list`, the audit log and the panel show as one, and an operator
                // disabling one by its email could find the other.
                let emails: Vec<String> = sqlx::query_scalar("SELECT email FROM users WHERE workspace_id = $1")
                    .bind(WORKSPACE_ID)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(db_error)?;
                if let Some(other) = emails.iter().find(|other| $crate::cli::looks_alike(other, &email)) {
                    tx.rollback().await.map_err(db_error)?;
                    return Err(if *other == email {
                        app::store::StoreError::Invalid {
                            code: "email_taken",
                            message: format!("a user with the email {email} exists already"),
                        }
                    } else {
                        app::store::StoreError::Invalid {
                            code: "email_look_alike",
                            message: format!(
                                "{email} looks like the email of the existing user {other} \
                                 (Unicode's confusable detection draws them alike): use another"
                            ),
                        }
                    });
                }
                let row: UserRow = sqlx::query_as(&format!(
                    "INSERT INTO users (workspace_id, email, password_hash, role, created_at) \
                     VALUES ($1, $2, $3, $4, $5) RETURNING {USER_COLUMNS}"
                ))
                .bind(WORKSPACE_ID)
                .bind(&email)
                .bind(password_hash)
                .bind(role.as_str())
                .bind(now.to_rfc3339())
                .fetch_one(&mut *tx)
                .await
                .map_err(db_error)?;
                let new = serde_json::json!({ "id": row.id, "role": role.as_str() });
                audit(&mut tx, actor, now, "user.create", &email, &serde_json::json!({}), &new).await?;
                tx.commit().await.map_err(db_error)?;
                row.record()
            }

            async fn list_users(
                &self,
            ) -> Result<Vec<app::store::UserListing>, app::store::StoreError> {
                use $crate::db::books::*;
                let rows: Vec<(i64, String, String, String, Option<String>, i64)> = sqlx::query_as(
                    "SELECT u.id, u.email, u.role, u.created_at, u.disabled_at, \
                     CAST((SELECT COUNT(*) FROM api_keys k WHERE k.user_id = u.id AND k.revoked_at IS NULL) AS BIGINT) \
                     FROM users u WHERE u.workspace_id = $1 ORDER BY u.id",
                )
                .bind(WORKSPACE_ID)
                .fetch_all(&self.pool)
                .await
                .map_err(db_error)?;
                rows.into_iter()
                    .map(|(id, email, role, created_at, disabled_at, live_keys)| {
                        Ok(app::store::UserListing {
                            id,
                            email,
                            role: role.parse().map_err(|e| corrupt("users.role", e))?,
                            created_at: instant("users.created_at", &created_at)?,
                            disabled_at: disabled_at
                                .map(|at| instant("users.disabled_at", &at))
                                .transpose()?,
                            live_keys,
                        })
                    })
                    .collect()
            }

            async fn disable_user(
                &self,
                actor: &app::store::Actor,
                email: &str,
                now: DateTime<Utc>,
            ) -> Result<app::store::DisabledUser, app::store::StoreError> {
                use $crate::db::books::*;
                let mut conn = self.write_connection().await?;
                let mut tx = begin(&mut conn, Self::BEGIN).await?;
                let at = now.to_rfc3339();
                let row = set_user_disabled_at(&mut tx, email, Some(&at)).await?;
                let revoked = sqlx::query(
                    "UPDATE api_keys SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL",
                )
                .bind(&at)
                .bind(row.id)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?
                .rows_affected();
                audit(
                    &mut tx,
                    actor,
                    now,
                    "user.disable",
                    &row.email,
                    &serde_json::json!({ "status": "enabled" }),
                    &serde_json::json!({ "status": "disabled", "keys_revoked": revoked }),
                )
                .await?;
                tx.commit().await.map_err(db_error)?;
                Ok(app::store::DisabledUser {
                    user: row.record()?,
                    keys_revoked: revoked,
                })
            }

            async fn enable_user(
                &self,
                actor: &app::store::Actor,
                email: &str,
                now: DateTime<Utc>,
            ) -> Result<app::store::UserRecord, app::store::StoreError> {
                use $crate::db::books::*;
                let mut conn = self.write_connection().await?;
                let mut tx = begin(&mut conn, Self::BEGIN).await?;
                let row = set_user_disabled_at(&mut tx, email, None).await?;
                audit(
                    &mut tx,
                    actor,
                    now,
                    "user.enable",
                    &row.email,
                    &serde_json::json!({ "status": "disabled" }),
                    &serde_json::json!({ "status": "enabled" }),
                )
                .await?;
                tx.commit().await.map_err(db_error)?;
                row.record()
            }

            async fn set_password(
                &self,
                actor: &app::store::Actor,
                email: &str,
                password_hash: &str,
                now: DateTime<Utc>,
            ) -> Result<app::store::UserRecord, app::store::StoreError> {
                use $crate::db::books::*;
                let mut conn = self.write_connection().await?;
                let mut tx = begin(&mut conn, Self::BEGIN).await?;
                let row: UserRow = sqlx::query_as(&format!(
                    "UPDATE users SET password_hash = $1, session_epoch = session_epoch + 1 \
                     WHERE workspace_id = $2 AND email = $3 RETURNING {USER_COLUMNS}"
                ))
                .bind(password_hash)
                .bind(WORKSPACE_ID)
                .bind(app::store::normalized_email(email))
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_error)?
                .ok_or(app::store::StoreError::NotFound { what: "user" })?;
                audit(
                    &mut tx,
                    actor,
                    now,
                    "user.password",
                    &row.email,
                    &serde_json::json!({}),
                    &serde_json::json!({ "password": "changed", "sessions": "ended" }),
                )
                .await?;
                tx.commit().await.map_err(db_error)?;
                row.record()
            }

            async fn user_by_email(
                &self,
                email: &str,
            ) -> Result<Option<app::store::UserRecord>, app::store::StoreError> {
                // PostgreSQL refuses a NUL in text; no stored email has one.
                if email.contains('\0') {
                    return Ok(None);
                }
                find_user(&self.pool, "email = $1", app::store::normalized_email(email)).await
            }

            async fn user_by_id(
                &self,
                id: i64,
            ) -> Result<Option<app::store::UserRecord>, app::store::StoreError> {
                find_user(&self.pool, "id = $1", id).await
            }

            async fn create_api_key(
                &self,
                actor: &app::store::Actor,
                user_id: i64,
                name: &str,
                key_hash: &str,
                now: DateTime<Utc>,
            ) -> Result<app::store::ApiKeyRecord, app::store::StoreError> {
                use $crate::db::books::*;
                let mut conn = self.write_connection().await?;
                let mut tx = begin(&mut conn, Self::BEGIN).await?;
                // Only an enabled user gets a key: the insert selects its row.
                let id: Option<(i64, String)> = sqlx::query_as(
                    "INSERT INTO api_keys (workspace_id, user_id, name, key_hash, created_at) \
                     SELECT $1, u.id, $3, $4, $5 FROM users u \
                     WHERE u.id = $2 AND u.workspace_id = $1 AND u.disabled_at IS NULL \
                     RETURNING id, (SELECT email FROM users WHERE id = $2)",
                )
                .bind(WORKSPACE_ID)
                .bind(user_id)
                .bind(name)
                .bind(key_hash)
                .bind(now.to_rfc3339())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_error)?;
                let Some((key_id, owner)) = id else {
                    tx.rollback().await.map_err(db_error)?;
                    return Err(app::store::StoreError::NotFound { what: "user" });
                };
                let new = serde_json::json!({ "id": key_id, "name": name, "status": "active" });
                audit(&mut tx, actor, now, "api_key.create", &owner, &serde_json::json!({}), &new).await?;
                tx.commit().await.map_err(db_error)?;
                let id = (key_id,);
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
                    // A date for the operator only: a request is not refused because
                    // it could not be written (another process holding the lock, say).
                    // Nor held up for long: it runs before the request's body is read,
                    // which has its own deadline.
                    let write = async {
                        let mut lent = self.write_connection().await?;
                        let conn: &mut <$db as sqlx::Database>::Connection = &mut lent;
                        sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
                            .bind(now.to_rfc3339())
                            .bind(key.id)
                            .execute(&mut *conn)
                            .await
                            .map_err(db_error)
                    };
                    match tokio::time::timeout(LAST_USED_WAIT, write).await {
                        Ok(Ok(_)) => key.last_used_at = Some(now),
                        Ok(Err(e)) => tracing::warn!(key = key.id, error = %e, "could not record when an API key was last used"),
                        Err(_) => tracing::warn!(key = key.id, "recording when an API key was last used took too long: skipped"),
                    }
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
                actor: &app::store::Actor,
                id: i64,
                now: DateTime<Utc>,
            ) -> Result<(), app::store::StoreError> {
                use $crate::db::books::*;
                let mut conn = self.write_connection().await?;
                let mut tx = begin(&mut conn, Self::BEGIN).await?;
                let revoked: Option<(String, String)> = sqlx::query_as(
                    "UPDATE api_keys SET revoked_at = $1 \
                     WHERE id = $2 AND workspace_id = $3 AND revoked_at IS NULL \
                     RETURNING name, (SELECT email FROM users WHERE users.id = api_keys.user_id)",
                )
                .bind(now.to_rfc3339())
                .bind(id)
                .bind(WORKSPACE_ID)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_error)?;
                let Some((name, owner)) = revoked else {
                    tx.rollback().await.map_err(db_error)?;
                    return Err(app::store::StoreError::NotFound { what: "api key" });
                };
                audit(
                    &mut tx,
                    actor,
                    now,
                    "api_key.revoke",
                    &owner,
                    &serde_json::json!({ "id": id, "name": name, "status": "active" }),
                    &serde_json::json!({ "id": id, "name": name, "status": "revoked" }),
                )
                .await?;
                tx.commit().await.map_err(db_error)
            }
        }

        /// This backend's hot-path statements.
        fn hot_sql() -> &'static $crate::db::books::HotSql {
            static HOT: std::sync::LazyLock<$crate::db::books::HotSql> = std::sync::LazyLock::new(|| {
                $crate::db::books::HotSql::new(<$store>::JSON)
            });
            &HOT
        }

        /// Insert ledger rows; returns them as written, in no particular order.
        async fn insert_events(
            conn: &mut <$db as sqlx::Database>::Connection,
            events: &[$crate::db::books::NewEventRow<'_>],
        ) -> Result<Vec<$crate::db::books::LedgerRow>, app::store::StoreError> {
            use $crate::db::books::*;
            if events.is_empty() {
                return Ok(Vec::new());
            }
            sqlx::query_as(&hot_sql().insert_events)
                .bind(json_rows(events)?)
                .fetch_all(&mut *conn)
                .await
                .map_err(db_error)
        }

        /// Add `changes` to their counter rows, creating the missing ones. A
        /// counter never goes below zero (CHECK constraints): a negative change
        /// only ever applies to a row a hold or a record created.
        async fn add_to_counters(
            conn: &mut <$db as sqlx::Database>::Connection,
            changes: &[$crate::db::books::CounterChange<'_>],
        ) -> Result<(), app::store::StoreError> {
            use $crate::db::books::*;
            if changes.is_empty() {
                return Ok(());
            }
            let changes = json_rows(changes)?;
            for statement in &hot_sql().add_to_counters {
                sqlx::query(statement)
                    .bind(changes.clone())
                    .execute(&mut *conn)
                    .await
                    .map_err(db_error)?;
            }
            Ok(())
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

        /// Disables (`Some(instant)`, RFC 3339, and the user's sessions end) the
        /// enabled user with `email` (normalized here), or enables (`None`) the
        /// disabled one; returns its row.
        ///
        /// Errors: [`app::store::StoreError::NotFound`] (`what` = `"user"`) when no
        /// user with that email is in the other state.
        async fn set_user_disabled_at(
            tx: &mut Tx<'_>,
            email: &str,
            disabled_at: Option<&str>,
        ) -> Result<$crate::db::books::UserRow, app::store::StoreError> {
            use $crate::db::books::*;
            let row: Option<UserRow> = sqlx::query_as(&format!(
                "UPDATE users SET disabled_at = $1, session_epoch = session_epoch + $5 \
                 WHERE workspace_id = $2 AND email = $3 AND (disabled_at IS NULL) = $4 \
                 RETURNING {USER_COLUMNS}"
            ))
            .bind(disabled_at)
            .bind(WORKSPACE_ID)
            .bind(app::store::normalized_email(email))
            .bind(disabled_at.is_some())
            // Disabling ends every session for good (`UserRecord::session_epoch`).
            .bind(i64::from(disabled_at.is_some()))
            .fetch_optional(&mut **tx)
            .await
            .map_err(db_error)?;
            row.ok_or(app::store::StoreError::NotFound { what: "user" })
        }

        /// Stores every email in its normalized form (`app::store::normalized_email`),
        /// as versions that kept them as typed did not. Run at start-up, in Rust:
        /// SQLite's `lower()` folds ASCII letters only. Rows already folded are not
        /// written. Of old rows that fold to one address only one can have it
        /// (the one already in lower case, else the oldest): the others keep their
        /// email as typed, with a warning.
        async fn fold_stored_emails(pool: &sqlx::Pool<$db>) -> Result<(), sqlx::Error> {
            let users: Vec<(i64, String)> = sqlx::query_as("SELECT id, email FROM users ORDER BY id")
                .fetch_all(pool)
                .await?;
            for (id, email) in users {
                let folded = app::store::normalized_email(&email);
                if folded == email {
                    continue;
                }
                let done = sqlx::query("UPDATE users SET email = $1 WHERE id = $2")
                    .bind(&folded)
                    .bind(id)
                    .execute(pool)
                    .await;
                match done {
                    Ok(_) => {}
                    Err(sqlx::Error::Database(e)) if e.is_unique_violation() => tracing::warn!(
                        user = id,
                        email,
                        "another user has this email in lower case: this one keeps it as \
                         typed, cannot sign in and is found by `tollgate user list` only"
                    ),
                    Err(e) => return Err(e),
                }
            }
            Ok(())
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
            let sql = format!(
                "SELECT {USER_COLUMNS} FROM users WHERE ({condition}) AND disabled_at IS NULL"
            );
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
                KeyFilter::LiveHash(_) => {
                    "k.key_hash = $2 AND k.revoked_at IS NULL AND u.disabled_at IS NULL"
                }
                KeyFilter::OwnerEmail(_) => "u.email = $2",
                KeyFilter::All => "$2 = ''",
            };
            let sql = format!(
                "SELECT k.id, k.name, k.user_id, u.email AS owner_email, k.created_at, k.last_used_at, \
                 k.revoked_at, u.password_hash, u.role, u.session_epoch FROM api_keys k JOIN users u ON u.id = k.user_id \
                 WHERE k.workspace_id = $1 AND {condition} ORDER BY k.id DESC"
            );
            let query = sqlx::query_as(&sql).bind(WORKSPACE_ID);
            let query = match filter {
                KeyFilter::Id(id) => query.bind(id),
                KeyFilter::OwnerEmail(email) => query.bind(app::store::normalized_email(email)),
                KeyFilter::LiveHash(hash) => query.bind(hash.to_owned()),
                KeyFilter::All => query.bind(String::new()),
            };
            query.fetch_all(pool).await.map_err(db_error)
        }

        async fn read_plan(
            conn: &mut <$db as sqlx::Database>::Connection,
            lock: &str,
        ) -> Result<$crate::db::books::PlanRow, app::store::StoreError> {
            use $crate::db::books::*;
            sqlx::query_as(&plan_query(lock))
                .bind(WORKSPACE_ID)
                .fetch_optional(&mut *conn)
                .await
                .map_err(db_error)?
                .ok_or(app::store::StoreError::NotFound { what: "plan" })
        }

        async fn read_counters(
            conn: &mut <$db as sqlx::Database>::Connection,
            cycle_start: i64,
        ) -> Result<Vec<$crate::db::books::CounterRow>, app::store::StoreError> {
            use $crate::db::books::*;
            sqlx::query_as(
                "SELECT model_id, spent_nanos, reserved_nanos FROM counters \
                 WHERE workspace_id = $1 AND cycle_start = $2",
            )
            .bind(WORKSPACE_ID)
            .bind(cycle_start)
            .fetch_all(&mut *conn)
            .await
            .map_err(db_error)
        }

        /// The catalog the books were last set up with, in the config's order.
        async fn read_catalog(
            conn: &mut <$db as sqlx::Database>::Connection,
        ) -> Result<Vec<$crate::db::books::CatalogRow>, app::store::StoreError> {
            use $crate::db::books::*;
            sqlx::query_as(
                "SELECT id, display_name, input_eur_per_mtok, cached_input_eur_per_mtok, \
                 output_eur_per_mtok, max_output_tokens FROM models WHERE workspace_id = $1 \
                 ORDER BY position",
            )
            .bind(WORKSPACE_ID)
            .fetch_all(&mut *conn)
            .await
            .map_err(db_error)
        }

        async fn read_limits(
            conn: &mut <$db as sqlx::Database>::Connection,
        ) -> Result<Vec<$crate::db::books::LimitRow>, app::store::StoreError> {
            use $crate::db::books::*;
            sqlx::query_as(
                "SELECT model_id, limit_nanos, enabled, version FROM model_limits WHERE workspace_id = $1",
            )
            .bind(WORKSPACE_ID)
            .fetch_all(&mut *conn)
            .await
            .map_err(db_error)
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

        /// Re-cut the books after the plan's start date or timezone moved the bounds
        /// of the cycle containing `now` (DESIGN.md R1). A request counts in the cycle
        /// it was admitted in, under the new bounds: the cycle's counters are rebuilt
        /// from the ledger rows whose request was admitted within them (one admitted
        /// before a boundary and settled after it stays in the cycle before), and
        /// each hold in flight (or lapsed) is booked to the cycle of its admission,
        /// this one or an earlier one, whose counters hold it until it ends. Without
        /// this the workspace would start the rest of its cycle from zero and could
        /// spend its plan twice. Ledger rows keep the cycle key they were booked under
        /// (the ledger is append-only); the recut's time is recorded in
        /// `cycle_recuts`, so that the ledger's sums for the cycle (`ledger_totals`)
        /// take the same rows as its counters.
        async fn recut_current_cycle(
            tx: &mut Tx<'_>,
            plan: &app::store::PlanRecord,
            now: DateTime<Utc>,
        ) -> Result<(), app::store::StoreError> {
            use $crate::db::books::*;
            let cycle = plan.cycle_at(now)?;
            let key = cycle_key(cycle.start);
            sqlx::query(
                "INSERT INTO cycle_recuts (workspace_id, cycle_start, recut_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (workspace_id, cycle_start) DO UPDATE SET recut_at = excluded.recut_at",
            )
            .bind(WORKSPACE_ID)
            .bind(key)
            .bind(now.to_rfc3339())
            .execute(&mut **tx)
            .await
            .map_err(db_error)?;
            // Holds admitted within the cycle (or at an unknown time) are booked to
            // it in one statement; only those admitted before it, few, one by one.
            // (RFC 3339 texts in UTC with the same offset sort as their instants.)
            let start = cycle.start.to_rfc3339();
            for table in ["reservations", "lapsed_reservations"] {
                sqlx::query(&format!(
                    "UPDATE {table} SET cycle_start = $2 WHERE workspace_id = $1 \
                     AND (created_at IS NULL OR created_at >= $3)"
                ))
                .bind(WORKSPACE_ID)
                .bind(key)
                .bind(&start)
                .execute(&mut **tx)
                .await
                .map_err(db_error)?;
                let earlier: Vec<(String, Option<String>)> = sqlx::query_as(&format!(
                    "SELECT id, created_at FROM {table} WHERE workspace_id = $1 AND created_at < $2"
                ))
                .bind(WORKSPACE_ID)
                .bind(&start)
                .fetch_all(&mut **tx)
                .await
                .map_err(db_error)?;
                for (id, created_at) in earlier {
                    sqlx::query(&format!(
                        "UPDATE {table} SET cycle_start = $2 WHERE workspace_id = $1 AND id = $3"
                    ))
                    .bind(WORKSPACE_ID)
                    .bind(admission_cycle_key(plan, &cycle, created_at.as_deref()))
                    .bind(id)
                    .execute(&mut **tx)
                    .await
                    .map_err(db_error)?;
                }
            }
            for statement in [
                "UPDATE counters SET reserved_nanos = 0 WHERE workspace_id = $1 AND cycle_start <> $2",
                "DELETE FROM counters WHERE workspace_id = $1 AND cycle_start = $2",
            ] {
                sqlx::query(statement)
                    .bind(WORKSPACE_ID)
                    .bind(key)
                    .execute(&mut **tx)
                    .await
                    .map_err(db_error)?;
            }
            // `admitted_at` and `occurred_at` are RFC 3339 text in UTC, always with
            // the offset `+00:00`: for those, the order of the text is the order of
            // the instants. A row without `admitted_at` (usage recorded without a
            // hold, or written before the column) was admitted when it occurred.
            let sums: Vec<(i64, String, i64, i64)> = sqlx::query_as(
                "SELECT cycle_start, model, CAST(SUM(spent) AS BIGINT), CAST(SUM(reserved) AS BIGINT) \
                 FROM ( \
                 SELECT $4 AS cycle_start, served_model AS model, cost_nanos AS spent, 0 AS reserved \
                 FROM usage_events WHERE workspace_id = $1 AND COALESCE(admitted_at, occurred_at) >= $2 \
                 AND COALESCE(admitted_at, occurred_at) < $3 \
                 UNION ALL \
                 SELECT cycle_start, served_model, 0, amount_nanos FROM reservations WHERE workspace_id = $1 \
                 ) books GROUP BY cycle_start, model ORDER BY cycle_start, model",
            )
            .bind(WORKSPACE_ID)
            .bind(cycle.start.to_rfc3339())
            .bind(cycle.end.to_rfc3339())
            .bind(key)
            .fetch_all(&mut **tx)
            .await
            .map_err(db_error)?;
            let changes: Vec<(i64, &str, i64, i64)> = sums
                .iter()
                .map(|(cycle_start, model, spent, reserved)| (*cycle_start, model.as_str(), *spent, *reserved))
                .collect();
            add_to_counters(&mut **tx, &counter_changes(&changes)).await
        }
    };
}

pub(crate) use impl_store;

/// A model limit as the audit log shows it: amounts as exact EUR strings.
/// An amount as the audit log writes it: exact EUR, no trailing zeros.
fn eur_text(amount: Nanos) -> String {
    amount.to_money().amount().normalize().to_string()
}

pub(crate) fn limit_json(limit: &ModelLimit) -> serde_json::Value {
    serde_json::json!({
        "limit_eur": limit.limit.map(eur_text),
        "enabled": limit.enabled,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_timeouts_are_told_from_other_database_errors() {
        // SQLite BUSY, LOCKED, BUSY_RECOVERY, BUSY_SNAPSHOT, LOCKED_SHAREDCACHE;
        // PostgreSQL lock_not_available.
        for busy in ["5", "6", "261", "517", "262", "55P03"] {
            assert!(is_busy_code(busy), "{busy}");
        }
        // SQLite ERROR, READONLY, FULL, CONSTRAINT_UNIQUE; PostgreSQL
        // unique_violation, deadlock_detected, a code that only ends in 5.
        // PostgreSQL insufficient_privilege: digits only, whose number ends in
        // the byte 5 but is no SQLite code.
        for other in ["1", "8", "13", "2067", "23505", "40P01", "08005", "42501"] {
            assert!(!is_busy_code(other), "{other}");
        }
    }

    #[test]
    fn a_database_out_of_reach_is_told_from_a_broken_statement() {
        // SQLite READONLY, READONLY_DBMOVED, IOERR, IOERR_WRITE, FULL, CANTOPEN;
        // PostgreSQL connection_failure, admin_shutdown, cannot_connect_now,
        // disk_full, too_many_connections, read_only_sql_transaction, io_error,
        // invalid_catalog_name, invalid_password, undefined_table,
        // invalid_schema_name.
        for down in [
            "8", "1032", "10", "778", "13", "14", "08006", "57P01", "57P03", "53100", "53300",
            "25006", "58030", "3D000", "28P01", "42P01", "3F000",
        ] {
            assert!(is_unavailable_code(down), "{down}");
        }
        // SQLite ERROR, BUSY, CONSTRAINT_UNIQUE; PostgreSQL unique_violation,
        // undefined_column, lock_not_available, and unterminated_c_string,
        // digits only, whose number ends in SQLite's READONLY byte.
        for other in ["1", "5", "2067", "23505", "42703", "55P03", "22024"] {
            assert!(!is_unavailable_code(other), "{other}");
        }
        for (error, unavailable) in [
            (
                sqlx::Error::Io(std::io::ErrorKind::ConnectionRefused.into()),
                true,
            ),
            (sqlx::Error::PoolTimedOut, true),
            (sqlx::Error::PoolClosed, true),
            (sqlx::Error::RowNotFound, false),
            (sqlx::Error::Protocol("unexpected message".into()), false),
        ] {
            let answered = db_error(error);
            assert_eq!(
                matches!(answered, StoreError::Unavailable(_)),
                unavailable,
                "{answered:?}"
            );
        }
    }

    #[test]
    fn the_json_rows_carry_every_column_their_statements_read() {
        fn keys(value: serde_json::Value) -> Vec<String> {
            let mut keys: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
            keys.sort();
            keys
        }
        fn columns(list: &[(&str, Json)]) -> Vec<String> {
            let mut names: Vec<String> = list.iter().map(|(name, _)| (*name).to_owned()).collect();
            names.sort();
            names
        }
        let reservation = NewReservationRow {
            row: ReservationRow {
                id: "r".into(),
                cycle_start: 0,
                requested_model: "m".into(),
                served_model: "m".into(),
                amount_nanos: 1,
                input_eur_per_mtok: "1".into(),
                cached_input_eur_per_mtok: "1".into(),
                output_eur_per_mtok: "1".into(),
                user_id: None,
                api_key_id: None,
                created_at: None,
            },
            owner: "o",
            lease_until: 0,
        };
        assert_eq!(
            keys(serde_json::to_value(&reservation).unwrap()),
            columns(RESERVATION_COLUMNS)
        );
        let event = NewEventRow {
            cycle_start: 0,
            occurred_at: String::new(),
            admitted_at: None,
            user_id: None,
            api_key_id: None,
            requested_model: "m",
            served_model: "m",
            prompt_tokens: 0,
            cached_tokens: 0,
            completion_tokens: 0,
            reasoning_tokens: 0,
            input_eur_per_mtok: "1",
            cached_input_eur_per_mtok: "1",
            output_eur_per_mtok: "1",
            cost_nanos: 0,
            reserved_nanos: 0,
            estimated: false,
            over_reservation: false,
            lease_expired: false,
            reservation_id: None,
            idempotency_key: None,
        };
        assert_eq!(
            keys(serde_json::to_value(&event).unwrap()),
            columns(EVENT_COLUMNS)
        );
    }

    #[test]
    fn counter_changes_move_each_cycles_workspace_total_by_their_sum() {
        let changes = counter_changes(&[(10, "a", 5, -3), (10, "b", 0, 7), (20, "a", 1, 0)]);
        let row = |cycle_start, model_id, spent_nanos, reserved_nanos| CounterChange {
            cycle_start,
            model_id,
            spent_nanos,
            reserved_nanos,
        };
        assert_eq!(
            changes,
            [
                row(10, "a", 5, -3),
                row(10, "b", 0, 7),
                row(20, "a", 1, 0),
                row(10, WORKSPACE_TOTAL, 5, 4),
                row(20, WORKSPACE_TOTAL, 1, 0),
            ]
        );
    }

    #[test]
    fn postgres_writes_a_batch_in_one_statement() {
        let sqlite = HotSql::new(JsonDialect::JsonEach);
        let postgres = HotSql::new(JsonDialect::JsonbElements);
        assert!(postgres
            .insert_events
            .contains("FROM jsonb_array_elements(CAST($1 AS jsonb)) AS r RETURNING"));
        // One round trip for the counters, which creates the rows it needs.
        assert_eq!(postgres.add_to_counters.len(), 1);
        assert!(postgres.add_to_counters[0].contains("INSERT INTO counters"));
        // A batch's writes in one round trip, each with its own argument.
        let write = postgres.write.unwrap();
        for (table, param) in [("reservations", 1), ("usage_events", 2)] {
            assert!(write.contains(&format!(
                "INSERT INTO {table} (workspace_id, {}",
                if table == "reservations" {
                    "id"
                } else {
                    "cycle_start"
                }
            )));
            assert!(write.contains(&format!("CAST(${param} AS jsonb)")));
        }
        assert!(write.contains("CAST($3 AS jsonb)) AS r), changed AS (UPDATE counters"));
        assert!(sqlite.write.is_none());
    }

    #[test]
    fn postgres_runs_a_batch_in_two_calls() {
        let sqlite = HotSql::new(JsonDialect::JsonEach);
        let postgres = HotSql::new(JsonDialect::JsonbElements);
        assert!(sqlite.functions.is_none());
        let open = postgres.functions.unwrap();
        assert!(open.create.starts_with(&format!(
            "SET standard_conforming_strings = on; CREATE OR REPLACE FUNCTION {OPEN_BATCH}("
        )));
        assert!(open
            .create
            .contains(&format!("; CREATE OR REPLACE FUNCTION {WRITE_BATCH}(")));
        assert_eq!(
            open.open_call(Some("BEGIN"), r#"["r-1"]"#, true, "[7]"),
            format!(r#"BEGIN; SELECT kind, data FROM {OPEN_BATCH}('["r-1"]', true, '[7]')"#)
        );
        assert_eq!(
            open.open_call(None, "[]", false, "[]"),
            format!("SELECT kind, data FROM {OPEN_BATCH}('[]', false, '[]')")
        );
        assert_eq!(
            open.write_call("[]", r#"[{"key":"it's"}]"#, "[]"),
            format!(
                r#"SELECT row FROM {WRITE_BATCH}('[]', '[{{"key":"it''s"}}]', '[]') AS row; COMMIT"#
            )
        );
        // In this order: the holds, then the plan's lock, then the books of the
        // latest cycle with counters, read by statements of their own.
        let at = |text: &str| open.create.find(text).unwrap();
        assert!(at("DELETE FROM reservations") < at("FOR UPDATE"));
        assert!(at("FOR UPDATE") < at("SELECT max(cycle_start) INTO latest"));
        assert!(at("SELECT max(cycle_start) INTO latest") < at("cycle_start = latest"));
        assert!(open
            .create
            .contains("FROM jsonb_array_elements_text(CAST($3 AS jsonb))"));
    }

    fn books_row(kind: &str, model_id: &str, amount: i64) -> String {
        serde_json::json!({
            "kind": kind, "model_id": model_id, "amount": amount,
            "reserved": 0, "enabled": true, "version": 0,
        })
        .to_string()
    }

    fn opened_books(latest_cycle: Option<i64>) -> OpenedBooks {
        OpenedBooks {
            plan: None,
            latest_cycle,
            books: ReadBooks::sort(vec![
                BooksRow {
                    kind: "limit".into(),
                    model_id: "mid".into(),
                    amount: Some(5),
                    reserved: 0,
                    enabled: true,
                    version: 1,
                },
                BooksRow {
                    kind: "counter".into(),
                    model_id: "mid".into(),
                    amount: Some(3),
                    reserved: 1,
                    enabled: false,
                    version: 0,
                },
            ])
            .unwrap(),
        }
    }

    #[test]
    fn books_read_at_opening_serve_only_the_cycle_they_are_of() {
        // The latest cycle with counters: its counters.
        let same = opened_books(Some(20)).of_cycle(20).unwrap();
        assert_eq!((same.limits.len(), same.counters.len()), (1, 1));
        // A later cycle has no counters yet.
        let later = opened_books(Some(20)).of_cycle(30).unwrap();
        assert_eq!((later.limits.len(), later.counters.len()), (1, 0));
        // An earlier one's counters were not read.
        assert!(opened_books(Some(20)).of_cycle(10).is_none());
        // No counters anywhere: none for any cycle.
        assert!(opened_books(None).of_cycle(10).is_some());
    }

    #[test]
    fn a_batch_opening_is_read_by_kind() {
        let row = |kind: &str, data: String| (kind.to_owned(), data);
        let hold = serde_json::json!({
            "id": "r1", "cycle_start": 20, "requested_model": "big", "served_model": "mid",
            "amount_nanos": 7, "input_eur_per_mtok": "1", "cached_input_eur_per_mtok": "0.5",
            "output_eur_per_mtok": "2", "user_id": null, "api_key_id": 4,
        })
        .to_string();
        let plan = serde_json::json!({
            "budget_nanos": 100, "overage_nanos": 5, "plan_start": "2026-10-31",
            "timezone": "Europe/Berlin", "automatic_fallback": true, "settings_version": 3,
        })
        .to_string();
        // Holds only: no books.
        let opened = Opened::from_rows(vec![row("hold", hold.clone())]).unwrap();
        assert_eq!(opened.ended.len(), 1);
        assert_eq!(opened.ended[0].api_key_id, Some(4));
        assert!(opened.admitting.is_none());
        // Books of a workspace that has spent nothing yet.
        let opened = Opened::from_rows(vec![
            row("hold", hold),
            row("plan", plan.clone()),
            row("cycle", "null".into()),
            row("books", books_row("key", "", 4)),
        ])
        .unwrap();
        let books = opened.admitting.unwrap();
        assert_eq!(books.latest_cycle, None);
        assert_eq!(books.plan.unwrap().settings_version, 3);
        assert_eq!(books.books.live_keys, [4]);
        let opened = Opened::from_rows(vec![
            row("plan", plan),
            row("cycle", "20".into()),
            row("books", books_row("counter", "mid", 9)),
        ])
        .unwrap();
        assert_eq!(opened.admitting.unwrap().latest_cycle, Some(20));
        // Books without a plan: the workspace has none.
        assert!(matches!(
            Opened::from_rows(vec![row("cycle", "null".into())]),
            Err(StoreError::NotFound { what: "plan" })
        ));
        assert!(matches!(
            Opened::from_rows(vec![row("ledger", "{}".into())]),
            Err(StoreError::Database(_))
        ));
        assert!(matches!(
            Opened::from_rows(vec![row("hold", "{\"id\": 1}".into())]),
            Err(StoreError::Database(_))
        ));
    }
}
