//! Fixtures shared by the integration tests: stores on a temporary SQLite file
//! (always) and on a fresh PostgreSQL database (when `TEST_DATABASE_URL` is set).
#![allow(dead_code)]
#![allow(
    clippy::unwrap_used,
    reason = "a broken fixture should stop the test at once"
)]

use std::{
    str::FromStr,
    sync::{Arc, Mutex},
};

use app::{
    domain::{Catalog, Model, ModelId, Nanos, PlanAmounts, PricePerMTok, Prices},
    store::{PlanRecord, SharedStore, WorkspaceSetup},
};
use chrono::NaiveDate;
use rust_decimal::Decimal;
use server::db::{self, sqlite::Durability};

/// One euro in nano-euros.
pub const EUR: i64 = 1_000_000_000;

/// A database for one test; the SQLite file or PostgreSQL database is removed on drop.
pub struct TestDb {
    /// `sqlite://...` or `postgres://...` of the database.
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg_drop: Option<(String, String)>,
}

impl TestDb {
    /// A fresh SQLite file in a temporary folder.
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("tollgate.db").display());
        TestDb {
            url,
            _dir: Some(dir),
            pg_drop: None,
        }
    }

    /// A fresh PostgreSQL database on the server of `TEST_DATABASE_URL`, or `None`
    /// (with a note on stderr) when the variable is unset.
    pub async fn postgres() -> Option<TestDb> {
        let Ok(admin_url) = std::env::var("TEST_DATABASE_URL") else {
            eprintln!("TEST_DATABASE_URL is unset: skipping the PostgreSQL run of this test");
            return None;
        };
        use sqlx::Connection;
        let name = format!("tollgate_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin_url)
            .await
            .expect("TEST_DATABASE_URL is set but PostgreSQL cannot be reached");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        let mut url = url::Url::parse(&admin_url).unwrap();
        url.set_path(&name);
        Some(TestDb {
            url: url.to_string(),
            _dir: None,
            pg_drop: Some((admin_url, name)),
        })
    }

    /// The same database reached at `url` (through a [`cut::Link`], say); the
    /// database is still removed when `self` is dropped, not this one.
    pub fn reached_at(&self, url: String) -> TestDb {
        TestDb {
            url,
            _dir: None,
            pg_drop: None,
        }
    }

    /// Open a store on it with `setup` applied.
    pub async fn store(&self, setup: &WorkspaceSetup) -> SharedStore {
        let store = db::connect(&self.url, Durability::Normal).await.unwrap();
        store.apply_setup(setup, chrono::Utc::now()).await.unwrap();
        store
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin_url, name)) = self.pg_drop.take() {
            run_as_admin(
                admin_url,
                format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            );
        }
    }
}

/// Runs `sql` on PostgreSQL at `admin_url` and waits for it, from anywhere: on a
/// thread and runtime of its own, as a `Drop` cannot await. Best effort: a
/// failure is ignored (this cleans up after tests).
pub fn run_as_admin(admin_url: String, sql: String) {
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            use sqlx::Connection;
            if let Ok(mut conn) = sqlx::PgConnection::connect(&admin_url).await {
                let _ = sqlx::query(&sql).execute(&mut conn).await;
            }
        });
    })
    .join();
}

fn price(text: &str) -> PricePerMTok {
    PricePerMTok::new(Decimal::from_str(text).unwrap()).unwrap()
}

/// A model with the given EUR prices per 1M tokens and max output tokens.
pub fn model(id: &str, input: &str, output: &str, max_output_tokens: u32) -> Model {
    Model {
        id: ModelId::new(id),
        display_name: id.to_uppercase(),
        aliases: vec![format!("test/{id}")],
        upstream: "mock".into(),
        upstream_model: id.into(),
        prices: Prices {
            input: price(input),
            cached_input: price(input),
            output: price(output),
        },
        max_output_tokens,
    }
}

/// Three models, dearest first: `big` (output 10 EUR/1M), `mid` (2), `small` (0.5).
pub fn catalog() -> Catalog {
    Catalog::new(vec![
        model("big", "2", "10", 1000),
        model("mid", "0.5", "2", 1000),
        model("small", "0.1", "0.5", 1000),
    ])
    .unwrap()
}

/// A setup with the given plan (nano-euros) on [`catalog`], cycles from 2026-01-31 UTC.
pub fn setup(budget: i64, overage: i64) -> WorkspaceSetup {
    WorkspaceSetup {
        name: "Test workspace".into(),
        plan: PlanRecord {
            amounts: PlanAmounts {
                budget: Nanos::new(budget),
                overage: Nanos::new(overage),
            },
            start: NaiveDate::from_ymd_opt(2026, 1, 31).unwrap(),
            timezone: chrono_tz::Europe::Berlin,
        },
        catalog: Arc::new(catalog()),
    }
}

/// `app` served on a random loopback port (with the client's address, as the
/// binary serves it): its base URL and the server task (abort it to stop).
pub async fn serve(app: axum::Router) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let options = server::http::ServeOptions {
        header_read_timeout: std::time::Duration::from_secs(30),
        response_write_timeout: std::time::Duration::from_secs(30),
        request_body_timeout: std::time::Duration::from_secs(30),
    };
    let server = tokio::spawn(server::http::serve(
        listener,
        app,
        options,
        std::future::pending(),
    ));
    (url, server)
}

/// A new member with `email` (no usable password) and an API key of their own,
/// created in `store`: the key.
pub async fn member_key(store: &SharedStore, email: &str) -> String {
    store
        .create_user(
            &app::store::Actor::Cli,
            email,
            "not-a-password-hash",
            app::store::Role::Member,
            chrono::Utc::now(),
        )
        .await
        .unwrap();
    another_key(store, email).await
}

/// A new API key of the existing user `email`, created in `store`: the key.
pub async fn another_key(store: &SharedStore, email: &str) -> String {
    let user = store.user_by_email(email).await.unwrap().unwrap();
    let (key, hash) = server::auth::new_api_key();
    store
        .create_api_key(
            &app::store::Actor::Cli,
            user.id,
            "tests",
            &hash,
            chrono::Utc::now(),
        )
        .await
        .unwrap();
    key
}

/// The whole product on loopback: `config`'s database migrated and set up, a
/// member with an API key, and the router (gateway, APIs, panel) serving.
pub struct Stack {
    /// Base URL of the server.
    pub url: String,
    /// The member's API key.
    pub key: String,
    /// The store the server uses.
    pub store: SharedStore,
    /// The gateway the server uses.
    pub gateway: server::gateway::SharedGateway,
    /// The server task: abort it to stop the server.
    pub server: tokio::task::JoinHandle<()>,
}

impl Stack {
    /// Starts it; upstream keys are looked up with `env` (variable name → key).
    pub async fn start(
        config: Arc<server::config::Config>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Stack {
        let database = db::open(&config.database_url, Durability::Normal)
            .await
            .unwrap();
        let store = database.store.clone();
        store
            .apply_setup(&config.setup, chrono::Utc::now())
            .await
            .unwrap();
        let key = member_key(&store, "member@example.com").await;
        let gateway = Arc::new(server::gateway::Gateway::new(
            &config,
            store.clone(),
            move |name| env(name).ok_or(std::env::VarError::NotPresent),
        ));
        let mut state = server::http::AppState::new(config, store.clone());
        state.gateway = gateway.clone();
        let (url, server) = serve(server::http::router(state, database.sessions.clone())).await;
        Stack {
            url,
            key,
            store,
            gateway,
            server,
        }
    }
}

/// Runs a story on SQLite, and on PostgreSQL when configured, as two tests.
#[macro_export]
macro_rules! on_both_backends {
    ($($story:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $story() {
                    let db = $crate::common::TestDb::sqlite();
                    super::$story(&db).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $story() {
                    if let Some(db) = $crate::common::TestDb::postgres().await {
                        super::$story(&db).await;
                    }
                }
            )*
        }
    };
}

pub mod cut;
pub mod lock;

/// Log lines kept in memory for a test to read: the writer of a
/// `tracing_subscriber::fmt` subscriber (`with_writer(move || logs.clone())`).
#[derive(Debug, Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
