//! `Store` on PostgreSQL, for several replicas sharing one database (DESIGN.md §6).
//! Every write first reads the workspace's plan row `FOR UPDATE`, so writers of one
//! workspace, from any replica, take turns, and each reads the counters, limits and
//! settings as the previous one committed them (READ COMMITTED gives every
//! statement a fresh snapshot).

use app::store::StoreError;
use chrono::{DateTime, Utc};
use std::str::FromStr;

use sqlx::{
    pool::PoolConnection,
    postgres::{PgConnectOptions, PgPoolOptions, PgRow},
    FromRow, PgPool, Postgres, Row,
};

use super::{
    batch::{execute_batch, Batcher, Holds, HotPath, WeakBatcher},
    books::{
        db_error, json_rows, BatchFunctions, CounterChange, EventRow, LedgerRow, NewEventRow,
        NewReservationRow, Opened, PlanRow, ReadBooks, ReservationRow,
    },
    ConnectError,
};

/// Longest a write or a read waits for a connection of the pool (all in use,
/// or the server refusing new ones) before it is answered
/// `StoreError::Unavailable` (HTTP 503): the same wait as for a lock.
const ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The PostgreSQL adapter.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// Reservations, settlements and releases, group-committed (`db::batch`) on a
    /// connection of the pool that it keeps.
    batcher: Batcher<PgWriter>,
}

impl PostgresStore {
    /// Lock the plan row read first in every write (see the module docs), and the
    /// settings row read with it. Both, not the plan's alone: a transaction that
    /// waited for the lock reads the rows it locks as the writer before it left
    /// them, but any other row of the same statement as its snapshot had it
    /// (PostgreSQL's READ COMMITTED), so the settings' version would be stale and
    /// a stale save of the tab would pass its check.
    const LOCK: &'static str = "FOR UPDATE";
    /// A transaction at READ COMMITTED, whatever the database's
    /// `default_transaction_isolation`: the plan row's lock serialises writers,
    /// and each statement after it reads what the writer before committed (the
    /// batch's opening call relies on it). At REPEATABLE READ a writer that waited
    /// for the lock would fail with a serialization error.
    const BEGIN: &'static str = "BEGIN ISOLATION LEVEL READ COMMITTED";
    /// How a hot-path statement unpacks its JSON array argument.
    const JSON: super::books::JsonDialect = super::books::JsonDialect::JsonbElements;

    /// The connection for a lease sweep: any of the pool's, whose waits hold up
    /// no other write.
    async fn sweep_connection(&self) -> Result<PoolConnection<Postgres>, StoreError> {
        self.write_connection().await
    }

    /// `Store::check_write_lock`. No lock is remembered as held between writes
    /// (a write waits for the plan row's lock up to `lock_timeout` and is then
    /// refused busy). A server that would refuse every write (a standby, or
    /// `default_transaction_read_only`) says so to a read of
    /// `transaction_read_only`, before any write has failed. Once a write of
    /// the hot path found the database out of reach or unable to write, this
    /// also locks the plan row as every write does, in a transaction it rolls
    /// back; once it could, the database is known to take writes again.
    ///
    /// Errors: [`StoreError::Unavailable`] while it still cannot;
    /// [`StoreError::Busy`] when another session holds the plan row past the
    /// lock timeout.
    async fn check_held_write_lock(&self) -> Result<(), StoreError> {
        if !self.batcher.unwritable() {
            let read_only: String =
                sqlx::query_scalar("SELECT current_setting('transaction_read_only')")
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db_error)?;
            return match read_only.as_str() {
                "off" => Ok(()),
                _ => Err(StoreError::Unavailable(
                    "the database is read-only (transaction_read_only is on)".into(),
                )),
            };
        }
        // A probe, not a batch: it has no use for the hot path's session.
        let mut conn = PgWriter::new(self.write_connection().await?, self.pool.clone());
        conn.setup = SessionSetup::Probe;
        conn.begin().await?;
        let locked = conn.read_plan().await;
        let ended = conn.rollback().await;
        locked?;
        ended?;
        self.batcher.writable_again();
        Ok(())
    }

    /// Connect to `url` and apply migrations.
    ///
    /// Errors: [`ConnectError`] when the server cannot be reached or migrated.
    pub async fn open(url: &str) -> Result<Self, ConnectError> {
        // A lock held longer than this (another session inside a transaction on
        // the plan row, say) fails the statement with `lock_not_available`,
        // answered as busy (503 with Retry-After), as SQLite's busy timeout
        // does, instead of holding requests for as long as it is held.
        let options = PgConnectOptions::from_str(url)
            .map_err(ConnectError::Open)?
            .options([("lock_timeout", "10s")]);
        // sqlx would try, then fail with its own words on how it was built.
        let tls = match options.get_ssl_mode() {
            sqlx::postgres::PgSslMode::Require => Some("require"),
            sqlx::postgres::PgSslMode::VerifyCa => Some("verify-ca"),
            sqlx::postgres::PgSslMode::VerifyFull => Some("verify-full"),
            _ => None,
        };
        if let Some(mode) = tls {
            return Err(ConnectError::TlsRequired(mode));
        }
        // One plain connection first: when the server is down or refuses us, the
        // operator reads why (refused, unknown database, authentication), not the
        // pool's "timed out" after half a minute.
        let probe = sqlx::ConnectOptions::connect(&options)
            .await
            .map_err(ConnectError::Open)?;
        sqlx::Connection::close(probe)
            .await
            .map_err(ConnectError::Open)?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await
            .map_err(ConnectError::Open)?;
        sqlx::migrate!("../migrations/postgres")
            .run(&pool)
            .await
            .map_err(ConnectError::Migrate)?;
        fold_stored_emails(&pool)
            .await
            .map_err(ConnectError::Open)?;
        let batcher = {
            let pool = pool.clone();
            Batcher::spawn(
                move || {
                    let pool = pool.clone();
                    async move { Ok(PgWriter::new(pool.acquire().await.map_err(db_error)?, pool)) }
                },
                execute_batch,
            )
        };
        // Its own connection, which does not show the vacuum's warnings: one that
        // skips the table while another session vacuums it (another replica,
        // autovacuum) is routine, and would log a line a second.
        let quiet = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options.options([("client_min_messages", "error")]));
        tokio::spawn(watch_clock(quiet.clone(), batcher.downgrade()));
        tokio::spawn(vacuum_holds(quiet, batcher.downgrade()));
        Ok(Self { pool, batcher })
    }

    /// The connection pool, shared with the session store.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A connection of the pool: the plan row's lock serialises writers.
    async fn write_connection(&self) -> Result<PoolConnection<Postgres>, StoreError> {
        self.pool.acquire().await.map_err(db_error)
    }
}

super::books::impl_store!(PostgresStore, Postgres);

/// How often [`vacuum_holds`] vacuums the reservations table.
const VACUUM_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The vacuum of the reservations table: its dead rows are removed, and its
/// pages left to the next holds, without waiting for another session's vacuum
/// (`SKIP_LOCKED`) and without giving empty pages back to the file
/// (`TRUNCATE false`: that takes the table's exclusive lock, which would hold
/// up every admission while it lasts).
const VACUUM_HOLDS: &str = "VACUUM (SKIP_LOCKED, TRUNCATE false) reservations";

/// How far this machine's clock may be from the database server's before
/// [`watch_clock`] warns.
pub(crate) const CLOCK_SKEW_TOLERATED: chrono::TimeDelta = chrono::TimeDelta::seconds(1);

/// How often [`watch_clock`] compares the clocks.
const CLOCK_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// How far the database server's clock, read as `database` by a query sent at
/// `sent` and answered at `answered` (this machine's clock), is ahead of this
/// machine's (negative when behind): `database` against the midpoint of the
/// round trip.
pub(crate) fn clock_skew(
    sent: DateTime<Utc>,
    answered: DateTime<Utc>,
    database: DateTime<Utc>,
) -> chrono::TimeDelta {
    database - (sent + (answered - sent) / 2)
}

/// Compares this machine's clock with the database server's, a second after
/// the store opens (a command of the CLI is over by then and says nothing),
/// then every [`CLOCK_CHECK_EVERY`], while the store lives. Replicas stamp
/// holds and sweep leases by their own clocks, and cut cycles by them (README,
/// DESIGN.md R1, R7): a clock more than [`CLOCK_SKEW_TOLERATED`] from the
/// server's is logged as a warning, once until it is back within it, which is
/// logged too. The server's clock stands for the other replicas', which are
/// compared with it in turn. A comparison that fails is skipped.
async fn watch_clock(pool: PgPool, batcher: WeakBatcher<PgWriter>) {
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + VACUUM_EVERY,
        CLOCK_CHECK_EVERY,
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut skewed = false;
    loop {
        tick.tick().await;
        if batcher.upgrade().is_none() {
            return;
        }
        let sent = Utc::now();
        let read = tokio::time::timeout(
            ANSWER_WAIT,
            sqlx::query_scalar::<_, DateTime<Utc>>("SELECT clock_timestamp()").fetch_one(&pool),
        )
        .await;
        let Ok(Ok(database)) = read else {
            continue;
        };
        let skew = clock_skew(sent, Utc::now(), database);
        let off = skew.abs() > CLOCK_SKEW_TOLERATED;
        if off && !skewed {
            tracing::warn!(
                skew_ms = skew.num_milliseconds(),
                "this machine's clock is {} ms {} the database server's: replicas must keep \
                 their clocks in step (NTP), or holds are released early and cycles turn at \
                 different times",
                skew.num_milliseconds().abs(),
                if skew > chrono::TimeDelta::zero() {
                    "behind"
                } else {
                    "ahead of"
                },
            );
        } else if !off && skewed {
            tracing::info!(
                skew_ms = skew.num_milliseconds(),
                "this machine's clock is in step with the database server's again"
            );
        }
        skewed = off;
    }
}

/// Vacuums the reservations table every [`VACUUM_EVERY`], on a connection of
/// the pool, until the store is gone (DESIGN.md §6, R7).
///
/// Every request inserts a hold and deletes it (R7): two row versions, one of
/// them dead once the request is settled, 2,000 a second at 2,000 requests/s.
/// PostgreSQL's autovacuum visits a table at most once a minute by default, and
/// not at all where it is turned off; meanwhile the dead rows stay in the table
/// and its primary key, and every settlement's look-up of its hold wades
/// through them. Measured with the gateway bench at 64 connections, on a server
/// with autovacuum off: after a few minutes of load the table was 21 MB, for 15
/// live rows and 102,000 dead ones; the settlement's `DELETE` took 2.8 ms on
/// average (0.07 ms on a vacuumed table), and the gateway served 2,445
/// requests/s, then 5,861 with a vacuum every half second. A vacuum of the
/// table kept small took about 3 ms of the server's time.
///
/// A vacuum that fails (the database out of reach, say) is tried again at the
/// next tick; the first failure after a success is logged as a warning, the
/// rest at debug level, so an outage does not log a line a second. A vacuum
/// that skips the table because another session vacuums it is not logged
/// (`pool`'s sessions show errors only). A role that may not vacuum the table
/// ([`may_vacuum_holds`]) gets one warning, and the table is left to
/// autovacuum.
async fn vacuum_holds(pool: PgPool, batcher: WeakBatcher<PgWriter>) {
    // The first a tick from now: a store opened for one command of the CLI has
    // no holds to vacuum and says nothing of a vacuum it will not need.
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + VACUUM_EVERY, VACUUM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    let mut allowed = false;
    loop {
        tick.tick().await;
        if batcher.upgrade().is_none() {
            return;
        }
        if !allowed {
            match may_vacuum_holds(&pool).await {
                Ok(true) => allowed = true,
                Ok(false) => {
                    tracing::warn!(
                        "this role may not vacuum the reservations table (only its owner, \
                         the database's owner or a superuser may): it is left to autovacuum, \
                         and admissions slow down as its dead rows pile up"
                    );
                    return;
                }
                // The database out of reach: asked again at the next tick.
                Err(error) => {
                    tracing::debug!(%error, "could not ask whether this role may vacuum");
                    continue;
                }
            }
        }
        // Not `answered`: its log line at every unanswered try is what the
        // `failing` flag keeps out of an outage's log.
        let vacuumed =
            tokio::time::timeout(ANSWER_WAIT, sqlx::raw_sql(VACUUM_HOLDS).execute(&pool))
                .await
                .map_err(|_| format!("no answer within {} s", ANSWER_WAIT.as_secs()))
                .and_then(|done| done.map_err(|e| e.to_string()));
        match vacuumed {
            Ok(_) if failing => {
                tracing::info!("the reservations table is vacuumed again");
                failing = false;
            }
            Ok(_) => {}
            Err(error) if failing => {
                tracing::debug!(%error, "could not vacuum the reservations table");
            }
            Err(error) => {
                tracing::warn!(%error, "could not vacuum the reservations table; trying again every second");
                failing = true;
            }
        }
    }
}

/// Whether the session's role may vacuum the reservations table: it is a
/// superuser, or has the rights of the table's owner or of the database's
/// owner, or (PostgreSQL 17 and later) the table's `MAINTAIN` privilege.
async fn may_vacuum_holds(pool: &PgPool) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT r.rolsuper \
             OR pg_has_role(c.relowner, 'USAGE') \
             OR pg_has_role(d.datdba, 'USAGE') \
             OR CASE WHEN current_setting('server_version_num')::int >= 170000 \
                     THEN has_table_privilege(c.oid, 'MAINTAIN') ELSE false END \
         FROM pg_roles r, pg_class c, pg_database d \
         WHERE r.rolname = current_user AND c.oid = 'reservations'::regclass \
           AND d.datname = current_database()",
    )
    .fetch_one(pool)
    .await
}

/// The batcher's connection on PostgreSQL, with the pool it came from, from
/// which a connection found lost at the start of a batch is replaced.
#[derive(Debug)]
pub(crate) struct PgWriter {
    conn: PoolConnection<Postgres>,
    pool: PgPool,
    /// Whether `conn`'s session is set up for the hot path: its statement
    /// timeout ([`HOT_STATEMENT_TIMEOUT`]) and the functions a batch calls
    /// (`books::BatchFunctions`, temporary functions of its session).
    setup: SessionSetup,
    /// A batch has begun whose `BEGIN` is not sent yet: with functions, it goes
    /// in the round trip of the batch's opening call.
    begin_pending: bool,
}

/// How far a connection's session is set up for the hot path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionSetup {
    /// Not set up yet.
    Unmade,
    /// Set up, with the functions: a batch takes two round trips.
    Made,
    /// Set up without the functions: the role may not make temporary objects
    /// in the database (its `TEMPORARY` privilege revoked). Batches ask step by
    /// step.
    StepByStep,
    /// Never set up: the connection only probes the plan row's lock
    /// (`check_held_write_lock`), and goes back to the pool as it came.
    Probe,
}

/// The statement timeout of the hot path's sessions, unless the database sets
/// a shorter one: below [`ANSWER_WAIT`], so that a statement that waits for the
/// plan row's lock in turns (behind a queue of other replicas' writers, each
/// turn with its own `lock_timeout`) is ended by the database as busy
/// (SQLSTATE 57014: HTTP 503 `database_busy`), before the hot path takes its
/// connection for lost (`database_unavailable`).
const HOT_STATEMENT_TIMEOUT: &str = "12s";

/// Sets a session's statement timeout to [`HOT_STATEMENT_TIMEOUT`] where it is
/// off or longer; one the database sets shorter is kept.
fn set_hot_statement_timeout() -> String {
    format!(
        "SELECT set_config('statement_timeout', '{HOT_STATEMENT_TIMEOUT}', false) \
         WHERE current_setting('statement_timeout')::interval = '0' \
            OR current_setting('statement_timeout')::interval > '{HOT_STATEMENT_TIMEOUT}'"
    )
}

impl Drop for PgWriter {
    /// A session set up for the hot path is closed rather than given back to
    /// the pool, whose other users keep the database's statement timeout.
    fn drop(&mut self) {
        if self.setup != SessionSetup::Probe {
            self.conn.close_on_drop();
        }
    }
}

impl PgWriter {
    fn new(conn: PoolConnection<Postgres>, pool: PgPool) -> PgWriter {
        PgWriter {
            conn,
            pool,
            setup: SessionSetup::Unmade,
            begin_pending: false,
        }
    }

    /// Opens a batch's transaction on this connection, first setting up its
    /// session if it is not yet: the statement timeout, and the functions a
    /// batch calls, outside the transaction, so that a batch rolled back does
    /// not take them away. A role refused temporary objects (SQLSTATE 42501)
    /// gets a warning, and its batches ask step by step.
    async fn begin_here(&mut self) -> Result<(), StoreError> {
        if self.setup == SessionSetup::Unmade {
            sqlx::query(&set_hot_statement_timeout())
                .persistent(false)
                .execute(&mut *self.conn)
                .await
                .map_err(db_error)?;
            self.setup = SessionSetup::StepByStep;
            if let Some(functions) = &hot_sql().functions {
                let made = simple_query(&mut self.conn, &functions.create).await;
                self.setup = match made {
                    Ok(_) => SessionSetup::Made,
                    Err(e) if is_insufficient_privilege(&e) => {
                        tracing::warn!(error = %e, "the database refuses this role temporary \
                            objects (its TEMPORARY privilege): each batch of the gateway takes \
                            two more round trips, four when it admits");
                        SessionSetup::StepByStep
                    }
                    Err(e) => {
                        self.setup = SessionSetup::Unmade;
                        return Err(db_error(e));
                    }
                };
            }
        }
        sqlx::query(PostgresStore::BEGIN)
            .execute(&mut *self.conn)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    /// The session's functions, once it has made them.
    fn functions(&self) -> Option<&'static BatchFunctions> {
        hot_sql()
            .functions
            .as_ref()
            .filter(|_| self.setup == SessionSetup::Made)
    }

    /// Sends the batch's `BEGIN` if [`HotPath::begin`] left it for the batch's
    /// first call, and that call is not the one that takes it along.
    async fn send_begin(&mut self) -> Result<(), StoreError> {
        if std::mem::take(&mut self.begin_pending) {
            answered(sqlx::query(PostgresStore::BEGIN).execute(&mut *self.conn)).await?;
        }
        Ok(())
    }

    /// Replaces a connection found lost at the start of a batch (a server
    /// restart, an ended session, a moment's network failure) with one of the
    /// pool, set up for the hot path, its batch's transaction open.
    async fn begin_anew(&mut self) -> Result<(), StoreError> {
        tracing::info!("the hot path's connection was lost: connecting anew");
        self.conn.close_on_drop();
        self.conn = self.pool.acquire().await.map_err(db_error)?;
        if self.setup != SessionSetup::Probe {
            self.setup = SessionSetup::Unmade;
        }
        answered_store(self.begin_here()).await
    }
}

/// Runs `sql`, one or more statements with their values written in, in one
/// round trip (PostgreSQL's simple query protocol); returns the rows of all.
fn simple_query<'c>(
    conn: &'c mut sqlx::PgConnection,
    sql: &'c str,
) -> futures_util::future::BoxFuture<'c, Result<Vec<PgRow>, sqlx::Error>> {
    use sqlx::Executor;
    conn.fetch_all(sqlx::raw_sql(sql))
}

/// Whether `e` is PostgreSQL's `insufficient_privilege` (SQLSTATE 42501).
fn is_insufficient_privilege(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|code| code == "42501")
}

/// Longest the hot path waits for the answer to one statement. A lock is waited
/// for 10 s at most (`lock_timeout`), so a statement unanswered after this is
/// on a connection the network has lost without a word (a firewall dropping
/// packets, a paused host): the batch fails as the database out of reach
/// (`StoreError::Unavailable`, HTTP 503), its connection is replaced, and the
/// writes queued behind it do not wait for TCP to give up.
const ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// The result of `statement`, or [`StoreError::Unavailable`] when the database
/// has not answered it within [`ANSWER_WAIT`].
async fn answered<T>(
    statement: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, StoreError> {
    answered_store(async { statement.await.map_err(db_error) }).await
}

/// [`answered`] for a statement whose errors are already the store's.
async fn answered_store<T>(
    statement: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(ANSWER_WAIT, statement)
        .await
        .unwrap_or_else(|_| Err(no_answer()))
}

/// The error of a statement the database left unanswered for [`ANSWER_WAIT`].
fn no_answer() -> StoreError {
    let detail = format!(
        "no answer from the database within {} s",
        ANSWER_WAIT.as_secs()
    );
    tracing::error!("{detail}: its connection is given up");
    StoreError::Unavailable(detail)
}

/// The hot path on PostgreSQL, a round trip per call (`books::HotSql`); a batch
/// reads what it needs before deciding in one of them (`open`). The plan
/// row's lock, taken by `open` or `read_plan` and in every other write, orders the writers
/// of every replica. There is no books version: other replicas write all the
/// time, so every batch reads the books under the plan row's lock, and nothing is
/// carried from one batch to the next.
impl HotPath for PgWriter {
    /// A connection lost since its last batch (a server restart, an ended
    /// session, a moment's network failure) fails its `BEGIN`: nothing of the
    /// batch has run, so it begins again on a new connection of the pool, and
    /// only if that fails too is the database out of reach. A `BEGIN` left
    /// unanswered for [`ANSWER_WAIT`] is not tried again: a network that carries
    /// nothing would only keep the new connection waiting as long as the pool
    /// lets it (10 s), and every write queued behind the batch with it.
    ///
    /// With the session's functions, `BEGIN` waits for the batch's first call
    /// ([`HotPath::open`]), which sends both in one round trip and finds a lost
    /// connection the same way.
    async fn begin(&mut self) -> Result<Option<i64>, StoreError> {
        if self.setup == SessionSetup::Made {
            self.begin_pending = true;
            return Ok(None);
        }
        let begun = tokio::time::timeout(ANSWER_WAIT, self.begin_here())
            .await
            .map_err(|_| no_answer())?;
        if let Err(StoreError::Unavailable(_)) = begun {
            self.begin_anew().await?;
        } else {
            begun?;
        }
        Ok(None)
    }

    /// One round trip, [`BatchFunctions::open_call`] with the batch's `BEGIN`;
    /// none where the connection could not make the function (the batch then
    /// asks step by step). A connection found lost by it is replaced, and the
    /// call made again on the new one, as [`HotPath::begin`] does: nothing of
    /// the batch was kept.
    async fn open(
        &mut self,
        ids: &[&str],
        spenders: Option<&[i64]>,
    ) -> Result<Option<Opened>, StoreError> {
        let Some(functions) = self.functions() else {
            self.send_begin().await?;
            return Ok(None);
        };
        let (ids, spenders, read_books) = (
            json_rows(ids)?,
            json_rows(spenders.unwrap_or_default())?,
            spenders.is_some(),
        );
        let mut rows = None;
        if std::mem::take(&mut self.begin_pending) {
            let call = functions.open_call(Some(PostgresStore::BEGIN), &ids, read_books, &spenders);
            let first = tokio::time::timeout(ANSWER_WAIT, simple_query(&mut self.conn, &call))
                .await
                .map_err(|_| no_answer())?
                .map_err(db_error);
            match first {
                // Made again below, after `BEGIN` on the new connection.
                Err(StoreError::Unavailable(_)) => {
                    self.begin_anew().await?;
                    if self.functions().is_none() {
                        return Ok(None);
                    }
                }
                first => rows = Some(first?),
            }
        }
        let rows = match rows {
            Some(rows) => rows,
            None => {
                let call = functions.open_call(None, &ids, read_books, &spenders);
                answered(simple_query(&mut self.conn, &call)).await?
            }
        };
        let rows = rows
            .iter()
            .map(<(String, String)>::from_row)
            .collect::<Result<Vec<_>, _>>()
            .map_err(db_error)?;
        Opened::from_rows(rows).map(Some)
    }

    async fn take_reservations(
        &mut self,
        ids: &[&str],
        holds: Holds,
    ) -> Result<Vec<ReservationRow>, StoreError> {
        self.send_begin().await?;
        let sql = hot_sql();
        answered(
            sqlx::query_as(match holds {
                Holds::Live => &sql.take_reservations,
                Holds::Lapsed => &sql.take_lapsed,
            })
            .bind(json_rows(ids)?)
            .fetch_all(&mut *self.conn),
        )
        .await
    }

    async fn find_events(
        &mut self,
        keys: &[&str],
    ) -> Result<std::collections::HashMap<String, EventRow>, StoreError> {
        self.send_begin().await?;
        let rows: Vec<LedgerRow> = answered(
            sqlx::query_as(&hot_sql().find_events)
                .bind(json_rows(keys)?)
                .fetch_all(&mut *self.conn),
        )
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|row| Some((row.idempotency_key?, row.event)))
            .collect())
    }

    async fn read_plan(&mut self) -> Result<PlanRow, StoreError> {
        self.send_begin().await?;
        answered_store(read_plan(&mut self.conn, PostgresStore::LOCK)).await
    }

    async fn read_books(&mut self, cycle_start: i64, ids: &[i64]) -> Result<ReadBooks, StoreError> {
        self.send_begin().await?;
        let rows = answered(
            sqlx::query_as(&hot_sql().read_books)
                .bind(cycle_start)
                .bind(json_rows(ids)?)
                .fetch_all(&mut *self.conn),
        )
        .await?;
        ReadBooks::sort(rows)
    }

    async fn write(
        &mut self,
        reservations: &[NewReservationRow<'_>],
        events: &[NewEventRow<'_>],
        counters: &[CounterChange<'_>],
    ) -> Result<Vec<LedgerRow>, StoreError> {
        self.send_begin().await?;
        let (reservations, events, counters) = (
            json_rows(reservations)?,
            json_rows(events)?,
            json_rows(counters)?,
        );
        // One round trip: the function's call and `COMMIT`.
        if let Some(functions) = self.functions() {
            let call = functions.write_call(&reservations, &events, &counters);
            let rows = answered(simple_query(&mut self.conn, &call)).await?;
            return rows
                .iter()
                .map(|row| LedgerRow::from_json(row.try_get(0).map_err(db_error)?))
                .collect();
        }
        let write = hot_sql()
            .write
            .as_deref()
            .ok_or_else(|| StoreError::Database("no one-statement write here".into()))?;
        let inserted = answered(
            sqlx::query_as(write)
                .bind(reservations)
                .bind(events)
                .bind(counters)
                .fetch_all(&mut *self.conn),
        )
        .await?;
        answered(sqlx::query("COMMIT").execute(&mut *self.conn)).await?;
        Ok(inserted)
    }

    async fn rollback(&mut self) -> Result<(), StoreError> {
        // A `BEGIN` never sent opened nothing.
        if std::mem::take(&mut self.begin_pending) {
            return Ok(());
        }
        answered(sqlx::query("ROLLBACK").execute(&mut *self.conn))
            .await
            .map(drop)
    }

    fn discard(&mut self) {
        self.conn.close_on_drop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(millis: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_800_000_000_000 + millis).unwrap()
    }

    #[test]
    fn the_database_clock_is_compared_with_the_middle_of_the_round_trip() {
        // Sent at 0, answered at 10 ms: the server read its clock at about 5 ms.
        assert_eq!(clock_skew(at(0), at(10), at(5)), chrono::TimeDelta::zero());
        // A server 2 s ahead, and one 1.5 s behind.
        assert_eq!(
            clock_skew(at(0), at(10), at(2_005)),
            chrono::TimeDelta::seconds(2)
        );
        assert_eq!(
            clock_skew(at(0), at(10), at(-1_495)),
            chrono::TimeDelta::milliseconds(-1_500)
        );
        // A slow answer is no skew: the server's reading falls within the trip.
        let slow = clock_skew(at(0), at(3_000), at(2_000));
        assert!(slow.abs() <= CLOCK_SKEW_TOLERATED, "{slow}");
    }
}
