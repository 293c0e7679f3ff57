//! The stack `server/benches/gateway.sh` measures: the mock upstream of the tests and
//! the real router over a fresh database (SQLite in a temporary folder, or
//! PostgreSQL on the server of `TEST_DATABASE_URL` when `BENCH_BACKEND=postgres`),
//! with one member's API key, and a bare forwarding proxy to the same mock (the
//! floor under any gateway on this stack: see [`forward`]). Prints `MOCK=`,
//! `PROXY=`, `GATEWAY=` and `KEY=` lines, then serves until SIGINT or SIGTERM.
//!
//! Not a Criterion bench: the load comes from `wrk` in another process, so the
//! numbers include real HTTP on loopback, as clients see them.

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark fixture that cannot start should stop at once"
)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/upstream.rs"]
mod upstream;

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::State,
    http::{header::CONTENT_TYPE, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Router,
};
use chrono::Utc;
use server::{
    config::{Config, Overrides},
    db::sqlite::Durability,
    gateway::Gateway,
    http::AppState,
};

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let db = match std::env::var("BENCH_BACKEND").as_deref() {
        Ok("postgres") => common::TestDb::postgres()
            .await
            .expect("BENCH_BACKEND=postgres needs TEST_DATABASE_URL"),
        _ => common::TestDb::sqlite(),
    };
    let mock = upstream::MockUpstream::start().await;
    mock.set(|b| {
        b.usage = upstream::MockUsage {
            prompt: 20,
            completion: 16,
            ..upstream::MockUsage::default()
        };
        b.record_requests = false;
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    std::fs::write(
        &path,
        format!(
            r#"
database_url = "{db}"
settlement_spool = "{spool}"
[plan]
budget_eur = "1000000"
overage_eur = "0"
[[upstreams]]
name = "mock"
base_url = "{base}"
[[models]]
id = "bench"
upstream = "mock"
input_eur_per_mtok = "0.15"
cached_input_eur_per_mtok = "0.075"
output_eur_per_mtok = "0.60"
max_output_tokens = 4096
"#,
            db = db.url,
            base = mock.base_url,
            spool = dir.path().join("settlements").display(),
        ),
    )
    .unwrap();
    let config = Arc::new(Config::load(Some(&path), &Overrides::default()).unwrap());
    let database = server::db::open(&db.url, Durability::Normal).await.unwrap();
    let store = database.store.clone();
    store
        .apply_setup(&config.setup, chrono::Utc::now())
        .await
        .unwrap();
    let key = common::member_key(&store, "bench@example.com").await;
    let mut state = AppState::new(config.clone(), store.clone());
    let gateway = Arc::new(Gateway::new(&config, store.clone(), |_| {
        Err(std::env::VarError::NotPresent)
    }));
    state.gateway = gateway.clone();
    let app = server::http::router(state, database.sessions.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("MOCK={}", mock.base_url);
    println!("PROXY={}", start_proxy(&mock.base_url).await);
    println!("GATEWAY=http://{}/v1", listener.local_addr().unwrap());
    println!("KEY={key}");
    let options = server::http::ServeOptions {
        header_read_timeout: config.header_read_timeout,
        response_write_timeout: config.response_write_timeout,
        request_body_timeout: config.request_body_timeout,
    };
    server::http::serve(listener, app, options, async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    })
    .await;
    for line in gateway.metrics().render().lines() {
        if line.starts_with("tollgate_settlements_total")
            || line.starts_with("tollgate_requests_total")
        {
            eprintln!("{line}");
        }
    }
    let snapshot = store.spend_snapshot(Utc::now()).await.unwrap();
    eprintln!(
        "served; spent {} EUR, reserved {} EUR",
        snapshot.workspace.spent.to_money(),
        snapshot.workspace.reserved.to_money()
    );
}

/// Where the bare proxy forwards, with an HTTP client set up as the gateway's.
struct Proxy {
    client: reqwest::Client,
    url: String,
}

/// Starts the bare proxy in front of the mock at `base_url` (up to `/v1`);
/// returns its own base URL.
async fn start_proxy(base_url: &str) -> String {
    let proxy = Arc::new(Proxy {
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()
            .unwrap(),
        url: format!("{base_url}/chat/completions"),
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(forward))
        .with_state(proxy);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{address}/v1")
}

/// The least any gateway on this stack does for a request: the body read, posted
/// unchanged to the upstream over a pooled connection, and the answer's body read
/// and returned. No key, no pricing, no books, no JSON: what the benchmark's
/// `proxy` rows measure is the cost of the second HTTP exchange alone.
async fn forward(State(proxy): State<Arc<Proxy>>, body: Bytes) -> Response {
    let sent = proxy
        .client
        .post(&proxy.url)
        .header(CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await;
    let Ok(answer) = sent else {
        return StatusCode::BAD_GATEWAY.into_response();
    };
    let status = answer.status();
    match answer.bytes().await {
        Ok(body) => (status, [(CONTENT_TYPE, "application/json")], body).into_response(),
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}
