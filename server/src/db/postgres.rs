//! `Store` on PostgreSQL, for several replicas sharing one database (DESIGN.md §6).
//! Every write first reads the workspace's plan row `FOR UPDATE`, so writers of one
//! workspace, from any replica, take turns, and each reads the counters, limits and
//! settings as the previous one committed them (READ COMMITTED gives every
//! statement a fresh snapshot).

use app::store::StoreError;
use chrono::{DateTime, Utc};
use sqlx::{postgres::PgPoolOptions, PgPool, Postgres};

use super::{batch::Batcher, books::db_error, ConnectError};

/// The PostgreSQL adapter.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// Reservations, settlements and releases, group-committed (`db::batch`).
    batcher: Batcher,
}

impl PostgresStore {
    /// Lock the plan row read first in every write (see the module docs).
    const LOCK: &'static str = "FOR UPDATE OF p";
    /// A plain transaction: the plan row's lock serialises writers.
    const BEGIN: &'static str = "BEGIN";

    /// Connect to `url` and apply migrations.
    ///
    /// Errors: [`ConnectError`] when the server cannot be reached or migrated.
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
        let batcher = {
            let pool = pool.clone();
            Batcher::spawn(move |ops| execute_batch(pool.clone(), ops))
        };
        Ok(Self { pool, batcher })
    }

    /// The connection pool, shared with the session store.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Postgres>, StoreError> {
        self.pool.begin().await.map_err(db_error)
    }

    fn writer(&self) -> &PgPool {
        &self.pool
    }
}

super::books::impl_store!(PostgresStore, Postgres);
