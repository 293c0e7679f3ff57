//! `Store` on SQLite: one file, WAL journal (DESIGN.md §6). Writers serialise on
//! `BEGIN IMMEDIATE`, which takes the database's write lock before the first read,
//! so an admission's snapshot cannot change under it.

use std::{
    str::FromStr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use rusqlite::OptionalExtension;

use app::store::StoreError;
use chrono::{DateTime, Utc};
use sqlx::{
    pool::PoolConnection,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
    Sqlite, SqlitePool,
};

use super::{
    batch::{execute_batch, Batcher, Holds, HotPath, Lent, WeakBatcher},
    books::{
        database_error, db_error, json_rows, plan_query, CounterChange, EventRow, Fault, LedgerRow,
        NewEventRow, NewReservationRow, PlanFields, PlanRow, ReadBooks, ReservationRow,
        WORKSPACE_ID,
    },
    ConnectError,
};

/// The SQLite adapter.
///
/// SQLite has one writer at a time. Every write of this process goes through one
/// writer connection, held by the batcher (`db::batch`): the hot path's writes are
/// group-committed on it and the others borrow it between batches, so they queue
/// in one line instead of each taking the file lock in turn through
/// `busy_timeout`, whose sleep-and-retry wastes milliseconds under load. Readers
/// use their own connections (WAL lets them read while the writer writes). Other
/// processes (the CLI) still wait on `busy_timeout`.
///
/// The batches themselves run on a connection of their own, opened with rusqlite
/// and used in the batcher's task ([`SqliteWriter`]): sqlx runs each SQLite
/// connection on a worker thread of its own, and every call to it is handed over
/// there and back, two thread wake-ups a call. On this machine's 2 virtual CPUs
/// those hand-overs, not SQLite's work, were most of what the gateway added to a
/// request (`server/benches/gateway.sh`).
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// The database file.
    file: std::path::PathBuf,
    pool: SqlitePool,
    /// The writer's one connection, which the batcher holds.
    writer: SqlitePool,
    /// Reservations, settlements and releases, group-committed (`db::batch`), on
    /// the writer whose sqlx connection it lends to the other writes.
    batcher: Batcher<SqliteWriter>,
    /// Set when a batch found the file's write lock held by another process past
    /// [`BUSY_TIMEOUT`], cleared when one takes it again: meanwhile the writes
    /// the writer is lent for wait [`SHORT_WAIT`] for it (see
    /// [`SqliteStore::write_connection`]).
    held_elsewhere: Arc<AtomicBool>,
}

/// How durable an acknowledged write is (DESIGN.md §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous=NORMAL` in WAL mode: survives a crash of the process.
    #[default]
    Normal,
    /// `synchronous=FULL`: also survives a power loss.
    Full,
}

impl SqliteStore {
    /// Apply no lock clause: `BEGIN IMMEDIATE` already holds the write lock.
    const LOCK: &'static str = "";
    /// Take the write lock before the first read, so a snapshot cannot change.
    const BEGIN: &'static str = "BEGIN IMMEDIATE";
    /// The books' version, read by the hot path's connection: it changes
    /// whenever another connection commits (another process, this one's readers,
    /// or the batcher's sqlx connection while lent). Every batch is written on
    /// the hot path's connection, so the books it carries from batch to batch
    /// stay exact until this changes (`db::batch`).
    const BOOKS_VERSION: &'static str = "SELECT data_version FROM pragma_data_version()";
    /// How a hot-path statement unpacks its JSON array argument.
    const JSON: super::books::JsonDialect = super::books::JsonDialect::JsonEach;

    /// Open the file named by `url` (created if missing) and apply migrations.
    ///
    /// Errors: [`ConnectError`] when the file cannot be opened or migrated.
    pub async fn open(url: &str, durability: Durability) -> Result<Self, ConnectError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(ConnectError::Open)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match durability {
                Durability::Normal => SqliteSynchronous::Normal,
                Durability::Full => SqliteSynchronous::Full,
            })
            .busy_timeout(BUSY_TIMEOUT)
            .pragma("journal_size_limit", WAL_SIZE_LIMIT.to_string())
            .foreign_keys(true);
        let file = options.get_filename().to_owned();
        create_private(&file).map_err(|e| ConnectError::Open(sqlx::Error::Io(e)))?;
        // Held until the schema is migrated and the emails folded.
        let _migrating = lock_for_migration(&file)
            .await
            .map_err(|e| ConnectError::Open(sqlx::Error::Io(e)))?;
        // A connection to a local file does not go stale: checking one before
        // each use (sqlx's default) would add a round trip to every batch.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(options.clone().pragma("wal_autocheckpoint", "0"))
            .await
            .map_err(ConnectError::Open)?;
        sqlx::migrate!("../migrations/sqlite")
            .run(&writer)
            .await
            .map_err(ConnectError::Migrate)?;
        fold_stored_emails(&writer)
            .await
            .map_err(ConnectError::Open)?;
        let hot_options = HotOptions {
            path: options.get_filename().to_owned(),
            durability,
        };
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(ConnectError::Open)?;
        let held_elsewhere = Arc::new(AtomicBool::new(false));
        let writer_pool = writer.clone();
        let batcher = Batcher::spawn(
            {
                let held_elsewhere = held_elsewhere.clone();
                move || {
                    let writer = writer_pool.clone();
                    let hot_options = hot_options.clone();
                    let held_elsewhere = held_elsewhere.clone();
                    async move {
                        let conn = writer.acquire().await.map_err(db_error)?;
                        let hot = hot_options.open()?;
                        Ok(SqliteWriter {
                            conn,
                            hot,
                            held_elsewhere,
                        })
                    }
                }
            },
            execute_batch,
        );
        tokio::spawn(checkpoint(pool.clone(), batcher.downgrade()));
        Ok(Self {
            file,
            pool,
            writer,
            batcher,
            held_elsewhere,
        })
    }

    /// The connection pool, shared with the session store.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The writer's pool: its one connection, held by the batcher.
    pub(crate) fn writer_pool(&self) -> &SqlitePool {
        &self.writer
    }

    /// The database file.
    pub(crate) fn file(&self) -> &std::path::Path {
        &self.file
    }

    /// `Store::check_write_lock`: while another process is known to hold the
    /// file's write lock, takes it (waiting [`SHORT_WAIT`]) and lets it go at once;
    /// once it could, the lock is no longer known held. Once a write of the hot
    /// path found the file unable to take writes (read-only, a full disk, an I/O
    /// error), it commits a write that changes nothing the store reads (the
    /// file header's `user_version`, set to what it is): only a write that
    /// reaches the file tells. Once it could, the file is known to take writes.
    ///
    /// Errors: [`StoreError::Busy`] while the lock is still held;
    /// [`StoreError::Unavailable`] while the file still cannot be written.
    async fn check_held_write_lock(&self) -> Result<(), StoreError> {
        let unwritable = self.batcher.unwritable();
        if !unwritable && !self.held_elsewhere.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut conn = self.write_connection().await?;
        if unwritable {
            let version: i64 = sqlx::query_scalar("PRAGMA user_version")
                .fetch_one(&mut *conn.conn)
                .await
                .map_err(db_error)?;
            sqlx::query(&format!("PRAGMA user_version = {version}"))
                .execute(&mut *conn.conn)
                .await
                .map_err(db_error)?;
        } else {
            // Nothing is written: the books the batcher carries stay exact.
            conn.books_unchanged();
            sqlx::query(SqliteStore::BEGIN)
                .execute(&mut *conn.conn)
                .await
                .map_err(db_error)?;
            sqlx::query("ROLLBACK")
                .execute(&mut *conn.conn)
                .await
                .map_err(db_error)?;
        }
        self.held_elsewhere.store(false, Ordering::Relaxed);
        self.batcher.writable_again();
        Ok(())
    }

    /// The writer connection, lent by the batcher (see [`SqliteStore`]). While
    /// another process is known to hold the file's write lock (a batch waited
    /// [`BUSY_TIMEOUT`] for it in vain), the write waits only [`SHORT_WAIT`] for
    /// it: each write lent the writer would otherwise hold it, and every write of
    /// the process queued behind it (a settlement's tries among them), for the
    /// whole 10 s, one after the other. One that cannot start then fails at once
    /// with [`StoreError::Busy`], as the batches queued behind a refused one do.
    ///
    /// Errors: [`StoreError::Database`] when the batcher has stopped or the lock
    /// wait cannot be set.
    async fn write_connection(&self) -> Result<Lent<SqliteWriter>, StoreError> {
        let wait = match self.held_elsewhere.load(Ordering::Relaxed) {
            true => SHORT_WAIT,
            false => BUSY_TIMEOUT,
        };
        self.lend_waiting(wait).await
    }

    /// The writer connection for the lease sweep (`Store::release_expired`,
    /// DESIGN.md R7): it waits only [`SHORT_WAIT`] for another process's write
    /// lock, since every write of this process would wait behind it; a sweep
    /// that cannot start gives up, and the next one tries again.
    ///
    /// Errors: as [`SqliteStore::write_connection`].
    async fn sweep_connection(&self) -> Result<Lent<SqliteWriter>, StoreError> {
        self.lend_waiting(SHORT_WAIT).await
    }

    /// The writer connection, waiting at most `wait` for another process's
    /// write lock (each loan sets its own wait).
    async fn lend_waiting(&self, wait: Duration) -> Result<Lent<SqliteWriter>, StoreError> {
        let mut lent = self.batcher.lend().await?;
        set_lock_wait(&mut lent.conn, wait).await?;
        Ok(lent)
    }
}

/// The batcher's two connections to the database file: sqlx's, which it lends to
/// the writes outside the hot path (this dereferences to it), and rusqlite's, on
/// which it runs the hot path's batches ([`HotPath`]). The batcher uses one at a
/// time, so they never wait for each other's lock.
#[derive(Debug)]
pub(crate) struct SqliteWriter {
    /// Declared (so dropped) before `conn`: when the batcher ends, this one is
    /// closed before `conn` goes back to its pool, whose close therefore waits
    /// for it: closes that overlap each miss being the file's last, on which
    /// SQLite deletes the WAL (`Database::close`).
    hot: rusqlite::Connection,
    conn: PoolConnection<Sqlite>,
    /// The store's `held_elsewhere`, which each batch's `BEGIN` sets or clears.
    held_elsewhere: Arc<AtomicBool>,
}

impl std::ops::Deref for SqliteWriter {
    type Target = PoolConnection<Sqlite>;

    fn deref(&self) -> &Self::Target {
        &self.conn
    }
}

impl std::ops::DerefMut for SqliteWriter {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.conn
    }
}

/// How the hot path's connection is opened: the file and the settings of the
/// store's other connections.
#[derive(Debug, Clone)]
struct HotOptions {
    path: std::path::PathBuf,
    durability: Durability,
}

impl HotOptions {
    /// Opens the hot path's connection to the (already migrated) database file.
    ///
    /// Errors: [`StoreError::Database`] when the file cannot be opened or set up.
    fn open(&self) -> Result<rusqlite::Connection, StoreError> {
        use rusqlite::OpenFlags;
        let conn = rusqlite::Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(hot_error)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(hot_error)?;
        let synchronous = match self.durability {
            Durability::Normal => "NORMAL",
            Durability::Full => "FULL",
        };
        conn.pragma_update(None, "synchronous", synchronous)
            .map_err(hot_error)?;
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(hot_error)?;
        // Checkpoints are the checkpoint task's (see `checkpoint`).
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(hot_error)?;
        conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)
            .map_err(hot_error)?;
        Ok(conn)
    }
}

/// The hot path on SQLite: each call runs at once on the batcher's rusqlite
/// connection, in the batcher's own task (a batch of one or two operations takes
/// tens of microseconds), with statements prepared once and kept.
impl HotPath for SqliteWriter {
    async fn begin(&mut self) -> Result<Option<i64>, StoreError> {
        let begun = self
            .hot
            .prepare_cached(SqliteStore::BEGIN)
            .and_then(|mut begin| begin.execute([]))
            .map_err(hot_error);
        // Busy only once the whole `BUSY_TIMEOUT` has passed: another process's lock.
        self.held_elsewhere
            .store(matches!(begun, Err(StoreError::Busy(_))), Ordering::Relaxed);
        begun?;
        let version = self
            .hot
            .prepare_cached(SqliteStore::BOOKS_VERSION)
            .and_then(|mut version| version.query_row([], |row| row.get(0)));
        if version.is_err() {
            // `begin` fails with no transaction open (the batch's contract).
            let _ = self.hot.execute_batch("ROLLBACK");
        }
        version.map(Some).map_err(hot_error)
    }

    async fn take_reservations(
        &mut self,
        ids: &[&str],
        holds: Holds,
    ) -> Result<Vec<ReservationRow>, StoreError> {
        let (find, delete) = match holds {
            Holds::Live => (FIND_RESERVATION, DELETE_RESERVATION),
            Holds::Lapsed => (FIND_LAPSED, DELETE_LAPSED),
        };
        let mut find = self.hot.prepare_cached(find).map_err(hot_error)?;
        let mut delete = self.hot.prepare_cached(delete).map_err(hot_error)?;
        let mut taken = Vec::with_capacity(ids.len());
        for id in ids {
            let row = find
                .query_row(rusqlite::params![WORKSPACE_ID, id], |row| {
                    Ok(ReservationRow {
                        id: row.get("id")?,
                        cycle_start: row.get("cycle_start")?,
                        requested_model: row.get("requested_model")?,
                        served_model: row.get("served_model")?,
                        amount_nanos: row.get("amount_nanos")?,
                        input_eur_per_mtok: row.get("input_eur_per_mtok")?,
                        cached_input_eur_per_mtok: row.get("cached_input_eur_per_mtok")?,
                        output_eur_per_mtok: row.get("output_eur_per_mtok")?,
                        user_id: row.get("user_id")?,
                        api_key_id: row.get("api_key_id")?,
                        created_at: row.get("created_at")?,
                    })
                })
                .optional()
                .map_err(hot_error)?;
            if let Some(row) = row {
                delete
                    .execute(rusqlite::params![WORKSPACE_ID, id])
                    .map_err(hot_error)?;
                taken.push(row);
            }
        }
        Ok(taken)
    }

    async fn find_events(
        &mut self,
        keys: &[&str],
    ) -> Result<std::collections::HashMap<String, EventRow>, StoreError> {
        let keys = json_rows(keys)?;
        let mut find = self
            .hot
            .prepare_cached(&hot_sql().find_events)
            .map_err(hot_error)?;
        let rows = find.query_map([keys], ledger_row).map_err(hot_error)?;
        let mut found = std::collections::HashMap::new();
        for row in rows {
            let row = row.map_err(hot_error)?;
            if let Some(key) = row.idempotency_key {
                found.insert(key, row.event);
            }
        }
        Ok(found)
    }

    async fn read_plan(&mut self) -> Result<PlanRow, StoreError> {
        let mut read = self
            .hot
            .prepare_cached(&plan_query(SqliteStore::LOCK))
            .map_err(hot_error)?;
        let row = read
            .query_row([WORKSPACE_ID], |row| {
                Ok(PlanRow {
                    plan: PlanFields {
                        budget_nanos: row.get("budget_nanos")?,
                        overage_nanos: row.get("overage_nanos")?,
                        plan_start: row.get("plan_start")?,
                        timezone: row.get("timezone")?,
                    },
                    automatic_fallback: row.get("automatic_fallback")?,
                    settings_version: row.get("settings_version")?,
                })
            })
            .optional()
            .map_err(hot_error)?;
        row.ok_or(StoreError::NotFound { what: "plan" })
    }

    async fn read_books(&mut self, cycle_start: i64, ids: &[i64]) -> Result<ReadBooks, StoreError> {
        let ids = json_rows(ids)?;
        let mut read = self
            .hot
            .prepare_cached(&hot_sql().read_books)
            .map_err(hot_error)?;
        let rows = read
            .query_map(rusqlite::params![cycle_start, ids], |row| {
                Ok(super::books::BooksRow {
                    kind: row.get("kind")?,
                    model_id: row.get("model_id")?,
                    amount: row.get("amount")?,
                    reserved: row.get("reserved")?,
                    enabled: row.get("enabled")?,
                    version: row.get("version")?,
                })
            })
            .map_err(hot_error)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(hot_error)?;
        ReadBooks::sort(rows)
    }

    async fn write(
        &mut self,
        reservations: &[NewReservationRow<'_>],
        events: &[NewEventRow<'_>],
        counters: &[CounterChange<'_>],
    ) -> Result<Vec<LedgerRow>, StoreError> {
        let hot = &self.hot;
        if !reservations.is_empty() {
            let mut insert = hot.prepare_cached(INSERT_RESERVATION).map_err(hot_error)?;
            for new in reservations {
                let row = &new.row;
                insert
                    .execute(rusqlite::params![
                        WORKSPACE_ID,
                        row.id,
                        row.cycle_start,
                        row.requested_model,
                        row.served_model,
                        row.amount_nanos,
                        row.input_eur_per_mtok,
                        row.cached_input_eur_per_mtok,
                        row.output_eur_per_mtok,
                        row.user_id,
                        row.api_key_id,
                        new.owner,
                        new.lease_until,
                        row.created_at,
                    ])
                    .map_err(hot_error)?;
            }
        }
        let mut inserted = Vec::with_capacity(events.len());
        if !events.is_empty() {
            let mut insert = hot.prepare_cached(INSERT_EVENT).map_err(hot_error)?;
            for event in events {
                insert
                    .execute(rusqlite::params![
                        WORKSPACE_ID,
                        event.cycle_start,
                        event.occurred_at,
                        event.user_id,
                        event.api_key_id,
                        event.requested_model,
                        event.served_model,
                        event.prompt_tokens,
                        event.cached_tokens,
                        event.completion_tokens,
                        event.reasoning_tokens,
                        event.input_eur_per_mtok,
                        event.cached_input_eur_per_mtok,
                        event.output_eur_per_mtok,
                        event.cost_nanos,
                        event.reserved_nanos,
                        event.estimated,
                        event.over_reservation,
                        event.lease_expired,
                        event.reservation_id,
                        event.idempotency_key,
                        event.admitted_at,
                    ])
                    .map_err(hot_error)?;
                inserted.push(LedgerRow {
                    event: EventRow {
                        id: hot.last_insert_rowid(),
                        requested_model: event.requested_model.to_owned(),
                        served_model: event.served_model.to_owned(),
                        cost_nanos: event.cost_nanos,
                        estimated: event.estimated,
                        over_reservation: event.over_reservation,
                        lease_expired: event.lease_expired,
                    },
                    reservation_id: event.reservation_id.map(str::to_owned),
                    idempotency_key: event.idempotency_key.map(str::to_owned),
                });
            }
        }
        if !counters.is_empty() {
            let mut add = hot.prepare_cached(ADD_TO_COUNTER).map_err(hot_error)?;
            let mut create = hot.prepare_cached(CREATE_COUNTER).map_err(hot_error)?;
            for change in counters {
                let changed = add
                    .execute(rusqlite::params![
                        change.spent_nanos,
                        change.reserved_nanos,
                        WORKSPACE_ID,
                        change.cycle_start,
                        change.model_id,
                    ])
                    .map_err(hot_error)?;
                if changed == 0 {
                    // A new row starts at the change: a negative one breaks its
                    // CHECK, as it would have taken the counter below zero.
                    create
                        .execute(rusqlite::params![
                            WORKSPACE_ID,
                            change.cycle_start,
                            change.model_id,
                            change.spent_nanos,
                            change.reserved_nanos,
                        ])
                        .map_err(hot_error)?;
                }
            }
        }
        hot.prepare_cached("COMMIT")
            .and_then(|mut commit| commit.execute([]))
            .map_err(hot_error)?;
        Ok(inserted)
    }

    async fn rollback(&mut self) -> Result<(), StoreError> {
        self.hot
            .prepare_cached("ROLLBACK")
            .and_then(|mut rollback| rollback.execute([]))
            .map(drop)
            .map_err(hot_error)
    }

    fn discard(&mut self) {
        // The rusqlite connection closes when the writer is dropped.
        self.conn.close_on_drop();
    }
}

// The hot path's writes on SQLite, a row per call: in the batcher's task a call
// costs no round trip, and binding a row's values directly costs less than
// writing it as JSON for SQLite to parse (`books::HotSql`, which the other
// writes of ledger rows and counters still use). None has a `RETURNING` clause:
// SQLite gathers returned rows in a temporary table, with a page cache of its
// own made for each statement run.

/// The reservation `?2` of workspace `?1`, as a [`ReservationRow`].
const FIND_RESERVATION: &str = concat!(
    "SELECT ",
    super::books::reservation_columns!(),
    " FROM reservations WHERE workspace_id = ?1 AND id = ?2"
);

/// Deletes the reservation `?2` of workspace `?1`.
const DELETE_RESERVATION: &str = "DELETE FROM reservations WHERE workspace_id = ?1 AND id = ?2";

/// As [`FIND_RESERVATION`], among the holds whose lease ran out.
const FIND_LAPSED: &str = concat!(
    "SELECT ",
    super::books::reservation_columns!(),
    " FROM lapsed_reservations WHERE workspace_id = ?1 AND id = ?2"
);

/// As [`DELETE_RESERVATION`], among the holds whose lease ran out.
const DELETE_LAPSED: &str = "DELETE FROM lapsed_reservations WHERE workspace_id = ?1 AND id = ?2";

/// Inserts a [`NewReservationRow`] of workspace `?1`.
const INSERT_RESERVATION: &str = "INSERT INTO reservations (workspace_id, id, cycle_start, \
    requested_model, served_model, amount_nanos, input_eur_per_mtok, cached_input_eur_per_mtok, \
    output_eur_per_mtok, user_id, api_key_id, owner, lease_until, created_at) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)";

/// Inserts a [`NewEventRow`] of workspace `?1`; its id is the connection's last
/// inserted row id.
const INSERT_EVENT: &str = "INSERT INTO usage_events (workspace_id, cycle_start, occurred_at, \
    user_id, api_key_id, requested_model, served_model, prompt_tokens, cached_tokens, \
    completion_tokens, reasoning_tokens, input_eur_per_mtok, cached_input_eur_per_mtok, \
    output_eur_per_mtok, cost_nanos, reserved_nanos, estimated, over_reservation, \
    lease_expired, reservation_id, idempotency_key, admitted_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, \
    ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22)";

/// Adds `?1` spent and `?2` reserved nano-euros to the counter of workspace `?3`,
/// cycle `?4` and model `?5` ([`CounterChange`]), if it exists.
const ADD_TO_COUNTER: &str = "UPDATE counters SET spent_nanos = spent_nanos + ?1, \
    reserved_nanos = reserved_nanos + ?2 \
    WHERE workspace_id = ?3 AND cycle_start = ?4 AND model_id = ?5";

/// Creates the counter of workspace `?1`, cycle `?2` and model `?3` at `?4` spent
/// and `?5` reserved nano-euros.
const CREATE_COUNTER: &str = "INSERT INTO counters (workspace_id, cycle_start, model_id, \
    spent_nanos, reserved_nanos) VALUES (?1, ?2, ?3, ?4, ?5)";

/// A [`LedgerRow`] read from the hot path's connection.
fn ledger_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<LedgerRow> {
    Ok(LedgerRow {
        event: EventRow {
            id: row.get("id")?,
            requested_model: row.get("requested_model")?,
            served_model: row.get("served_model")?,
            cost_nanos: row.get("cost_nanos")?,
            estimated: row.get("estimated")?,
            over_reservation: row.get("over_reservation")?,
            lease_expired: row.get("lease_expired")?,
        },
        reservation_id: row.get("reservation_id")?,
        idempotency_key: row.get("idempotency_key")?,
    })
}

/// A hot-path error as the store reports it, as [`db_error`] does sqlx's: the
/// constraints sqlx sorts as broken rules of the books give
/// [`StoreError::Invalid`], anything else [`StoreError::Database`].
fn hot_error(e: rusqlite::Error) -> StoreError {
    use rusqlite::ffi;
    let fault = match &e {
        rusqlite::Error::SqliteFailure(failure, _)
            if matches!(
                failure.extended_code,
                ffi::SQLITE_CONSTRAINT_UNIQUE
                    | ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                    | ffi::SQLITE_CONSTRAINT_FOREIGNKEY
                    | ffi::SQLITE_CONSTRAINT_NOTNULL
                    | ffi::SQLITE_CONSTRAINT_CHECK
                    // `counters_stay_integers`: a counter past 2^63.
                    | ffi::SQLITE_CONSTRAINT_TRIGGER
            ) =>
        {
            Fault::BrokeARule
        }
        rusqlite::Error::SqliteFailure(failure, _)
            if matches!(
                failure.code,
                ffi::ErrorCode::DatabaseBusy | ffi::ErrorCode::DatabaseLocked
            ) =>
        {
            Fault::Busy
        }
        rusqlite::Error::SqliteFailure(failure, _)
            if matches!(
                failure.code,
                ffi::ErrorCode::ReadOnly
                    | ffi::ErrorCode::SystemIoFailure
                    | ffi::ErrorCode::DiskFull
                    | ffi::ErrorCode::CannotOpen
            ) =>
        {
            Fault::Unavailable
        }
        _ => Fault::Other,
    };
    database_error(&e, fault)
}

super::books::impl_store!(SqliteStore, Sqlite);

/// Creates the database file `path`, readable and writable by its owner only,
/// unless it exists (or is SQLite's `:memory:`). It holds password hashes and the
/// ids of live sessions, which are the session cookies' values; SQLite gives its
/// WAL and shared-memory files the database file's mode. A file that exists keeps
/// the mode its operator gave it.
///
/// Errors: the I/O error when the file cannot be created (a missing folder, no
/// permission).
fn create_private(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if path.as_os_str() == ":memory:" {
        return Ok(());
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(std::io::Error::new(
            e.kind(),
            format!(
                "cannot create {}: {e}",
                app::text::shown_path(path.display())
            ),
        )),
    }
}

/// Takes an exclusive lock for migrating the database file at `path`: an advisory
/// `flock` on the folder that holds it, waiting for any other process that holds
/// it. Returns the open folder, which holds the lock until dropped; `None` for
/// `:memory:`.
///
/// Every process migrates the database as it opens it (`tollgate serve` and each
/// CLI command): on a new file, several commands started at once raced to create
/// the same tables and failed (`table plans already exists`). With the lock they
/// migrate one after the other, and the later ones find nothing to do. The folder
/// is locked, not the file: closing a descriptor of the file would drop the POSIX
/// locks SQLite holds on it in this process.
///
/// Errors: the I/O error when the folder cannot be opened or locked.
async fn lock_for_migration(path: &std::path::Path) -> std::io::Result<Option<std::fs::File>> {
    if path.as_os_str() == ":memory:" {
        return Ok(None);
    }
    let folder = match path.parent() {
        Some(folder) if !folder.as_os_str().is_empty() => folder.to_owned(),
        _ => std::path::PathBuf::from("."),
    };
    tokio::task::spawn_blocking(move || {
        let folder = match std::fs::File::open(&folder) {
            Ok(folder) => folder,
            // A folder that can be entered but not listed: migrate unlocked, as
            // before, rather than refuse a database that opens.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                tracing::warn!(folder = %folder.display(), "cannot lock the database's folder for migrating: migrating without");
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        folder.lock()?;
        Ok(Some(folder))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Opens a connection to `file`, checkpoints the WAL into the file
/// (`TRUNCATE`) and closes the connection. Run once every other connection of
/// the process is closed, it is the file's last connection, and SQLite then
/// deletes the `-wal` and `-shm` files (`Database::close`). Another process
/// with the file open keeps them (and may keep the checkpoint from finishing):
/// nothing is lost either way.
///
/// Errors: the SQLite error when the file cannot be opened or read.
pub(super) fn close_last(file: &std::path::Path) -> rusqlite::Result<()> {
    let conn = rusqlite::Connection::open_with_flags(
        file,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Copies the WAL into the file and empties it, whether or not this close
    // is the last (a reader of another process makes it busy, and keeps it).
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    conn.close().map_err(|(_, error)| error)
}

/// How long a connection waits for another process's write lock (the CLI's).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a write lent the writer waits for the file's write lock instead of
/// [`BUSY_TIMEOUT`] when waiting longer would only hold up every other write of
/// the process: the lease sweep's, and any while another process is known to
/// hold the lock ([`SqliteStore::write_connection`]). Enough for this process's
/// own session writes, and for a lock let go just now.
const SHORT_WAIT: Duration = Duration::from_millis(100);

/// Set how long `conn` waits for another connection's lock (`busy_timeout`).
///
/// Errors: [`StoreError::Database`] when the statement fails.
async fn set_lock_wait(
    conn: &mut sqlx::SqliteConnection,
    wait: Duration,
) -> Result<(), StoreError> {
    sqlx::query(&format!("PRAGMA busy_timeout = {}", wait.as_millis()))
        .execute(conn)
        .await
        .map(drop)
        .map_err(db_error)
}

/// How often the WAL is checkpointed into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// WAL frames (4 KiB pages written) past which the checkpoint also makes the
/// next write start the WAL over, so that it stops growing: about 64 MB.
const RESTART_AT_FRAMES: i64 = 16_000;
/// WAL frames a `RESTART` checkpoint may find still to copy: it copies them with
/// every write held, so the passive checkpoints must have caught up first (after
/// a long read by another process, the WAL can hold gigabytes).
const RESTART_BEHIND_AT_MOST: i64 = 2_000;
/// How long a `RESTART` checkpoint may wait for readers, holding up every write
/// meanwhile. Readers of this process finish in well under that; a reader that
/// does not (another process's long read transaction: a backup, an `sqlite3`
/// shell, a replication tool) makes the checkpoint give up instead.
const RESTART_WAIT: Duration = Duration::from_millis(5);
/// How long the checkpoint task leaves the WAL growing after a `RESTART` gave
/// up on a reader, before it tries again.
const RESTART_BACKOFF: Duration = Duration::from_secs(5);
/// Bytes a WAL file is truncated to once it starts over.
const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;
/// WAL frames past which the checkpoint that starts the WAL over also truncates
/// the file to nothing (`TRUNCATE`), so that the disk space a WAL grown behind
/// another process's long read took is given back at once, not at the next
/// write, which could be hours away on an idle workspace.
const TRUNCATE_PAST_FRAMES: i64 = 2 * RESTART_AT_FRAMES;

/// Checkpoints the WAL in the background, off the writer's path (DESIGN.md §6).
///
/// By default SQLite checkpoints in the commit that fills the WAL to 1,000 pages:
/// that commit copies the pages into the database file and waits for its fsync,
/// and every write queued behind it waits too. So the writer connection does not
/// checkpoint (`wal_autocheckpoint=0`); every [`CHECKPOINT_EVERY`] this task runs
/// a `PASSIVE` checkpoint on a reader, which copies what it can without blocking
/// anyone. Under steady writes a passive checkpoint never catches up with the
/// last frames, so the WAL would only grow: past [`RESTART_AT_FRAMES`] the task
/// borrows the writer between two batches for a `RESTART` checkpoint
/// ([`restart_wal`]), after which the next write starts the WAL over. It does
/// so only once the passive ones have left at most [`RESTART_BEHIND_AT_MOST`]
/// frames to copy, since it copies them with every write held. While another process holds
/// a read transaction open, a `RESTART` cannot finish: it gives up after
/// [`RESTART_WAIT`] and is tried again [`RESTART_BACKOFF`] later, the WAL
/// growing meanwhile, rather than hold up the writes.
///
/// Measured with the gateway bench at 2,000 requests/s (the gateway's added p99),
/// when the hot path ran on sqlx: 6.3-6.7 ms with SQLite's own checkpoints,
/// 2.5-3.5 ms with this task, 1.9 ms with no checkpoint at all. A larger WAL was
/// slower (8-10 ms at 32,000 frames). On rusqlite (2026-12-04): 0.64-1.1 ms in
/// most runs with this task, 0.5 ms without; a `RESTART` held writes for 1.4-3.1
/// ms, and restarting at 64,000 frames gave 1.4-18 ms. With another process
/// reading for 45 s meanwhile, the WAL grew to 2 GB and the p99 to 0.9-3.9 ms
/// (before [`RESTART_WAIT`], writes stopped for the whole read); once the read
/// ended, one write waited about 0.5 s, most of it the truncation of the 2 GB
/// WAL file (0.1-0.4 s on this machine's disk), which the first commit after a
/// `RESTART` did then, and a `TRUNCATE` ([`Reset`]) now does in the checkpoint,
/// so that an idle store gives the space back too. Ends with the store.
async fn checkpoint(pool: SqlitePool, batcher: WeakBatcher<SqliteWriter>) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_restart = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let Some(batcher) = batcher.upgrade() else {
            return;
        };
        // (busy, frames in the WAL, frames checkpointed)
        let passive: Result<(i64, i64, i64), _> = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&pool)
            .await;
        let (frames, checkpointed) = match passive {
            Ok((_, frames, checkpointed)) => (frames, checkpointed),
            // The store is closing (a command that has finished): the last
            // connection checkpoints (`Database::close`).
            Err(sqlx::Error::PoolClosed) => return,
            Err(error) => {
                tracing::warn!(%error, "could not checkpoint the WAL");
                continue;
            }
        };
        if !restart_due(frames, checkpointed) || tokio::time::Instant::now() < next_restart {
            continue;
        }
        let restarted = match batcher.lend().await {
            Ok(mut writer) => {
                // A checkpoint moves pages, not what they say.
                writer.books_unchanged();
                restart_wal(&mut writer, Reset::for_frames(frames)).await
            }
            Err(error) => Err(error),
        };
        match restarted {
            Ok(Restart::Done) => {}
            Ok(Restart::Busy) => {
                tracing::info!(
                    frames,
                    "another connection holds a read transaction open: the WAL keeps growing until it ends"
                );
                next_restart = tokio::time::Instant::now() + RESTART_BACKOFF;
            }
            Err(error) => tracing::warn!(%error, "could not restart the WAL"),
        }
    }
}

/// Whether the WAL, `frames` long with `checkpointed` of them in the database
/// file, is due a `RESTART`: past [`RESTART_AT_FRAMES`], with at most
/// [`RESTART_BEHIND_AT_MOST`] left to copy.
fn restart_due(frames: i64, checkpointed: i64) -> bool {
    frames >= RESTART_AT_FRAMES && frames - checkpointed <= RESTART_BEHIND_AT_MOST
}

/// How a checkpoint starts the WAL over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reset {
    /// `RESTART`: the next write starts the WAL over, truncating the file to
    /// [`WAL_SIZE_LIMIT`] if it is larger.
    Restart,
    /// `TRUNCATE`: as `RESTART`, and the file is truncated to nothing at once.
    Truncate,
}

impl Reset {
    /// The reset for a WAL `frames` long: [`Reset::Truncate`] past
    /// [`TRUNCATE_PAST_FRAMES`], else [`Reset::Restart`], which lets the next
    /// writes reuse the file's space instead of growing it again.
    fn for_frames(frames: i64) -> Reset {
        if frames > TRUNCATE_PAST_FRAMES {
            Reset::Truncate
        } else {
            Reset::Restart
        }
    }

    fn statement(self) -> &'static str {
        match self {
            Reset::Restart => "PRAGMA wal_checkpoint(RESTART)",
            Reset::Truncate => "PRAGMA wal_checkpoint(TRUNCATE)",
        }
    }
}

/// What a `RESTART` (or `TRUNCATE`) checkpoint did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restart {
    /// Every frame is in the database file; the next write starts the WAL over.
    Done,
    /// A reader still needed the WAL after [`RESTART_WAIT`]: nothing restarts.
    Busy,
}

/// Runs a `RESTART` or `TRUNCATE` checkpoint (`reset`) on `conn`, waiting at
/// most [`RESTART_WAIT`] for readers, then gives `conn` its [`BUSY_TIMEOUT`] back.
///
/// Errors: [`StoreError::Database`] when a statement fails; the busy timeout is
/// restored first whenever it can be.
async fn restart_wal(
    conn: &mut sqlx::SqliteConnection,
    reset: Reset,
) -> Result<Restart, StoreError> {
    set_lock_wait(conn, RESTART_WAIT).await?;
    // (busy, frames in the WAL, frames checkpointed)
    let checkpoint: Result<(i64, i64, i64), _> = sqlx::query_as(reset.statement())
        .fetch_one(&mut *conn)
        .await;
    set_lock_wait(conn, BUSY_TIMEOUT).await?;
    match checkpoint.map_err(db_error)? {
        (0, _, _) => Ok(Restart::Done),
        _ => Ok(Restart::Busy),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use sqlx::ConnectOptions;

    use super::*;

    #[test]
    fn hot_path_errors_are_sorted_as_sqlx_sorts_them() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER NOT NULL CHECK (n >= 0) UNIQUE)",
        )
        .unwrap();
        let insert = |n: Option<i64>| {
            conn.execute("INSERT INTO t (n) VALUES (?1)", [n])
                .map_err(hot_error)
        };
        insert(Some(1)).unwrap();
        for broken in [Some(-1), None, Some(1)] {
            assert!(
                matches!(
                    insert(broken),
                    Err(StoreError::Invalid {
                        code: "constraint_violation",
                        ..
                    })
                ),
                "{broken:?}"
            );
        }
        // A trigger's abort is a rule of the books too (sqlx's kind is `Other`,
        // its code 1811, which `db_error` sorts the same way): trying again
        // cannot help.
        conn.execute_batch(
            "CREATE TRIGGER t_stays BEFORE DELETE ON t BEGIN SELECT RAISE(ABORT, 'kept'); END",
        )
        .unwrap();
        let deleted = conn.execute("DELETE FROM t", []).map_err(hot_error);
        assert!(
            matches!(
                deleted,
                Err(StoreError::Invalid {
                    code: "constraint_violation",
                    ..
                })
            ),
            "{deleted:?}"
        );
    }

    #[test]
    fn the_wal_restarts_once_the_passive_checkpoints_have_caught_up() {
        assert!(!restart_due(RESTART_AT_FRAMES - 1, RESTART_AT_FRAMES - 1));
        assert!(restart_due(RESTART_AT_FRAMES, RESTART_AT_FRAMES));
        assert!(restart_due(20_000, 20_000 - RESTART_BEHIND_AT_MOST));
        // A backlog, left by another process's long read: copied passively first.
        assert!(!restart_due(20_000, 20_000 - RESTART_BEHIND_AT_MOST - 1));
        assert!(!restart_due(500_000, 0));
    }

    #[test]
    fn only_a_wal_grown_well_past_its_restart_point_is_truncated() {
        assert_eq!(Reset::for_frames(RESTART_AT_FRAMES), Reset::Restart);
        assert_eq!(Reset::for_frames(TRUNCATE_PAST_FRAMES), Reset::Restart);
        assert_eq!(Reset::for_frames(TRUNCATE_PAST_FRAMES + 1), Reset::Truncate);
        assert_eq!(Reset::for_frames(500_000), Reset::Truncate);
    }

    /// A file the process may not write (opened read-only here; a read-only
    /// mount, a full disk and I/O errors alike) is the database out of reach, a
    /// 503 to try again later, on both kinds of connection.
    #[tokio::test]
    async fn a_file_that_cannot_be_written_is_unavailable_not_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("books.db");
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (n INTEGER)")
            .unwrap();
        let hot = rusqlite::Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let inserted = hot
            .execute("INSERT INTO t (n) VALUES (1)", [])
            .map_err(hot_error);
        assert!(
            matches!(inserted, Err(StoreError::Unavailable(_))),
            "{inserted:?}"
        );
        let mut other = SqliteConnectOptions::new()
            .filename(&path)
            .read_only(true)
            .connect()
            .await
            .unwrap();
        let inserted = insert_one(&mut other).await;
        assert!(
            matches!(inserted, Err(StoreError::Unavailable(_))),
            "{inserted:?}"
        );
        assert_eq!(inserted.unwrap_err().code(), "database_unavailable");
    }

    #[tokio::test]
    async fn a_lock_held_past_the_wait_is_busy_not_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("books.db");
        let holder = rusqlite::Connection::open(&path).unwrap();
        holder
            .execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (n INTEGER); BEGIN IMMEDIATE")
            .unwrap();
        // The hot path's connection (rusqlite) and the others' (sqlx), each
        // waiting no time at all for the lock.
        let hot = rusqlite::Connection::open(&path).unwrap();
        hot.busy_timeout(Duration::ZERO).unwrap();
        let begun = hot.execute_batch("BEGIN IMMEDIATE").map_err(hot_error);
        assert!(matches!(begun, Err(StoreError::Busy(_))), "{begun:?}");
        let mut other = SqliteConnectOptions::new()
            .filename(&path)
            .busy_timeout(Duration::ZERO)
            .connect()
            .await
            .unwrap();
        let inserted = insert_one(&mut other).await;
        assert!(matches!(inserted, Err(StoreError::Busy(_))), "{inserted:?}");
        assert_eq!(inserted.unwrap_err().code(), "database_busy");
        // Once the lock is let go, the same write goes through.
        holder.execute_batch("COMMIT").unwrap();
        insert_one(&mut other).await.unwrap();
    }

    /// A row into the table `t` of the tests above, on a connection of sqlx.
    async fn insert_one(conn: &mut sqlx::SqliteConnection) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO t (n) VALUES (1)")
            .execute(conn)
            .await
            .map(drop)
            .map_err(db_error)
    }

    #[tokio::test]
    async fn a_truncating_reset_gives_the_wal_s_space_back_without_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("books.db");
        let mut conn = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .pragma("wal_autocheckpoint", "0")
            .connect()
            .await
            .unwrap();
        sqlx::query("CREATE TABLE scratch (n BLOB NOT NULL)")
            .execute(&mut conn)
            .await
            .unwrap();
        for _ in 0..64 {
            sqlx::query("INSERT INTO scratch (n) VALUES (randomblob(16384))")
                .execute(&mut conn)
                .await
                .unwrap();
        }
        let wal = || {
            std::fs::metadata(dir.path().join("books.db-wal"))
                .unwrap()
                .len()
        };
        assert!(wal() > 1024 * 1024, "{} bytes", wal());
        assert_eq!(
            restart_wal(&mut conn, Reset::Restart).await.unwrap(),
            Restart::Done
        );
        assert!(
            wal() > 1024 * 1024,
            "a restart leaves the file to the next write"
        );
        assert_eq!(
            restart_wal(&mut conn, Reset::Truncate).await.unwrap(),
            Restart::Done
        );
        assert_eq!(wal(), 0);
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM scratch")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(rows, 64);
    }

    #[tokio::test]
    async fn a_restart_gives_up_on_another_process_s_reader_instead_of_holding_up_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("books.db");
        // The writer's settings, without the store's own checkpoint task, whose
        // passive checkpoints would at times hold the checkpoint lock here.
        let mut writer = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(BUSY_TIMEOUT)
            .pragma("wal_autocheckpoint", "0")
            .connect()
            .await
            .unwrap();
        let conn = &mut writer;
        let write = |n: i64| format!("INSERT INTO scratch (n) VALUES ({n})");
        sqlx::query("CREATE TABLE scratch (n INTEGER NOT NULL)")
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query(&write(1)).execute(&mut *conn).await.unwrap();

        // Another process (a backup, say) reads in a long transaction.
        let outside = rusqlite::Connection::open(&path).unwrap();
        outside.execute_batch("BEGIN").unwrap();
        let seen: i64 = outside
            .query_row("SELECT count(*) FROM scratch", [], |row| row.get(0))
            .unwrap();
        assert_eq!(seen, 1);
        sqlx::query(&write(2)).execute(&mut *conn).await.unwrap();

        // The connection's busy timeout is 10 s: a checkpoint that waited on it
        // would still be waiting here.
        let within = Duration::from_secs(2);
        let restarted = tokio::time::timeout(within, restart_wal(conn, Reset::Restart)).await;
        assert_eq!(
            restarted
                .expect("the checkpoint waited for the reader")
                .unwrap(),
            Restart::Busy
        );
        let busy_timeout: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(
            busy_timeout, 10_000,
            "the writer waits for the CLI's lock again"
        );
        sqlx::query(&write(3)).execute(&mut *conn).await.unwrap();

        // Once the reader is done, the WAL starts over.
        outside.execute_batch("COMMIT").unwrap();
        let restarted = tokio::time::timeout(within, restart_wal(conn, Reset::Restart)).await;
        assert_eq!(restarted.unwrap().unwrap(), Restart::Done);
        sqlx::query(&write(4)).execute(&mut *conn).await.unwrap();
        let (_, frames, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert!(frames <= 2, "the WAL started over: {frames} frames");
    }

    #[tokio::test]
    async fn a_new_database_is_its_owners_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.db");
        let url = format!("sqlite://{}", path.display());
        let store = SqliteStore::open(&url, Durability::Normal).await.unwrap();
        let mode = |suffix: &str| {
            let file = format!("{}{suffix}", path.display());
            std::fs::metadata(file).unwrap().permissions().mode() & 0o777
        };
        assert_eq!(mode(""), 0o600);
        assert_eq!(mode("-wal"), 0o600, "the WAL holds the same data");
        drop(store);

        // A file the operator made keeps its mode.
        let shared = dir.path().join("shared.db");
        std::fs::File::create(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o640)).unwrap();
        let url = format!("sqlite://{}", shared.display());
        drop(SqliteStore::open(&url, Durability::Normal).await.unwrap());
        let mode = std::fs::metadata(&shared).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
    }

    #[tokio::test]
    async fn the_checkpoint_task_ends_quietly_once_the_pool_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("books.db").display());
        let store = SqliteStore::open(&url, Durability::Normal).await.unwrap();
        // As when a command closes the store while the task holds the batcher
        // for one more tick: the pool is closed, the batcher still alive.
        store.pool.close().await;
        let ended = tokio::time::timeout(
            5 * CHECKPOINT_EVERY,
            checkpoint(store.pool.clone(), store.batcher.downgrade()),
        )
        .await;
        assert!(
            ended.is_ok(),
            "the task kept ticking (and warning) on a closed pool"
        );
    }
}
