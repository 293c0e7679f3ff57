//! `Store` on SQLite: one file, WAL journal (DESIGN.md §6).

use std::{str::FromStr, time::Duration};

use app::store::{Store, StoreError, WorkspaceRecord};
use sqlx::{
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
    SqlitePool,
};

use super::{database_error, ConnectError};

/// The SQLite adapter.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

#[derive(sqlx::FromRow)]
struct WorkspaceRow {
    id: i64,
    name: String,
}

impl SqliteStore {
    /// Open the file named by `url` (created if missing) and apply migrations.
    pub async fn open(url: &str) -> Result<Self, ConnectError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(ConnectError::Open)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .map_err(ConnectError::Open)?;
        sqlx::migrate!("../migrations/sqlite")
            .run(&pool)
            .await
            .map_err(ConnectError::Migrate)?;
        Ok(Self { pool })
    }
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn ensure_workspace(&self, name: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO workspaces (id, name) VALUES (1, ?1) \
             ON CONFLICT (id) DO UPDATE SET name = excluded.name",
        )
        .bind(name)
        .execute(&self.pool)
        .await
        .map_err(database_error)?;
        Ok(())
    }

    async fn workspace(&self) -> Result<WorkspaceRecord, StoreError> {
        let row: Option<WorkspaceRow> =
            sqlx::query_as("SELECT id, name FROM workspaces ORDER BY id LIMIT 1")
                .fetch_optional(&self.pool)
                .await
                .map_err(database_error)?;
        row.map(|r| WorkspaceRecord {
            id: r.id,
            name: r.name,
        })
        .ok_or(StoreError::NotFound { what: "workspace" })
    }
}
