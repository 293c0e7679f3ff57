//! `Store` on SQLite: one file, WAL journal (DESIGN.md §6). Writers serialise on
//! `BEGIN IMMEDIATE`, which takes the database's write lock before the first read,
//! so an admission's snapshot cannot change under it.

use std::{str::FromStr, time::Duration};

use app::store::StoreError;
use chrono::{DateTime, Utc};
use sqlx::{
    pool::PoolConnection,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
    Sqlite, SqlitePool,
};

use super::{
    batch::{Batcher, Lent, WeakBatcher},
    books::db_error,
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
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Reservations, settlements and releases, group-committed (`db::batch`), on
    /// the writer connection it lends to the other writes.
    batcher: Batcher<PoolConnection<Sqlite>>,
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
    /// Changes whenever another connection (another process, or this one's
    /// readers) commits: the batcher's connection does every other write of
    /// this process, so its books stay exact until this changes (`db::batch`).
    const BOOKS_VERSION: Option<&'static str> =
        Some("SELECT data_version FROM pragma_data_version()");
    /// How a hot-path statement unpacks its JSON array argument.
    const JSON: super::books::JsonDialect = super::books::JsonDialect::JsonEach;
    /// A batch goes to the database in two calls (`books::HotSql`).
    const JOIN_BATCH: bool = true;

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
            .pragma("journal_size_limit", WAL_SIZE_LIMIT.to_string())
            .foreign_keys(true);
        create_private(options.get_filename())
            .map_err(|e| ConnectError::Open(sqlx::Error::Io(e)))?;
        // Held until the schema is migrated and the emails folded.
        let _migrating = lock_for_migration(options.get_filename())
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
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(ConnectError::Open)?;
        let batcher = Batcher::spawn(
            move || {
                let writer = writer.clone();
                async move {
                    let mut conn = writer.acquire().await.map_err(db_error)?;
                    sqlx::query(super::books::STALE_BOOKS_TABLE)
                        .execute(&mut *conn)
                        .await
                        .map_err(db_error)?;
                    Ok(conn)
                }
            },
            execute_batch,
        );
        tokio::spawn(checkpoint(pool.clone(), batcher.downgrade()));
        Ok(Self { pool, batcher })
    }

    /// The connection pool, shared with the session store.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The writer connection, lent by the batcher (see [`SqliteStore`]).
    async fn write_connection(&self) -> Result<Lent<PoolConnection<Sqlite>>, StoreError> {
        self.batcher.lend().await
    }
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
            format!("cannot create {}: {e}", path.display()),
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

/// How often the WAL is checkpointed into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// WAL frames (4 KiB pages written) past which the checkpoint also makes the
/// next write start the WAL over, so that it stops growing: about 64 MB.
const RESTART_AT_FRAMES: i64 = 16_000;
/// Bytes a WAL file is truncated to once it starts over.
const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// Checkpoints the WAL in the background, off the writer's path (DESIGN.md §6).
///
/// By default SQLite checkpoints in the commit that fills the WAL to 1,000 pages:
/// that commit copies the pages into the database file and waits for its fsync,
/// and every write queued behind it waits too. So the writer connection does not
/// checkpoint (`wal_autocheckpoint=0`); every [`CHECKPOINT_EVERY`] this task runs
/// a `PASSIVE` checkpoint on a reader, which copies what it can without blocking
/// anyone. Under steady writes a passive checkpoint never catches up with the
/// last frames, so the WAL would only grow: past [`RESTART_AT_FRAMES`] the task
/// borrows the writer between two batches for a `RESTART` checkpoint, short since
/// the passive ones did most of the copying, after which the next write starts
/// the WAL over.
///
/// Measured with the gateway bench at 2,000 requests/s (the gateway's added p99):
/// 6.3-6.7 ms with SQLite's own checkpoints, 2.5-3.5 ms with this task, 1.9 ms
/// with no checkpoint at all. A larger WAL was slower (8-10 ms at 32,000 frames):
/// finding a page in it takes longer the more frames it holds. Ends with the store.
async fn checkpoint(pool: SqlitePool, batcher: WeakBatcher<PoolConnection<Sqlite>>) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(batcher) = batcher.upgrade() else {
            return;
        };
        // (busy, frames in the WAL, frames checkpointed)
        let passive: Result<(i64, i64, i64), _> = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&pool)
            .await;
        let frames = match passive {
            Ok((_, frames, _)) => frames,
            Err(error) => {
                tracing::warn!(%error, "could not checkpoint the WAL");
                continue;
            }
        };
        if frames < RESTART_AT_FRAMES {
            continue;
        }
        let restarted = match batcher.lend().await {
            Ok(mut writer) => {
                // A checkpoint moves pages, not what they say.
                writer.books_unchanged();
                sqlx::query("PRAGMA wal_checkpoint(RESTART)")
                    .execute(&mut **writer)
                    .await
                    .map(drop)
                    .map_err(db_error)
            }
            Err(error) => Err(error),
        };
        if let Err(error) = restarted {
            tracing::warn!(%error, "could not restart the WAL");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

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
}
