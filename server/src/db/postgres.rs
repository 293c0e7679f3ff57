//! `Store` on PostgreSQL, for several replicas sharing one database (DESIGN.md §6).

use app::store::{Store, StoreError, WorkspaceRecord};
use sqlx::{postgres::PgPoolOptions, PgPool};

use super::{database_error, ConnectError};

/// The PostgreSQL adapter.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

#[derive(sqlx::FromRow)]
struct WorkspaceRow {
    id: i64,
    name: String,
}

impl PostgresStore {
    /// Connect to `url` and apply migrations.
    pub async fn open(url: &str) -> Result<Self, ConnectError> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .connect(url)
            .await
            .map_err(ConnectError::Open)?;
        sqlx::migrate!("../migrations/postgres")
            .run(&pool)
            .await
            .map_err(ConnectError::Migrate)?;
        Ok(Self { pool })
    }
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    async fn ensure_workspace(&self, name: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO workspaces (id, name) VALUES (1, $1) \
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
