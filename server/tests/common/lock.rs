//! Another process's hold on the database's write lock, for the tests of a
//! database held up.
#![allow(
    clippy::unwrap_used,
    reason = "a broken fixture should stop the test at once"
)]

/// A connection of another process holding the database's write lock: SQLite's
/// file lock (`BEGIN IMMEDIATE`), PostgreSQL's lock on the plan row that orders
/// the writers of every replica.
pub enum WriteLockHolder {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl WriteLockHolder {
    /// Take the lock on the database of `url`.
    pub async fn take(url: &str) -> WriteLockHolder {
        use sqlx::Connection as _;
        if url.starts_with("postgres") {
            let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
            sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
            sqlx::query("SELECT 1 FROM plans FOR UPDATE")
                .execute(&mut conn)
                .await
                .unwrap();
            WriteLockHolder::Postgres(conn)
        } else {
            let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
            sqlx::query("BEGIN IMMEDIATE")
                .execute(&mut conn)
                .await
                .unwrap();
            WriteLockHolder::Sqlite(conn)
        }
    }

    /// Let the lock go, writing nothing.
    pub async fn release(self) {
        match self {
            WriteLockHolder::Sqlite(mut conn) => {
                sqlx::query("ROLLBACK").execute(&mut conn).await.unwrap();
            }
            WriteLockHolder::Postgres(mut conn) => {
                sqlx::query("ROLLBACK").execute(&mut conn).await.unwrap();
            }
        }
    }
}
