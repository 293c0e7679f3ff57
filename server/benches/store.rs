//! Reserve + settle pairs per second through the `Store` port (DESIGN.md R7), on a
//! temporary SQLite file and, when `TEST_DATABASE_URL` is set, on a fresh
//! PostgreSQL database; one task, then 16 and 64 concurrent tasks, each measured
//! for 5 seconds (`BENCH_SECONDS`) after a second of warm-up.
//!
//! Run: `cargo bench -p server --bench store` (prints its figures; no assertions).
#![allow(
    clippy::unwrap_used,
    reason = "a bench with a broken fixture should stop at once"
)]

use std::{
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

use app::{
    domain::{
        Catalog, Model, ModelId, Nanos, PlanAmounts, PricePerMTok, Prices, TokenEstimate, Usage,
    },
    store::{
        PlanRecord, ReserveOutcome, ReserveRequest, Settlement, SharedStore, Spender,
        WorkspaceSetup,
    },
};
use chrono::{NaiveDate, Utc};
use rust_decimal::Decimal;
use server::db::{self, sqlite::Durability};

/// How long each configuration is measured, after [`WARM_UP`]: long enough that
/// the statement caches are full and a batch's size has settled. `BENCH_SECONDS`
/// overrides it.
const MEASURE: Duration = Duration::from_secs(5);
/// Pairs run, unmeasured, before each measurement.
const WARM_UP: Duration = Duration::from_secs(1);

fn setup() -> WorkspaceSetup {
    let price = |s: &str| PricePerMTok::new(Decimal::from_str(s).unwrap()).unwrap();
    let model = Model {
        id: ModelId::new("bench"),
        display_name: "Bench".into(),
        aliases: vec![],
        upstream: "mock".into(),
        upstream_model: "bench".into(),
        prices: Prices {
            input: price("1"),
            cached_input: price("0.1"),
            output: price("2"),
        },
        max_output_tokens: 1000,
    };
    WorkspaceSetup {
        name: "Bench".into(),
        plan: PlanRecord {
            amounts: PlanAmounts {
                budget: Nanos::new(1_000_000_000_000_000),
                overage: Nanos::ZERO,
            },
            start: NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
            timezone: chrono_tz::UTC,
        },
        catalog: Arc::new(Catalog::new(vec![model]).unwrap()),
    }
}

async fn pair(store: &SharedStore, catalog: &Arc<Catalog>) {
    let now = Utc::now();
    let outcome = store
        .reserve(ReserveRequest {
            catalog: catalog.clone(),
            model: catalog.resolve("bench").unwrap().id.clone(),
            estimate: TokenEstimate {
                prompt_tokens: 500,
                output_cap: Some(200),
                n: 1,
            },
            spender: Spender::default(),
            owner: "bench".into(),
            lease_until: now + chrono::Duration::minutes(1),
            now,
        })
        .await
        .unwrap();
    let ReserveOutcome::Admitted(reservation) = outcome else {
        panic!("blocked")
    };
    let usage = Usage {
        prompt_tokens: 400,
        cached_tokens: 100,
        completion_tokens: 150,
        reasoning_tokens: 0,
    };
    store
        .settle(Settlement {
            reservation: reservation.id,
            usage: Some(usage),
            idempotency_key: None,
            within_reservation: false,
            bill_if_lapsed: false,
            now,
        })
        .await
        .unwrap();
}

async fn run(name: &str, store: SharedStore, catalog: Arc<Catalog>) {
    let measure = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(MEASURE, Duration::from_secs);
    for tasks in [1usize, 16, 64] {
        // Pairs each task runs until `until`.
        let phase = |until: Instant| {
            let handles: Vec<_> = (0..tasks)
                .map(|_| {
                    let store = store.clone();
                    let catalog = catalog.clone();
                    tokio::spawn(async move {
                        let mut pairs = 0u64;
                        while Instant::now() < until {
                            pair(&store, &catalog).await;
                            pairs += 1;
                        }
                        pairs
                    })
                })
                .collect();
            async move {
                let mut pairs = 0;
                for h in handles {
                    pairs += h.await.unwrap();
                }
                pairs
            }
        };
        phase(Instant::now() + WARM_UP).await;
        let start = Instant::now();
        let pairs = phase(start + measure).await;
        let elapsed = start.elapsed();
        println!(
            "{name:<10} tasks={tasks:<3} pairs={pairs:<7} {:>8} pairs/s  {:>8} events/s (reserve or settle)  mean {:?}/pair",
            u128::from(pairs) * 1_000_000 / elapsed.as_micros().max(1),
            u128::from(2 * pairs) * 1_000_000 / elapsed.as_micros().max(1),
            elapsed / u32::try_from(pairs).unwrap_or(u32::MAX).max(1),
        );
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let setup = setup();
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("bench.db").display());
        let store = db::connect(&url, Durability::Normal).await.unwrap();
        store.apply_setup(&setup, chrono::Utc::now()).await.unwrap();
        run("sqlite", store, setup.catalog.clone()).await;

        match std::env::var("TEST_DATABASE_URL") {
            Err(_) => println!("postgres   skipped: TEST_DATABASE_URL is unset"),
            Ok(admin) => {
                use sqlx::Connection;
                let name = format!("tollgate_bench_{}", std::process::id());
                let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                let mut url = url::Url::parse(&admin).unwrap();
                url.set_path(&name);
                let store = db::connect(url.as_str(), Durability::Normal).await.unwrap();
                store.apply_setup(&setup, chrono::Utc::now()).await.unwrap();
                run("postgres", store.clone(), setup.catalog.clone()).await;
                drop(store);
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await;
            }
        }
    });
}
