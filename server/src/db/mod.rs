//! The `Store` implementations. The backend is picked once, from the database
//! URL's scheme, and handed around as `Arc<dyn Store>`.

mod batch;
mod books;
pub mod postgres;
pub mod sqlite;

pub use books::LAPSED_KEPT;

use std::sync::Arc;

use app::store::SharedStore;

use crate::auth::sessions::SessionBackend;

/// Why a database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL is neither `sqlite:` nor `postgres:`/`postgresql:`.
    #[error("unsupported database URL {0:?}: use sqlite://FILE or postgres://USER@HOST/DB")]
    UnsupportedScheme(String),
    /// The PostgreSQL URL asks for TLS (`sslmode=require`, `verify-ca` or
    /// `verify-full`), which this build does not speak: refused before any
    /// connection is tried. Holds the URL with its password masked.
    #[error(
        "the URL asks for TLS (sslmode={1}), which this build of Tollgate does not speak: \
         reach PostgreSQL on loopback or a private network with sslmode=disable or prefer"
    )]
    TlsRequired(String, &'static str),
    /// The database could not be reached or opened.
    #[error("could not open the database: {0}")]
    Open(#[source] sqlx::Error),
    /// A migration failed; the database is left as the failed migration found it.
    #[error("could not migrate the database: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
}

/// An open database: the books behind the `Store` port and the login sessions.
#[derive(Clone)]
pub struct Database {
    /// The books.
    pub store: SharedStore,
    /// Login sessions, in the same database.
    pub sessions: SessionBackend,
}

/// Open (creating a SQLite file if needed) and migrate the database at `url`;
/// `durability` applies to SQLite only.
///
/// Errors: [`ConnectError`] naming what failed.
pub async fn open(url: &str, durability: sqlite::Durability) -> Result<Database, ConnectError> {
    let database = if url.starts_with("sqlite:") {
        let store = sqlite::SqliteStore::open(url, durability).await?;
        let sessions = SessionBackend::Sqlite(tower_sessions_sqlx_store::SqliteStore::new(
            store.pool().clone(),
        ));
        Database {
            store: Arc::new(store),
            sessions,
        }
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        let store = postgres::PostgresStore::open(url).await?;
        let sessions = SessionBackend::Postgres(tower_sessions_sqlx_store::PostgresStore::new(
            store.pool().clone(),
        ));
        Database {
            store: Arc::new(store),
            sessions,
        }
    } else {
        return Err(ConnectError::UnsupportedScheme(redact_url(url)));
    };
    database
        .sessions
        .migrate()
        .await
        .map_err(ConnectError::Open)?;
    Ok(database)
}

/// Open the database at `url` and return its books only (see [`open`]).
///
/// Errors: [`ConnectError`] naming what failed.
pub async fn connect(
    url: &str,
    durability: sqlite::Durability,
) -> Result<SharedStore, ConnectError> {
    Ok(open(url, durability).await?.store)
}

/// The URL with its password masked, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // Only fails for URLs that cannot carry a password, excluded by the guard.
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}
