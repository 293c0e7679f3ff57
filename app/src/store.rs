//! The `Store` port: everything the app and the gateway need from the database, as
//! one object-safe async trait shared as `Arc<dyn Store>` (STYLE.md, "Pick the
//! backend once"). The SQLite and PostgreSQL adapters live in `server/src/db/`.
//!
//! Amounts crossing this port are nano-euros ([`Nanos`]); prices are EUR per 1M
//! tokens ([`PricePerMTok`]). Instants are UTC.

use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;

use crate::domain::{
    BillingCycle, Blocked, Catalog, Counter, Model, ModelId, ModelLimit, Nanos, PlanAmounts,
    TokenEstimate, Usage,
};

/// [`StoreError::Conflict`]'s `what` for the workspace's settings (the
/// automatic fallback switch).
pub const SETTINGS: &str = "settings";

/// Errors every store operation can return; each names its HTTP status.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A row the caller named does not exist (HTTP 404).
    #[error("{what} not found")]
    NotFound {
        /// What was looked up, for the message (e.g. "reservation").
        what: &'static str,
    },
    /// An optimistic write found a newer version than the one it was based on
    /// (HTTP 409). Nothing was written.
    #[error(
        "{what} was changed by someone else in the meantime (now at version {current_version})"
    )]
    Conflict {
        /// What was being changed: [`SETTINGS`], or the id of the model whose
        /// limit it was.
        what: String,
        /// The version now stored, so the caller can reload.
        current_version: i64,
    },
    /// The request breaks a rule or a constraint (HTTP 422). Nothing was written.
    #[error("{message}")]
    Invalid {
        /// Stable snake_case code (e.g. `unknown_model`, `enabled_without_amount`).
        code: &'static str,
        /// A sentence for a person.
        message: String,
    },
    /// Another connection kept the database's write lock past the wait (SQLite
    /// `database is locked` after its busy timeout, PostgreSQL `lock_not_available`):
    /// HTTP 503, code `database_busy`. Nothing was written; the same call may
    /// succeed once the other writer is done.
    #[error("the database is busy with another connection's write: {0}")]
    Busy(String),
    /// The database cannot be reached or cannot write for now: a PostgreSQL
    /// server down, refusing connections or read-only, no connection of the pool
    /// free within its wait (10 s), a SQLite file or journal that cannot be
    /// written, a full disk, an I/O error. HTTP 503, code `database_unavailable`;
    /// the detail is logged, never shown. Nothing was written, unless the
    /// connection broke during the commit itself: then a hold may have been
    /// kept (its lease releases it) and a settlement may have been recorded (its
    /// idempotency key keeps a retry from counting it twice).
    #[error("the database cannot be reached or written: {0}")]
    Unavailable(String),
    /// The database failed in another way, or a bug (HTTP 500; the detail is
    /// logged, never shown).
    #[error("database error: {0}")]
    Database(String),
}

impl StoreError {
    /// Stable snake_case code of the error, for API bodies and the UI.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::NotFound { .. } => "not_found",
            StoreError::Conflict { .. } => "conflict",
            StoreError::Invalid { code, .. } => code,
            StoreError::Busy(_) => "database_busy",
            StoreError::Unavailable(_) => "database_unavailable",
            StoreError::Database(_) => "internal_error",
        }
    }
}

/// The workspace as the store keeps it (DESIGN.md §1: every row belongs to one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceRecord {
    /// Database id of the workspace.
    pub id: i64,
    /// The organisation's name, shown in the app shell.
    pub name: String,
}

/// The operator's plan (DESIGN.md §1, read-only in the UI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanRecord {
    /// Plan budget and overage limit per cycle, nano-euros.
    pub amounts: PlanAmounts,
    /// The date cycles renew on (R1).
    pub start: NaiveDate,
    /// The workspace's IANA timezone (R1).
    pub timezone: Tz,
}

impl PlanRecord {
    /// The billing cycle containing `at` (R1).
    ///
    /// Errors: [`StoreError::Invalid`] when `at` is outside chrono's calendar.
    pub fn cycle_at(&self, at: DateTime<Utc>) -> Result<BillingCycle, StoreError> {
        BillingCycle::containing(self.start, self.timezone, at).map_err(|e| StoreError::Invalid {
            code: e.code(),
            message: e.to_string(),
        })
    }
}

/// What the operator's config declares, applied at every start (DESIGN.md §7):
/// the plan is replaced, the catalog's models are upserted; model limits, settings
/// and the books are left as they are.
#[derive(Debug, Clone)]
pub struct WorkspaceSetup {
    /// The organisation's name.
    pub name: String,
    /// The plan.
    pub plan: PlanRecord,
    /// The model catalog, in display order.
    pub catalog: Arc<Catalog>,
}

/// Who made a change, as the audit log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// A signed-in user (the tab) or an API key's owner.
    User {
        /// The user's id.
        id: i64,
        /// The user's email, kept in the audit row as it was at the time.
        email: String,
    },
    /// The operator's command line (`tollgate limit set`, `fallback on`...).
    Cli,
    /// The operator's config file, applied at start (a changed plan).
    Config,
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Actor::User { email, .. } => write!(f, "{email}"),
            Actor::Cli => write!(f, "cli"),
            Actor::Config => write!(f, "config"),
        }
    }
}

/// Identifier of a reservation (a UUID v7, text: time-ordered, 74 random bits).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ReservationId(pub String);

impl std::fmt::Display for ReservationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who spends: the user and key a request came with (DESIGN.md §6: every ledger row
/// names them). `None` only in store tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spender {
    /// The user's id.
    pub user_id: Option<i64>,
    /// The API key's id.
    pub api_key_id: Option<i64>,
}

/// One admission request (R6, R7).
#[derive(Debug, Clone)]
pub struct ReserveRequest {
    /// The catalog the request was resolved against.
    pub catalog: Arc<Catalog>,
    /// The requested model's id (aliases already resolved).
    pub model: ModelId,
    /// Token bounds of the request, from which each candidate's reservation follows.
    pub estimate: TokenEstimate,
    /// Who asks.
    pub spender: Spender,
    /// The replica that will settle it, so leases can be traced.
    pub owner: String,
    /// Until when the hold lasts without renewal.
    pub lease_until: DateTime<Utc>,
    /// The instant of admission, which picks the billing cycle.
    pub now: DateTime<Utc>,
}

/// A hold recorded by [`Store::reserve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// Its id, for settle, release and lease renewal.
    pub id: ReservationId,
    /// The model the request asked for.
    pub requested: ModelId,
    /// The model that serves it (differs on fallback).
    pub served: ModelId,
    /// Amount held, nano-euros, rounded up (R7).
    pub amount: Nanos,
    /// The billing cycle it counts in.
    pub cycle: BillingCycle,
}

/// A hold in the books, as `tollgate reservation list` shows it (DESIGN.md R7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationListing {
    /// Its id.
    pub id: ReservationId,
    /// The model the request asked for.
    pub requested: ModelId,
    /// The model that serves it.
    pub served: ModelId,
    /// Amount held, nano-euros.
    pub amount: Nanos,
    /// The email of the user whose key it was admitted for; `None` for usage
    /// recorded without a key.
    pub user_email: Option<String>,
    /// The key it was admitted for.
    pub api_key_id: Option<i64>,
    /// The replica (or usage-API caller) holding it.
    pub owner: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When its lease ends: any replica releases it then unless it is renewed.
    pub lease_until: DateTime<Utc>,
}

/// A row of the usage ledger, as `tollgate usage list` shows it (DESIGN.md §6:
/// append-only, each row naming its user and API key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageListing {
    /// Its id: rows are numbered as they are written.
    pub id: i64,
    /// When the request was settled or recorded: a settlement that the
    /// database held up keeps the time of its first try.
    pub occurred_at: DateTime<Utc>,
    /// The first instant of the billing cycle it was billed in (R1): the
    /// cycle of its admission, even when settled after the cycle ended.
    pub cycle_start: DateTime<Utc>,
    /// The email of the user it was billed to; `None` for usage without one.
    pub user_email: Option<String>,
    /// The API key it was billed to.
    pub api_key_id: Option<i64>,
    /// The model the request asked for.
    pub requested: ModelId,
    /// The model that served it, whose counter it was charged to.
    pub served: ModelId,
    /// The token counts billed; `None` when the row billed its estimate
    /// (`estimated`): no usage was reported.
    pub usage: Option<Usage>,
    /// Cost charged, nano-euros (R2).
    pub cost: Nanos,
    /// Billed the estimate, no usage reported (R7).
    pub estimated: bool,
    /// The cost exceeded its reservation (R7).
    pub over_reservation: bool,
    /// Billed after its hold's lease had ended (R7).
    pub lease_expired: bool,
    /// The usage API's idempotency key, for a recorded row.
    pub idempotency_key: Option<String>,
}

/// What [`Store::reservation_spender`] reads of a reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationAccess {
    /// The user and API key it was admitted for.
    pub spender: Spender,
    /// While it is held: when its lease ends and who holds it; `None` once it
    /// is settled.
    pub held: Option<Held>,
}

/// A reservation still held: see [`ReservationAccess::held`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// When its lease ends (any replica releases it then, R7).
    pub lease_until: DateTime<Utc>,
    /// Who took it, as [`ReservationListing::owner`].
    pub owner: String,
}

/// The answer of [`Store::reserve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveOutcome {
    /// Admitted on `reservation.served`; the hold is recorded.
    Admitted(Reservation),
    /// Blocked (R6): nothing was recorded.
    Blocked(Blocked),
}

/// Settling a reservation with what the upstream reported (R7).
#[derive(Debug, Clone)]
pub struct Settlement {
    /// The reservation to replace with the actual cost.
    pub reservation: ReservationId,
    /// The usage reported; `None` when the upstream reported none, in which case
    /// the estimate (the reserved amount) is billed and the event flagged.
    pub usage: Option<Usage>,
    /// Makes a retried settlement count once.
    pub idempotency_key: Option<String>,
    /// Refuse usage that costs more than the reservation
    /// ([`StoreError::Invalid`] `usage_exceeds_reservation`, nothing written, the
    /// hold kept). The usage API sets it: its caller declared the request's bounds
    /// at admission. The gateway does not: what the provider reports is billed,
    /// even beyond the reservation (R7).
    pub within_reservation: bool,
    /// When the sweep has already released the reservation because its lease ran
    /// out, bill the usage all the same from the lapsed hold's record (its cycle,
    /// its prices; kept a week), counting nothing as released twice. The gateway
    /// sets it: its provider served the request, and only a database held up
    /// past the lease kept it from renewing and settling (DESIGN.md R7). The
    /// usage API does not: its caller owns the lease, and a lapsed one is gone.
    pub bill_if_lapsed: bool,
    /// When the request finished.
    pub now: DateTime<Utc>,
}

/// A usage event as written to the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageEventRecord {
    /// Ledger row id.
    pub id: i64,
    /// Model asked for.
    pub requested: ModelId,
    /// Model that served it; its counter was charged.
    pub served: ModelId,
    /// Cost charged, nano-euros (rounded once, half away from zero; R2).
    pub cost: Nanos,
    /// True when billed the estimate because no usage was reported.
    pub estimated: bool,
    /// True when the cost exceeded the reservation (R7).
    pub over_reservation: bool,
    /// True when billed from a hold whose lease had expired: the sweep had
    /// released it, and its room was free for other requests before this cost
    /// was recorded (R7).
    pub lease_expired: bool,
    /// False when this settlement repeated an earlier one (same idempotency key)
    /// and nothing new was counted.
    pub newly_recorded: bool,
}

/// One finished request reported through the usage API's bulk recording.
#[derive(Debug, Clone)]
pub struct UsageRecord<'a> {
    /// Unique per workspace: a retried item with the same key counts once.
    pub idempotency_key: String,
    /// The model that was used (aliases resolved). No fallback applies: the usage
    /// already happened on this model.
    pub model: &'a Model,
    /// The model as the caller named it (a catalog id or an alias). A retry that
    /// names the model of the row recorded under its key repeats that row, even
    /// when a config change has since made the name an alias of another model.
    pub model_as_sent: &'a str,
    /// Token counts.
    pub usage: Usage,
}

/// What one ledger row counted (see [`Store::recorded_usage`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedUsage {
    /// The token counts reported; `None` when the row billed its reservation's
    /// estimate because no usage was reported (R7).
    pub usage: Option<Usage>,
}

impl RecordedUsage {
    /// Whether a settlement reporting `usage` (`None`: no usage, bill the
    /// estimate) repeats what this row counted, token for token.
    pub fn repeats(&self, usage: Option<&Usage>) -> bool {
        self.usage.as_ref() == usage
    }
}

/// The fate of one [`UsageRecord`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordOutcome {
    /// Counted now.
    Recorded(UsageEventRecord),
    /// Counted before under the same key, with the same model and token counts;
    /// nothing changed.
    Duplicate(UsageEventRecord),
    /// The key was used before for other usage (another model or other token
    /// counts): nothing changed, and the event recorded under it is returned.
    Conflict(UsageEventRecord),
    /// Refused by admission (R6): it would pass the plan or the model's cap.
    Blocked(Blocked),
}

/// A model's limit as stored, with its optimistic version (0: never saved).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoredLimit {
    /// The setting.
    pub limit: ModelLimit,
    /// Incremented by every accepted change.
    pub version: i64,
}

/// A change to one model's limit, based on the version the editor saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitChange {
    /// The model (must be in the catalog).
    pub model: ModelId,
    /// The version the editor loaded (0 when the model had no saved limit), or
    /// `None` to write over whatever is stored: the operator's CLI, whose commands
    /// name the value they want, not a version they saw.
    pub expected_version: Option<i64>,
    /// The new setting, validated by R5 before anything is written.
    pub limit: ModelLimit,
}

/// The workspace's settings with their optimistic version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettingsRecord {
    /// "Automatically switch to a cheaper model when a model limit is reached".
    pub automatic_fallback: bool,
    /// Incremented by every accepted change.
    pub version: i64,
}

/// One model's line of the books for a cycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelBooks {
    /// The model.
    pub id: ModelId,
    /// Spent and reserved in the cycle, nano-euros.
    pub counter: Counter,
    /// Its limit and version.
    pub limit: StoredLimit,
}

/// A model of the catalog the books were last set up with (the config's
/// `[[models]]` as the last `serve` applied them), so that a report read from
/// the database lists the catalog the limits are checked against, whichever
/// process reads it (the CLI's config may be another, or none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogEntry {
    /// The model's API id.
    pub id: ModelId,
    /// Its display name.
    pub display_name: String,
}

/// Everything the Token Limits tab, `GET /api/v1/spend` and `tollgate spend`
/// show, read in one consistent step from the counters (never from the ledger;
/// R8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendSnapshot {
    /// The plan.
    pub plan: PlanRecord,
    /// The cycle the snapshot is for.
    pub cycle: BillingCycle,
    /// Automatic fallback and its version.
    pub settings: SettingsRecord,
    /// The workspace's totals in the cycle.
    pub workspace: Counter,
    /// Every model that has a counter or a limit row (in no order).
    pub models: Vec<ModelBooks>,
    /// The catalog the books were set up with, in the config's order.
    pub catalog: Vec<CatalogEntry>,
}

/// One row of the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Row id.
    pub id: i64,
    /// When the change was accepted.
    pub at: DateTime<Utc>,
    /// Who made it (email, `cli`, or `config` for a plan applied at start).
    pub actor: String,
    /// What kind of change (`settings.automatic_fallback`, `model_limit`, `plan`,
    /// `workspace.name`, `catalog`, `user.create`, `user.disable`, `user.enable`,
    /// `user.password`, `api_key.create`, `api_key.revoke`).
    pub action: String,
    /// What it applied to (`workspace`, or a model id).
    pub subject: String,
    /// The value before, as JSON.
    pub old_value: String,
    /// The value after, as JSON.
    pub new_value: String,
}

/// Sums over the ledger of one cycle, for checks that it equals the counters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LedgerTotals {
    /// Sum of all events' cost, nano-euros.
    pub total: Nanos,
    /// Sum per served model, nano-euros.
    pub by_model: Vec<(ModelId, Nanos)>,
    /// Number of events.
    pub events: i64,
}

pub use crate::auth::Role;

/// A user as the server keeps it, password hash included: never serialised, never
/// sent to a browser (STYLE.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// Row id.
    pub id: i64,
    /// Login name, stored as [`normalized_email`] gives it.
    pub email: String,
    /// Argon2 PHC string.
    pub password_hash: String,
    /// Admin or member.
    pub role: Role,
    /// Grows by one each time the user is disabled or given a new password: a
    /// session signed in at an older epoch is over, even once the user is enabled
    /// again.
    pub session_epoch: i64,
}

/// An email address in the one form it is stored and compared in: trimmed,
/// lower-cased character by character by Unicode's rules (`Émile@Example.COM` is
/// `émile@example.com`), then composed (NFC: an `é` typed as `e` and a combining
/// accent is the one code point `é`), so one address is one user on SQLite and
/// PostgreSQL, at sign-in and in the CLI alike. Character by character, so the
/// result never depends on a letter's neighbours (a final `Σ` is `σ`, as anywhere
/// else). Letters that only full case folding would merge stay apart (`ß` and
/// `ss`: distinct addresses to a mail server too).
///
/// The domain (after the last `@`) is then written in Unicode by IDNA's rules
/// (UTS #46, as browsers do): `a@xn--exmple-cua.com` is `a@exämple.com`, the one
/// domain in its two spellings. A domain IDNA refuses is kept as lower-cased.
#[cfg(feature = "ssr")]
pub fn normalized_email(email: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    let folded: String = email
        .trim()
        .chars()
        .flat_map(char::to_lowercase)
        .nfc()
        .collect();
    match folded.rsplit_once('@') {
        Some((local, domain)) => match idna::domain_to_unicode(domain) {
            (unicode, Ok(())) if unicode != domain => {
                format!("{local}@{unicode}")
            }
            _ => folded,
        },
        None => folded,
    }
}

/// A user as `tollgate user list` shows it: never the password hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserListing {
    /// Row id.
    pub id: i64,
    /// Login name.
    pub email: String,
    /// Admin or member.
    pub role: Role,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it was disabled, if it was.
    pub disabled_at: Option<DateTime<Utc>>,
    /// How many of its keys are live (not revoked).
    pub live_keys: i64,
}

/// What [`Store::disable_user`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisabledUser {
    /// The user, now disabled (its session epoch grown by one).
    pub user: UserRecord,
    /// How many live keys it revoked.
    pub keys_revoked: u64,
}

/// An API key's metadata; the key itself is only ever stored as a hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    /// Row id, used by `tollgate key revoke`.
    pub id: i64,
    /// A label chosen at creation.
    pub name: String,
    /// The owner's id.
    pub user_id: i64,
    /// The owner's email.
    pub owner_email: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last authenticated a request, if ever, to the minute: it is
    /// written at most once a minute per key.
    pub last_used_at: Option<DateTime<Utc>>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// The persistence port of Tollgate.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Apply the operator's config: workspace name, plan and catalog (DESIGN.md §7).
    /// Creates the workspace and its settings on first start.
    ///
    /// A plan whose start date or timezone changed moves the boundaries of the
    /// cycle containing `now` (R1): its counters are rebuilt from the ledger rows
    /// that occurred within its new bounds and the holds in flight move to it, so
    /// the spend so far keeps counting. Any change of the plan is audited, by
    /// [`Actor::Config`].
    async fn apply_setup(
        &self,
        setup: &WorkspaceSetup,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// The workspace this deployment serves.
    ///
    /// Errors: [`StoreError::NotFound`] before the first start-up seeded it.
    async fn workspace(&self) -> Result<WorkspaceRecord, StoreError>;

    /// How long the write this process has under way has been running, waiting
    /// for the database's write lock included; `None` while no write is under
    /// way. Writes held up for long (another process holding the SQLite file's
    /// write lock, a PostgreSQL lock, a stalled disk) make `/healthz` answer 503,
    /// since nothing can be admitted meanwhile (DESIGN.md R6).
    fn write_held_for(&self) -> Option<std::time::Duration>;

    /// Checks again a write lock a write of this process found held by another
    /// process, or a database a write found unable to take writes, for
    /// `/healthz`. On SQLite, once a write of the hot path has waited its whole
    /// lock timeout in vain, this takes the file's write lock (waiting 0.1 s)
    /// and lets it go at once, writing nothing; once one found the file unable
    /// to take writes ([`StoreError::Unavailable`]: read-only, full), it commits
    /// a write that changes nothing the store reads. On PostgreSQL, once one
    /// found the database out of reach or read-only, it locks the plan row in a
    /// transaction it rolls back. Otherwise it does nothing.
    ///
    /// Errors: [`StoreError::Busy`] while another process still holds the lock;
    /// [`StoreError::Unavailable`] while the database still cannot take writes;
    /// [`StoreError::Database`] when the database fails.
    async fn check_write_lock(&self) -> Result<(), StoreError>;

    /// Decide admission (R6) on a consistent snapshot of plan, settings, limits and
    /// counters, and record the hold (R7), as one atomic step: concurrent calls, from
    /// one process or several sharing the database, can never pass a limit together.
    ///
    /// The request's API key (`spender.api_key_id`) is checked live in the same
    /// step, so a key revoked a moment ago admits nothing, even for a request that
    /// authenticated before the revocation (DESIGN.md §4).
    ///
    /// Errors: [`StoreError::NotFound`] (`what` = `"api key"`) for a revoked or
    /// unknown key, `"model"` for a model outside the catalog;
    /// [`StoreError::Database`] when the database fails.
    async fn reserve(&self, request: ReserveRequest) -> Result<ReserveOutcome, StoreError>;

    /// Extend a live reservation's lease to `lease_until` (streams renew while
    /// they run); a lease already ending later is kept, never shortened. Returns
    /// the lease's end now in force.
    ///
    /// Errors: [`StoreError::NotFound`] when it was settled or released, or its
    /// lease ended before `now` (expired, even if not yet swept: an expired hold
    /// is not revived).
    async fn renew_lease(
        &self,
        reservation: &ReservationId,
        lease_until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<DateTime<Utc>, StoreError>;

    /// Whom a reservation spends for (the user and API key it was admitted with),
    /// with its lease and owner while it is held: read from the reservation
    /// while it is held ([`ReservationAccess::held`], whose lease may already
    /// be past if the sweep has not released it yet), and once settled from the
    /// ledger row recorded under `settlement_key` (its settlement's idempotency
    /// key). `None` when neither exists (never made, released or swept). The
    /// usage API answers only the key that asked for a reservation about it,
    /// leaves the gateway's own holds to the gateway, and takes a hold whose
    /// lease has ended for gone (DESIGN.md §4, R7).
    ///
    /// Errors: [`StoreError::Database`] when the database fails.
    async fn reservation_spender(
        &self,
        reservation: &ReservationId,
        settlement_key: &str,
    ) -> Result<Option<ReservationAccess>, StoreError>;

    /// What the ledger row recorded under `idempotency_key` counted, `None` when no
    /// row has that key. The usage API tells a retried settlement, which repeats
    /// what it reports, from one that reports other usage (DESIGN.md §4).
    ///
    /// Errors: [`StoreError::Database`] when the database fails.
    async fn recorded_usage(
        &self,
        idempotency_key: &str,
    ) -> Result<Option<RecordedUsage>, StoreError>;

    /// Replace a reservation with its actual cost: a ledger row and the counters, in
    /// one transaction (R7). With an idempotency key already used, returns the event
    /// recorded then and changes nothing.
    ///
    /// Errors: [`StoreError::NotFound`] for an unknown, released or expired
    /// reservation; [`StoreError::Invalid`] for inconsistent usage.
    async fn settle(&self, settlement: Settlement) -> Result<UsageEventRecord, StoreError>;

    /// Drop a reservation without billing (upstream error before any usage).
    ///
    /// Errors: [`StoreError::NotFound`] when it is already gone.
    async fn release(&self, reservation: &ReservationId) -> Result<(), StoreError>;

    /// Every hold in the books, oldest first, whatever its cycle or lease.
    async fn list_reservations(&self) -> Result<Vec<ReservationListing>, StoreError>;

    /// The last `limit` rows of the usage ledger, newest first, whatever their
    /// cycle; with `flagged_only`, only rows flagged estimated, over their
    /// reservation or billed after their lease (R7).
    async fn usage_events(
        &self,
        limit: u32,
        flagged_only: bool,
    ) -> Result<Vec<UsageListing>, StoreError>;

    /// Release every reservation whose lease ended before `now`, whoever owns it
    /// (DESIGN.md R7), keeping each for a late settlement. Returns how many were
    /// released.
    ///
    /// Errors: [`StoreError::Busy`] when another process holds SQLite's write
    /// lock: a sweep waits only a moment for it (it runs again soon, and this
    /// process's other writes would wait behind it).
    async fn release_expired(&self, now: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Record finished usage reported in bulk (usage API), each item admitted (R6,
    /// without fallback) and counted at most once per idempotency key, all in one
    /// transaction.
    async fn record_usage(
        &self,
        records: &[UsageRecord<'_>],
        spender: Spender,
        now: DateTime<Utc>,
    ) -> Result<Vec<RecordOutcome>, StoreError>;

    /// The books of the cycle containing `at`.
    async fn spend_snapshot(&self, at: DateTime<Utc>) -> Result<SpendSnapshot, StoreError>;

    /// Sums over the ledger for the cycle starting at `cycle_start`: the rows its
    /// counters count, so that the two are equal (DESIGN.md R2). Those are the
    /// rows booked under the cycle; after a change of the plan's start date or
    /// timezone moved the cycle's bounds (R1), the rows that occurred within the
    /// new bounds up to the change, whatever cycle they were booked under, then
    /// the rows booked under the cycle.
    async fn ledger_totals(&self, cycle_start: DateTime<Utc>) -> Result<LedgerTotals, StoreError>;

    /// Set automatic fallback if the stored version is still `expected_version`
    /// (`None`: whatever is stored, as the CLI's `fallback on|off` asks), writing an
    /// audit row in the same transaction.
    ///
    /// Errors: [`StoreError::Conflict`] on a stale version; nothing is written.
    async fn update_settings(
        &self,
        actor: &Actor,
        expected_version: Option<i64>,
        automatic_fallback: bool,
        now: DateTime<Utc>,
    ) -> Result<SettingsRecord, StoreError>;

    /// Apply model limit changes all or nothing: each validated (R5, model in the
    /// catalog, except that the stored limit of a model the catalog dropped may be
    /// cleared) and checked against its version; one audit row per changed model.
    ///
    /// Errors: [`StoreError::Invalid`] or [`StoreError::Conflict`]; nothing is written.
    async fn update_model_limits(
        &self,
        actor: &Actor,
        changes: &[LimitChange],
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// The audit log, newest first, at most `limit` rows.
    async fn audit_log(&self, limit: u32) -> Result<Vec<AuditRecord>, StoreError>;

    /// Create a user, its email stored as [`normalized_email`] gives it, audited as
    /// `user.create` by `actor`.
    ///
    /// Errors: [`StoreError::Invalid`] `email_taken` when a user (a disabled one
    /// included) has this email already.
    async fn create_user(
        &self,
        actor: &Actor,
        email: &str,
        password_hash: &str,
        role: Role,
        now: DateTime<Utc>,
    ) -> Result<UserRecord, StoreError>;

    /// The enabled user with this email (compared as [`normalized_email`] gives it),
    /// if any.
    async fn user_by_email(&self, email: &str) -> Result<Option<UserRecord>, StoreError>;

    /// The enabled user with this id, if any: a session whose user was disabled
    /// finds none and is signed out.
    async fn user_by_id(&self, id: i64) -> Result<Option<UserRecord>, StoreError>;

    /// Every user, enabled or not, oldest first, with their live keys.
    async fn list_users(&self) -> Result<Vec<UserListing>, StoreError>;

    /// Disable the enabled user with this email (compared as [`normalized_email`]
    /// gives it) and revoke their live keys, in one transaction audited as
    /// `user.disable` by `actor`: they sign in no more, their sessions end at their
    /// next request and for good (their [`UserRecord::session_epoch`] grows), and
    /// their keys admit nothing (requests already admitted still settle). The row
    /// stays, since the ledger names it.
    ///
    /// Errors: [`StoreError::NotFound`] (`what` = `"user"`) when no enabled user has
    /// this email.
    async fn disable_user(
        &self,
        actor: &Actor,
        email: &str,
        now: DateTime<Utc>,
    ) -> Result<DisabledUser, StoreError>;

    /// Enable the disabled user with this email (compared as [`normalized_email`]
    /// gives it) again, audited as `user.enable` by `actor`: they can sign in and
    /// be given new keys. The keys revoked and the sessions ended when they were
    /// disabled stay so.
    ///
    /// Errors: [`StoreError::NotFound`] (`what` = `"user"`) when no disabled user
    /// has this email.
    async fn enable_user(
        &self,
        actor: &Actor,
        email: &str,
        now: DateTime<Utc>,
    ) -> Result<UserRecord, StoreError>;

    /// Replace the password of the user with this email (compared as
    /// [`normalized_email`] gives it), enabled or disabled, audited as
    /// `user.password` by `actor` (never with the hash): every session of the user
    /// ends, since their [`UserRecord::session_epoch`] grows; their keys stay as
    /// they are. `password_hash` is an Argon2 PHC string.
    ///
    /// Errors: [`StoreError::NotFound`] (`what` = `"user"`) when no user has this
    /// email.
    async fn set_password(
        &self,
        actor: &Actor,
        email: &str,
        password_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<UserRecord, StoreError>;

    /// Store a new API key's hash for `user_id`, audited as `api_key.create`.
    ///
    /// Errors: [`StoreError::NotFound`] (`what` = `"user"`) when the user does not
    /// exist or is disabled.
    async fn create_api_key(
        &self,
        actor: &Actor,
        user_id: i64,
        name: &str,
        key_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<ApiKeyRecord, StoreError>;

    /// The live (not revoked) key with this hash and its owner, marking it used
    /// (at most once a minute: see [`ApiKeyRecord::last_used_at`]).
    async fn authenticate_api_key(
        &self,
        key_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<(ApiKeyRecord, UserRecord)>, StoreError>;

    /// Keys, newest first, optionally only those of the user with `email`.
    async fn list_api_keys(&self, email: Option<&str>) -> Result<Vec<ApiKeyRecord>, StoreError>;

    /// Revoke a key, audited as `api_key.revoke`: it authenticates nothing from now
    /// on.
    ///
    /// Errors: [`StoreError::NotFound`] for an unknown or already revoked key.
    async fn revoke_api_key(
        &self,
        actor: &Actor,
        id: i64,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;
}

/// The store as it is shared through axum state and the Leptos context.
pub type SharedStore = Arc<dyn Store>;

#[cfg(all(test, feature = "ssr"))]
mod tests {
    use super::normalized_email;

    #[test]
    fn an_email_is_trimmed_and_lower_cased_by_unicode_rules() {
        assert_eq!(normalized_email("  Ann@Example.COM "), "ann@example.com");
        assert_eq!(normalized_email("Émile@Exemple.fr"), "émile@exemple.fr");
        // Context-free: a final sigma folds as any other, so the result is the same
        // whichever case the address was typed in.
        assert_eq!(normalized_email("ΟΔΟΣ@x.gr"), normalized_email("οδοσ@x.gr"));
        // Composed and decomposed accents are one address.
        assert_eq!(normalized_email("E\u{301}mile@x.fr"), "\u{e9}mile@x.fr");
        assert_eq!(normalized_email("\u{e9}mile@x.fr"), "\u{e9}mile@x.fr");
        let once = normalized_email("İSTANBUL@x.tr");
        assert_eq!(
            normalized_email(&once),
            once,
            "folding twice changes nothing"
        );
    }

    #[test]
    fn a_domain_in_its_ascii_form_is_the_unicode_one() {
        assert_eq!(
            normalized_email("Ann@XN--Exmple-Cua.com"),
            "ann@exämple.com"
        );
        assert_eq!(normalized_email("ann@exämple.com"), "ann@exämple.com");
        assert_eq!(normalized_email("ann@EXÄMPLE.com"), "ann@exämple.com");
        // Only the domain: a local part that looks like punycode stays.
        assert_eq!(
            normalized_email("xn--exmple-cua@example.com"),
            "xn--exmple-cua@example.com"
        );
        // A label that is not valid punycode is kept as typed, lower-cased.
        assert_eq!(normalized_email("a@xn--ü.com"), "a@xn--ü.com");
        let once = normalized_email("a@XN--exmple-cua.COM");
        assert_eq!(
            normalized_email(&once),
            once,
            "folding twice changes nothing"
        );
    }
}
