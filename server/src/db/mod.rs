//! The `Store` implementations. The backend is picked once, from the database
//! URL's scheme, and handed around as `Arc<dyn Store>`.

mod batch;
mod books;
pub mod postgres;
pub mod sqlite;

pub(crate) use books::usage_cost;
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
    /// The PostgreSQL URL (or `PGSSLMODE`) asks for TLS (`sslmode=require`, `verify-ca` or
    /// `verify-full`), which this build does not speak: refused before any
    /// connection is tried. Holds the mode; the URL is named by the caller.
    #[error(
        "the connection asks for TLS (sslmode={0}, from the URL or PGSSLMODE), which this \
         build of Tollgate does not speak: \
         reach PostgreSQL on loopback or a private network with sslmode=disable or prefer"
    )]
    TlsRequired(&'static str),
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
    /// The connections behind both, to close them ([`Database::close`]).
    connections: Connections,
}

/// The connections behind a [`Database`].
#[derive(Clone)]
enum Connections {
    /// The writer's pool (the batcher's one connection), the readers' pool
    /// (shared with the sessions) and the file.
    Sqlite {
        writer: sqlx::SqlitePool,
        readers: sqlx::SqlitePool,
        file: std::path::PathBuf,
    },
    /// The one pool.
    Postgres(sqlx::PgPool),
}

impl Database {
    /// Ends this handle and closes every connection, waiting at most `wait`
    /// for the writes in flight. On SQLite a last connection of its own then
    /// checkpoints the WAL into the database file and closes, so the file
    /// alone holds the books (a copy of it is a backup); SQLite deletes the
    /// `-wal` and `-shm` files on that close, though now and then an empty
    /// `-wal` stays.
    ///
    /// The store's writer (`db::batch`) keeps its connection until every clone
    /// of `store` is dropped: call this once nothing else holds one. Returns
    /// false when the connections were not all closed within `wait` (they are
    /// then closed, without that last checkpoint, when the process ends).
    pub async fn close(self, wait: std::time::Duration) -> bool {
        let Database {
            store,
            sessions,
            connections,
        } = self;
        drop((store, sessions));
        let closing = async {
            match connections {
                Connections::Sqlite {
                    writer,
                    readers,
                    file,
                } => {
                    // The writer's connection comes back once the batcher has
                    // ended, having closed its own (`SqliteWriter`).
                    writer.close().await;
                    readers.close().await;
                    // The pools' closes alone left the WAL now and then (about
                    // one command in 50 on a busy machine): a close that
                    // overlaps another misses being the last. One more
                    // connection, alone once the pools are closed, checkpoints
                    // the WAL into the file and closes last.
                    let last = tokio::task::spawn_blocking(move || sqlite::close_last(&file)).await;
                    if let Ok(Err(error)) = last {
                        tracing::warn!(%error, "could not fold the WAL back into the database file");
                    }
                }
                Connections::Postgres(pool) => pool.close().await,
            }
        };
        tokio::time::timeout(wait, closing).await.is_ok()
    }
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
            connections: Connections::Sqlite {
                writer: store.writer_pool().clone(),
                readers: store.pool().clone(),
                file: store.file().to_owned(),
            },
            store: Arc::new(store),
            sessions,
        }
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        let store = postgres::PostgresStore::open(url).await?;
        let sessions = SessionBackend::Postgres(tower_sessions_sqlx_store::PostgresStore::new(
            store.pool().clone(),
        ));
        Database {
            connections: Connections::Postgres(store.pool().clone()),
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

/// The URL with any password masked (`user:***@…`, `?password=***`), for
/// messages and logs. A PostgreSQL URL that does not parse is shown by its
/// scheme alone: where its password starts and ends cannot be told (a `#` or
/// a `/` in it, not percent-encoded, is a common way to get there). A SQLite
/// URL holds no password and is shown as written. Either is shown on one line
/// and cut as `app::text::shown_path` shows paths.
pub fn redact_url(url: &str) -> String {
    app::text::shown_path(redacted(url))
}

/// `url` with its password masked, as [`redact_url`] says, not yet cut.
fn redacted(url: &str) -> String {
    if url.starts_with("sqlite:") {
        return url.to_owned();
    }
    let parsed = url::Url::parse(url).ok().filter(|parsed| {
        // An `@` outside the user part, or a fragment, is a password that the
        // parser cut: `user:12/34@host` reads as port 12 and a path.
        parsed.fragment().is_none()
            && !(url.contains('@') && parsed.username().is_empty() && parsed.password().is_none())
    });
    let Some(mut parsed) = parsed else {
        let scheme = url
            .split_once(':')
            .map(|(scheme, _)| scheme)
            .filter(|scheme| {
                !scheme.is_empty()
                    && scheme
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
            });
        return match scheme {
            Some(scheme) => format!("{scheme}://… (not shown: it does not parse as a URL)"),
            None => "… (not shown: it does not parse as a URL)".into(),
        };
    };
    if parsed.password().is_some() {
        // Only fails for URLs that cannot carry a password, which have none.
        let _ = parsed.set_password(Some("***"));
    }
    let is_password = |key: &str| key.eq_ignore_ascii_case("password");
    if parsed.query_pairs().any(|(key, _)| is_password(&key)) {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(key, value)| {
                let value = if is_password(&key) {
                    "***".into()
                } else {
                    value.into_owned()
                };
                (key.into_owned(), value)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn no_password_is_shown() {
        for (url, shown) in [
            (
                "postgres://app:s3cret@db:5432/books",
                "postgres://app:***@db:5432/books",
            ),
            (
                "postgres://app@db/books?sslmode=disable&password=s3cret",
                "postgres://app@db/books?sslmode=disable&password=***",
            ),
            (
                "postgres://app@db/books?PASSWORD=s3cret",
                "postgres://app@db/books?PASSWORD=***",
            ),
            ("postgres://app@db/books", "postgres://app@db/books"),
            // Written wrongly: a `#`, `/` or `?` cuts the password, a bad
            // port fails it.
            (
                "postgres://app:ab#s3cret@db/books",
                "postgres://… (not shown: it does not parse as a URL)",
            ),
            (
                "postgres://app:12#34@db/books",
                "postgres://… (not shown: it does not parse as a URL)",
            ),
            (
                "postgres://app:12/34@db/books",
                "postgres://… (not shown: it does not parse as a URL)",
            ),
            (
                "postgres://app:12?34@db/books",
                "postgres://… (not shown: it does not parse as a URL)",
            ),
            (
                "postgres://app:s3cret@db:notaport/books",
                "postgres://… (not shown: it does not parse as a URL)",
            ),
            (
                "postgres://app:s3cret@[::1/books",
                "postgres://… (not shown: it does not parse as a URL)",
            ),
            ("sqlite://books.db?mode=rwc", "sqlite://books.db?mode=rwc"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
        // A long URL is cut, so that a path pasted by mistake does not fill
        // the terminal.
        let long = format!("sqlite:///tmp/{}.db", "x".repeat(3_000));
        let shown = redact_url(&long);
        assert!(shown.starts_with("sqlite:///tmp/xxx"), "{shown}");
        assert!(shown.ends_with('…'), "{shown}");
        assert_eq!(shown.chars().count(), app::text::SHOWN_PATH_CHARS + 1);
    }
}
