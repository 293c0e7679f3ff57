//! `Store` on SQLite: one file, WAL journal (DESIGN.md §6). Writers serialise on
//! `BEGIN IMMEDIATE`, which takes the database's write lock before the first read,
//! so an admission's snapshot cannot change under it.

use std::{str::FromStr, time::Duration};

use app::store::StoreError;
use chrono::{DateTime, Utc};
use sqlx::{
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
    Sqlite, SqlitePool,
};

use super::{batch::Batcher, books::db_error, ConnectError};

/// The SQLite adapter.
///
/// SQLite has one writer at a time. Writes of this process queue for one writer
/// connection in FIFO order instead of each taking the file lock in turn through
/// `busy_timeout`, whose sleep-and-retry wastes milliseconds under load; readers use
/// their own connections (WAL lets them read while the writer writes). Other
/// processes (the CLI) still wait on `busy_timeout`.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    writer: SqlitePool,
    /// Reservations, settlements and releases, group-committed (`db::batch`).
    batcher: Batcher,
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
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        // A connection to a local file does not go stale: checking one before
        // each use (sqlx's default) would add a round trip to every batch.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await
            .map_err(ConnectError::Open)?;
        sqlx::migrate!("../migrations/sqlite")
            .run(&writer)
            .await
            .map_err(ConnectError::Migrate)?;
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(ConnectError::Open)?;
        let batcher = {
            let writer = writer.clone();
            Batcher::spawn(move |ops| execute_batch(writer.clone(), ops))
        };
        Ok(Self {
            pool,
            writer,
            batcher,
        })
    }

    /// The connection pool, shared with the session store.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Sqlite>, StoreError> {
        self.writer.begin_with(Self::BEGIN).await.map_err(db_error)
    }

    fn writer(&self) -> &SqlitePool {
        &self.writer
    }
}

super::books::impl_store!(SqliteStore, Sqlite);
