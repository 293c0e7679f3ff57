//! Server-side render time of `/admin/token-limits` (DESIGN.md §3) with a 50-model
//! catalog and 1,000,000 ledger rows in the current cycle, on SQLite. The page reads
//! the per-cycle counters, never the ledger (R8), so the ledger's size should not
//! show. Requests go through the real router (session, access check, Leptos SSR)
//! without a network.
//!
//! Run: `cargo bench -p server --bench tab` (prints its figures; no assertions).
#![allow(
    clippy::unwrap_used,
    reason = "a bench with a broken fixture should stop at once"
)]

use std::{sync::Arc, time::Instant};

use app::store::Role;
use axum::{
    body::Body,
    http::{header, Request, StatusCode},
};
use chrono::Utc;
use http_body_util::BodyExt;
use server::{config, db, http};
use tower::ServiceExt;

const LEDGER_ROWS: i64 = 1_000_000;
const RENDERS: usize = 300;

fn config_text(db_url: &str) -> String {
    let mut text = format!(
        "database_url = \"{db_url}\"\n[[upstreams]]\nname = \"mock\"\nbase_url = \"http://127.0.0.1:9\"\n"
    );
    for i in 0..50 {
        text.push_str(&format!(
            "[[models]]\nid = \"model-{i:02}\"\ndisplay_name = \"Model {i:02}\"\nupstream = \"mock\"\n\
             input_eur_per_mtok = \"{}.25\"\noutput_eur_per_mtok = \"{}.5\"\nmax_output_tokens = 4096\n",
            i + 1,
            2 * i + 3
        ));
    }
    text
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("tab.db").display());
        let path = dir.path().join("tollgate.toml");
        std::fs::write(&path, config_text(&url)).unwrap();
        let config = config::Config::load(Some(&path), &config::Overrides::default()).unwrap();
        let database = db::open(&config.database_url, config.durability).await.unwrap();
        database.store.apply_setup(&config.setup, chrono::Utc::now()).await.unwrap();
        let hash = server::auth::hash_password("bench password 123").unwrap();
        database.store.create_user(&app::store::Actor::Cli, "admin@example.com", &hash, Role::Admin, Utc::now()).await.unwrap();
        for i in 0..5 {
            database
                .store
                .update_model_limits(
                    &app::store::Actor::Cli,
                    &[app::store::LimitChange {
                        model: app::domain::ModelId::new(format!("model-{:02}", i * 7)),
                        expected_version: Some(0),
                        limit: app::domain::ModelLimit { limit: Some(app::domain::Nanos::new(5_000_000_000_000)), enabled: true },
                    }],
                    Utc::now(),
                )
                .await
                .unwrap();
        }

        // 1,000,000 ledger rows spread over the 50 models, and counters that match.
        let cycle = config.setup.plan.cycle_at(Utc::now()).unwrap();
        let key = cycle.start.timestamp();
        let seed_start = Instant::now();
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        sqlx::query(
            "WITH RECURSIVE seq(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM seq WHERE x < $1) \
             INSERT INTO usage_events (workspace_id, cycle_start, occurred_at, requested_model, served_model, \
             prompt_tokens, cached_tokens, completion_tokens, reasoning_tokens, input_eur_per_mtok, \
             cached_input_eur_per_mtok, output_eur_per_mtok, cost_nanos, reserved_nanos, estimated, over_reservation) \
             SELECT 1, $2, '2026-11-29T00:00:00+00:00', printf('model-%02d', x % 50), printf('model-%02d', x % 50), \
             1000, 0, 100, 0, '1', '1', '2', 1200 + x % 1000, 2000, 0, 0 FROM seq",
        )
        .bind(LEDGER_ROWS)
        .bind(key)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO counters (workspace_id, cycle_start, model_id, spent_nanos, reserved_nanos) \
             SELECT 1, $1, served_model, SUM(cost_nanos), 0 FROM usage_events WHERE cycle_start = $1 GROUP BY served_model \
             UNION ALL SELECT 1, $1, '', SUM(cost_nanos), 0 FROM usage_events WHERE cycle_start = $1",
        )
        .bind(key)
        .execute(&pool)
        .await
        .unwrap();
        println!("seeded {LEDGER_ROWS} ledger rows in {:?}", seed_start.elapsed());

        let state = http::AppState::new(Arc::new(config), database.store.clone());
        let router = http::router(state, database.sessions.clone());
        let login = Request::post("/fn/login")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .body(Body::from("email=admin@example.com&password=bench+password+123"))
            .unwrap();
        let response = router.clone().oneshot(login).await.unwrap();
        let cookie = response.headers()[header::SET_COOKIE].to_str().unwrap().split(';').next().unwrap().to_owned();

        let mut times = Vec::with_capacity(RENDERS);
        let mut bytes = 0;
        for i in 0..RENDERS + 20 {
            let request = Request::get("/admin/token-limits").header(header::COOKIE, &cookie).body(Body::empty()).unwrap();
            let start = Instant::now();
            let response = router.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let elapsed = start.elapsed();
            if i >= 20 {
                // The first renders warm caches and connections.
                times.push(elapsed);
                bytes = body.len();
            }
        }
        times.sort();
        let at = |q: usize| times[(times.len() * q / 100).min(times.len() - 1)];
        println!(
            "GET /admin/token-limits (50 models, {LEDGER_ROWS} ledger rows, {bytes} bytes): \
             p50 {:?}  p90 {:?}  p99 {:?}  max {:?}  over {RENDERS} renders",
            at(50),
            at(90),
            at(99),
            times[times.len() - 1]
        );
    });
}
