//! The replay of the Azure trace (DESIGN.md §8) through a real gateway on loopback,
//! to the replay's mock upstream, on SQLite and on PostgreSQL: the books must equal
//! a computation made here from the CSV files and the list prices, independently of
//! the product's catalog, pricing and replay summary.
#![allow(
    clippy::unwrap_used,
    reason = "a broken fixture should stop the test at once"
)]

mod common;

use std::{collections::BTreeMap, path::Path, str::FromStr, sync::Arc};

use app::{
    domain::{ModelId, ModelLimit, Nanos},
    store::{Actor, LimitChange},
};
use chrono::{NaiveDateTime, Utc};
use common::{TestDb, EUR};
use rust_decimal::{Decimal, RoundingStrategy};
use server::{
    config::{Config, Overrides},
    replay::{self, Outcome, ReplayOptions},
};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data");

/// EUR per 1M tokens (input, output): the late-2026 USD list prices of
/// `shared/data/model-prices-usd.md` times 0.86, worked out by hand.
fn list_price(model: &str) -> (Decimal, Decimal) {
    let (input, output) = match model {
        "gpt-5" => ("1.075", "8.6"),             // 1.25, 10.00 USD
        "claude-sonnet-4-5" => ("2.58", "12.9"), // 3.00, 15.00 USD
        "gpt-5.4" => ("2.15", "12.9"),           // 2.50, 15.00 USD
        other => panic!("the replay served {other}, which this scenario never expects"),
    };
    (
        Decimal::from_str(input).unwrap(),
        Decimal::from_str(output).unwrap(),
    )
}

/// One CSV row: (arrival, service rank: 0 code, 1 conversation, prompt, completion).
fn csv_rows(minutes: i64) -> Vec<(NaiveDateTime, u8, u64, u64)> {
    let mut rows = Vec::new();
    for (rank, file) in [(0, "code.csv"), (1, "conv.csv")] {
        let text = std::fs::read_to_string(Path::new(DATA).join("azure-llm-trace-2023").join(file))
            .unwrap();
        for line in text.lines().skip(1).filter(|l| !l.trim().is_empty()) {
            let fields: Vec<&str> = line.trim().split(',').collect();
            let at = NaiveDateTime::parse_from_str(fields[0], "%Y-%m-%d %H:%M:%S%.f").unwrap();
            rows.push((
                at,
                rank,
                fields[1].parse().unwrap(),
                fields[2].parse().unwrap(),
            ));
        }
    }
    rows.sort();
    let start = rows[0].0;
    rows.retain(|row| row.0 - start < chrono::Duration::minutes(minutes));
    rows
}

/// The cost of one request, rounded once to nano-euros half away from zero (R2, R3).
fn nanos(model: &str, prompt: u64, completion: u64) -> i64 {
    let (input, output) = list_price(model);
    let eur = (Decimal::from(prompt) * input + Decimal::from(completion) * output)
        / Decimal::from(1_000_000);
    let nanos = (eur * Decimal::from(EUR))
        .round_dp_with_strategy(0, RoundingStrategy::MidpointAwayFromZero);
    i64::try_from(nanos).unwrap()
}

/// `server/data/replay.toml` with this test's database, mock and a plan for five
/// minutes of traffic (about 9.57 EUR at the requested models).
fn scenario(db: &TestDb, mock: &str) -> Config {
    let text = std::fs::read_to_string(Path::new(DATA).join("replay.toml")).unwrap();
    let mut replaced = 0;
    let text: String = text
        .lines()
        .map(|line| {
            let swap = |key: &str, value: &str| {
                line.starts_with(&format!("{key} ="))
                    .then(|| format!("{key} = \"{value}\""))
            };
            let new = swap("listen", "127.0.0.1:0")
                .or_else(|| swap("database_url", &db.url))
                .or_else(|| swap("base_url", &format!("{mock}/v1")))
                .or_else(|| swap("budget_eur", "4.00"))
                .or_else(|| swap("overage_eur", "2.00"));
            replaced += usize::from(new.is_some());
            new.unwrap_or_else(|| line.to_owned()) + "\n"
        })
        .collect();
    assert_eq!(replaced, 5, "server/data/replay.toml changed shape");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replay.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(Some(&path), &Overrides::default()).unwrap()
}

async fn replay_matches_the_trace(db: &TestDb) {
    let (mock_url, mock_server) = common::serve(replay::mock::router()).await;
    let config = Arc::new(scenario(db, &mock_url));
    let stack = common::Stack::start(config.clone(), |_| None).await;
    let (store, key, now) = (stack.store.clone(), stack.key.clone(), Utc::now());
    let cap = 5 * EUR / 2;
    store
        .update_model_limits(
            &Actor::Cli,
            &[LimitChange {
                model: ModelId::new("claude-sonnet-4-5"),
                expected_version: Some(0),
                limit: ModelLimit {
                    limit: Some(Nanos::new(cap)),
                    enabled: true,
                },
            }],
            now,
        )
        .await
        .unwrap();
    let settings = store.spend_snapshot(now).await.unwrap().settings;
    store
        .update_settings(&Actor::Cli, Some(settings.version), true, now)
        .await
        .unwrap();

    let options = ReplayOptions {
        gateway: stack.url.clone(),
        key,
        speedup: 60,
        code_model: "gpt-5".into(),
        conversation_model: "claude-sonnet-4-5".into(),
        stream_percent: 20,
        minutes: Some(5),
        max_in_flight: 64,
    };
    replay::probe(&options).await.unwrap();
    let trace = replay::trace::embedded().unwrap();
    let before = replay::books_before(&store, Utc::now()).await.unwrap();
    let report = replay::send(&trace, &options).await.unwrap();

    // The requests sent are the CSV's first five minutes, in order.
    let rows = csv_rows(5);
    assert_eq!(report.sent.len(), rows.len());
    assert_eq!(rows.len(), 1_805);
    for (sent, &(_, rank, prompt, completion)) in report.sent.iter().zip(&rows) {
        assert_eq!(
            (sent.prompt_tokens, sent.completion_tokens),
            (prompt, completion)
        );
        let requested = if rank == 0 {
            "gpt-5"
        } else {
            "claude-sonnet-4-5"
        };
        assert_eq!(sent.requested, requested);
    }

    // Each answer priced here, by served model.
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    let (mut fallbacks, mut blocked) = (0, 0);
    for sent in &report.sent {
        match &sent.outcome {
            Outcome::Served { served, fallback } => {
                if *fallback {
                    fallbacks += 1;
                    assert_eq!(sent.requested, "claude-sonnet-4-5");
                    assert_eq!(
                        served, "gpt-5.4",
                        "the dearest cheaper model with room (R6)"
                    );
                }
                *expected.entry(served.clone()).or_default() +=
                    nanos(served, sent.prompt_tokens, sent.completion_tokens);
            }
            Outcome::Refused { status, code } => {
                assert_eq!((*status, code.as_str()), (429, "plan_limit_reached"));
                blocked += 1;
            }
            Outcome::Failed { message } => panic!("request {} failed: {message}", sent.index),
        }
    }
    assert!(fallbacks > 0, "the cap was never reached");
    assert!(blocked > 0, "the allowance was never reached");

    let snapshot = store.spend_snapshot(Utc::now()).await.unwrap();
    let books: BTreeMap<String, i64> = snapshot
        .models
        .iter()
        .filter(|m| m.counter.spent.get() != 0)
        .map(|m| (m.id.to_string(), m.counter.spent.get()))
        .collect();
    assert_eq!(books, expected, "spend by model = the trace priced here");
    let total: i64 = expected.values().sum();
    assert_eq!(snapshot.workspace.spent.get(), total);
    assert_eq!(snapshot.workspace.reserved.get(), 0);
    let ledger = store.ledger_totals(snapshot.cycle.start).await.unwrap();
    assert_eq!(ledger.total.get(), total);
    assert_eq!(
        ledger.events,
        i64::try_from(report.sent.len()).unwrap() - blocked
    );
    // The limits held: the cap, then the allowance; the budget was passed.
    assert!(books["claude-sonnet-4-5"] <= cap);
    assert!(total > 4 * EUR && total <= 6 * EUR, "{total}");

    // The replay's own summary agrees.
    let summary = replay::Summary::new(&report, &before, &store, &config.setup.catalog, Utc::now())
        .await
        .unwrap();
    assert!(summary.books_agree(), "{}", summary.render(&options));
    assert_eq!(summary.served_fallback, fallbacks);
    assert_eq!(
        summary.refused.get("plan_limit_reached").copied(),
        Some(u64::try_from(blocked).unwrap())
    );
    assert_eq!(summary.total_books_nanos, total);
    assert_eq!(summary.unexpected(), 0);

    // A second replay on the same books: the summary shows what it added, and a
    // wrong key is refused before any traffic.
    let mut wrong = options.clone();
    wrong.key = "tg_not-a-key".into();
    let refused = replay::probe(&wrong).await.unwrap_err().to_string();
    assert!(refused.contains("401"), "{refused}");
    let again = ReplayOptions {
        minutes: Some(1),
        ..options.clone()
    };
    let before = replay::books_before(&store, Utc::now()).await.unwrap();
    let report = replay::send(&trace, &again).await.unwrap();
    let summary = replay::Summary::new(&report, &before, &store, &config.setup.catalog, Utc::now())
        .await
        .unwrap();
    assert!(summary.books_agree(), "{}", summary.render(&again));
    assert_eq!(summary.cycle_spent_nanos, total + summary.total_books_nanos);
    // Its check line compares the cycle's ledger with the cycle's counters, not
    // with what this replay alone added.
    let cycle = summary.cycle_spent_nanos;
    let line = format!("ledger sum = counters         yes (this cycle: ledger {cycle} nano-euros, counters {cycle})");
    let rendered = summary.render(&again);
    assert!(rendered.contains(&line), "{rendered}");
    stack.server.abort();
    mock_server.abort();
}

#[test]
fn the_scenario_file_uses_the_demo_catalog_prices() {
    let scenario = Config::load(
        Some(&Path::new(DATA).join("replay.toml")),
        &Overrides::default(),
    )
    .unwrap();
    let demo = Config::load(None, &Overrides::default()).unwrap();
    let prices = |config: &Config| -> Vec<(String, app::domain::Prices, u32)> {
        config
            .setup
            .catalog
            .models()
            .iter()
            .map(|m| (m.id.to_string(), m.prices, m.max_output_tokens))
            .collect()
    };
    assert_eq!(prices(&scenario), prices(&demo));
    assert!(scenario.upstreams.iter().all(|u| u.name == "mock"));
    for model in ["gpt-5", "claude-sonnet-4-5", "gpt-5.4"] {
        let (input, output) = list_price(model);
        let prices = scenario.setup.catalog.resolve(model).unwrap().prices;
        assert_eq!(
            (prices.input.eur_per_mtok(), prices.output.eur_per_mtok()),
            (input, output)
        );
    }
}

on_both_backends!(replay_matches_the_trace);
