//! The store's story, told once and run on SQLite and PostgreSQL (DESIGN.md R6, R7,
//! §6): limits hold under concurrency, the ledger equals the counters, retries count
//! once, stale writes are refused, cycles roll over without a job.

#![allow(
    clippy::unwrap_used,
    reason = "a broken fixture should stop the test at once"
)]

mod common;

use std::sync::Arc;

use app::{
    domain::{BlockCode, Catalog, Counter, ModelId, ModelLimit, Nanos, TokenEstimate, Usage},
    store::{
        Actor, LimitChange, RecordOutcome, ReservationId, ReserveOutcome, ReserveRequest,
        Settlement, SharedStore, Spender, StoreError, UsageRecord, WorkspaceSetup,
    },
};
use chrono::{DateTime, Duration, TimeZone, Utc};
use common::{setup, TestDb, EUR};
use rand::{rngs::SmallRng, Rng, SeedableRng};

/// An instant inside the cycle [2026-10-31, 2026-11-30) of the test plan.
fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 10, 12, 0, 0).unwrap()
}

/// A request bound of `output` tokens and no prompt: on `mid` (2 EUR per 1M
/// output tokens) 1000 tokens reserve exactly 0.002 EUR.
fn estimate(output: u64) -> TokenEstimate {
    TokenEstimate {
        prompt_tokens: 0,
        output_cap: Some(output),
        n: 1,
    }
}

async fn reserve(
    store: &SharedStore,
    catalog: &Arc<Catalog>,
    model: &str,
    estimate: TokenEstimate,
    at: DateTime<Utc>,
) -> ReserveOutcome {
    try_reserve(store, catalog, model, estimate, at)
        .await
        .unwrap()
}

/// [`reserve`], with the store's error.
async fn try_reserve(
    store: &SharedStore,
    catalog: &Arc<Catalog>,
    model: &str,
    estimate: TokenEstimate,
    at: DateTime<Utc>,
) -> Result<ReserveOutcome, StoreError> {
    store
        .reserve(ReserveRequest {
            catalog: catalog.clone(),
            model: catalog.resolve(model).unwrap().id.clone(),
            estimate,
            spender: Spender::default(),
            owner: "test".into(),
            lease_until: at + Duration::minutes(5),
            now: at,
        })
        .await
}

fn admitted(outcome: ReserveOutcome) -> app::store::Reservation {
    match outcome {
        ReserveOutcome::Admitted(r) => r,
        ReserveOutcome::Blocked(b) => panic!("blocked: {}", b.message),
    }
}

fn settlement(id: &ReservationId, usage: Option<Usage>) -> Settlement {
    Settlement {
        reservation: id.clone(),
        usage,
        idempotency_key: None,
        within_reservation: false,
        bill_if_lapsed: false,
        now: now(),
    }
}

fn usage(prompt: u64, completion: u64) -> Usage {
    Usage {
        prompt_tokens: prompt,
        cached_tokens: 0,
        completion_tokens: completion,
        reasoning_tokens: 0,
    }
}

/// 50 concurrent reservations against an allowance that admits exactly 10.
async fn fifty_racing_requests_admit_exactly_ten(db: &TestDb) {
    // Each request holds 0.002 EUR on `mid`; the allowance is 0.02 EUR.
    let setup = setup(15 * EUR / 1000, 5 * EUR / 1000);
    let store = db.store(&setup).await;
    let catalog = setup.catalog.clone();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let store = store.clone();
            let catalog = catalog.clone();
            tokio::spawn(
                async move { reserve(&store, &catalog, "mid", estimate(1000), now()).await },
            )
        })
        .collect();
    let mut admitted_count = 0;
    for task in tasks {
        match task.await.unwrap() {
            ReserveOutcome::Admitted(_) => admitted_count += 1,
            ReserveOutcome::Blocked(b) => assert_eq!(b.code, BlockCode::PlanLimitReached),
        }
    }
    assert_eq!(admitted_count, 10);
    let snapshot = store.spend_snapshot(now()).await.unwrap();
    assert_eq!(snapshot.workspace.reserved, Nanos::new(20 * EUR / 1000));
}

/// Writes without a version (the CLI's `limit set`, `fallback on|off`) racing
/// from two pools, as two operators' scripts would: every one lands, in turn, and
/// each is audited; none is refused as stale.
async fn writes_without_a_version_all_land(db: &TestDb) {
    let setup = setup(100 * EUR, 0);
    let stores = [db.store(&setup).await, db.store(&setup).await];
    let tasks: Vec<_> = (1..=20_i64)
        .map(|eur| {
            let store = stores[usize::from(eur % 2 == 0)].clone();
            tokio::spawn(async move {
                let change = LimitChange {
                    model: ModelId::new("big"),
                    expected_version: None,
                    limit: ModelLimit {
                        limit: Some(Nanos::new(eur * EUR)),
                        enabled: true,
                    },
                };
                store
                    .update_model_limits(&Actor::Cli, &[change], now())
                    .await?;
                store
                    .update_settings(&Actor::Cli, None, eur % 2 == 0, now())
                    .await
                    .map(drop)
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let snapshot = stores[0].spend_snapshot(now()).await.unwrap();
    let big = snapshot
        .models
        .iter()
        .find(|m| m.id.as_str() == "big")
        .unwrap();
    assert_eq!(big.limit.version, 20, "each write made a version");
    let audit = stores[0].audit_log(100).await.unwrap();
    let limit_rows = audit
        .iter()
        .filter(|row| row.action == "model_limit")
        .count();
    assert_eq!(limit_rows, 20);
}

/// Saves of the tab based on one version racing from two pools (two replicas):
/// one lands, the others are refused as stale, and the audit has one row.
async fn stale_settings_saves_racing_lose(db: &TestDb) {
    let setup = setup(100 * EUR, 0);
    let stores = [db.store(&setup).await, db.store(&setup).await];
    let before = stores[0].spend_snapshot(now()).await.unwrap().settings;
    let tasks: Vec<_> = (0..10_usize)
        .map(|i| {
            let store = stores[i % 2].clone();
            tokio::spawn(async move {
                store
                    .update_settings(
                        &Actor::Cli,
                        Some(before.version),
                        !before.automatic_fallback,
                        now(),
                    )
                    .await
            })
        })
        .collect();
    let mut saved = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => saved += 1,
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(saved, 1, "one save per version");
    let after = stores[0].spend_snapshot(now()).await.unwrap().settings;
    assert_eq!(after.version, before.version + 1);
    let audit = stores[0].audit_log(100).await.unwrap();
    let rows = audit
        .iter()
        .filter(|row| row.action == "settings.automatic_fallback")
        .count();
    assert_eq!(rows, 1, "{audit:?}");
}

/// Two pools on one database race like two replicas: still exactly ten.
async fn two_replicas_admit_exactly_ten(db: &TestDb) {
    let setup = setup(20 * EUR / 1000, 0);
    let a = db.store(&setup).await;
    let b = db.store(&setup).await;
    let catalog = setup.catalog.clone();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let catalog = catalog.clone();
            tokio::spawn(
                async move { reserve(&store, &catalog, "mid", estimate(1000), now()).await },
            )
        })
        .collect();
    let mut admitted_count = 0;
    for task in tasks {
        if let ReserveOutcome::Admitted(_) = task.await.unwrap() {
            admitted_count += 1;
        }
    }
    assert_eq!(admitted_count, 10);
}

/// 10,000 random reserve/settle/release/expire operations from 4 tasks: the ledger
/// equals the counters to the nano-euro and nothing stays reserved.
async fn random_operations_keep_ledger_equal_to_counters(db: &TestDb) {
    let setup = setup(40 * EUR, 10 * EUR);
    let store = db.store(&setup).await;
    let catalog = setup.catalog.clone();
    // Caps on two models so that fallback and model blocks happen too.
    store
        .update_model_limits(
            &Actor::Cli,
            &[
                LimitChange {
                    model: ModelId::new("big"),
                    expected_version: Some(0),
                    limit: ModelLimit {
                        limit: Some(Nanos::new(5 * EUR)),
                        enabled: true,
                    },
                },
                LimitChange {
                    model: ModelId::new("mid"),
                    expected_version: Some(0),
                    limit: ModelLimit {
                        limit: Some(Nanos::new(3 * EUR)),
                        enabled: true,
                    },
                },
            ],
            now(),
        )
        .await
        .unwrap();
    let workers: Vec<_> = (0..4u64)
        .map(|seed| {
            let store = store.clone();
            let catalog = catalog.clone();
            tokio::spawn(async move {
                let mut rng = SmallRng::seed_from_u64(seed);
                let mut open: Vec<ReservationId> = Vec::new();
                for _ in 0..2500 {
                    match rng.random_range(0..10) {
                        0..=3 => {
                            let model = ["big", "mid", "small", "test/big"][rng.random_range(0..4)];
                            let est = TokenEstimate {
                                prompt_tokens: rng.random_range(0..5000),
                                output_cap: Some(rng.random_range(1..1000)),
                                n: 1,
                            };
                            // Some holds are given a lease that has already ended.
                            let at = now();
                            let lease = if rng.random_bool(0.1) {
                                at - Duration::seconds(1)
                            } else {
                                at + Duration::minutes(5)
                            };
                            let outcome = store
                                .reserve(ReserveRequest {
                                    catalog: catalog.clone(),
                                    model: catalog.resolve(model).unwrap().id.clone(),
                                    estimate: est,
                                    spender: Spender::default(),
                                    owner: "random".into(),
                                    lease_until: lease,
                                    now: at,
                                })
                                .await
                                .unwrap();
                            if let ReserveOutcome::Admitted(r) = outcome {
                                open.push(r.id);
                            }
                        }
                        4..=6 if !open.is_empty() => {
                            let id = open.swap_remove(rng.random_range(0..open.len()));
                            let reported = if rng.random_bool(0.2) {
                                None
                            } else {
                                // Sometimes more than reserved: recorded anyway (R7).
                                Some(usage(rng.random_range(0..6000), rng.random_range(0..1500)))
                            };
                            match store.settle(settlement(&id, reported)).await {
                                Ok(_) | Err(StoreError::NotFound { .. }) => {}
                                Err(e) => panic!("{e}"),
                            }
                        }
                        7..=8 if !open.is_empty() => {
                            let id = open.swap_remove(rng.random_range(0..open.len()));
                            match store.release(&id).await {
                                Ok(()) | Err(StoreError::NotFound { .. }) => {}
                                Err(e) => panic!("{e}"),
                            }
                        }
                        _ => {
                            store.release_expired(now()).await.unwrap();
                        }
                    }
                }
                for id in open {
                    let _ = store.release(&id).await;
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    let snapshot = store.spend_snapshot(now()).await.unwrap();
    let ledger = store.ledger_totals(snapshot.cycle.start).await.unwrap();
    assert!(
        ledger.events > 100,
        "too few settlements to mean anything: {}",
        ledger.events
    );
    assert_eq!(snapshot.workspace.reserved, Nanos::ZERO);
    assert_eq!(snapshot.workspace.spent, ledger.total);
    for model in &snapshot.models {
        assert_eq!(model.counter.reserved, Nanos::ZERO, "{}", model.id);
        let in_ledger = ledger
            .by_model
            .iter()
            .find(|(id, _)| *id == model.id)
            .map(|(_, n)| *n)
            .unwrap_or(Nanos::ZERO);
        assert_eq!(model.counter.spent, in_ledger, "{}", model.id);
    }
}

/// The same idempotent batch twice counts once; a retried settlement too.
async fn retried_batches_count_once(db: &TestDb) {
    let setup = setup(100 * EUR, 0);
    let store = db.store(&setup).await;
    let catalog = setup.catalog.clone();
    let mid = catalog.resolve("mid").unwrap();
    let batch: Vec<UsageRecord<'_>> = (0..3)
        .map(|i| UsageRecord {
            idempotency_key: format!("batch-1-{i}"),
            model: mid,
            model_as_sent: "mid",
            usage: usage(1000, 500),
        })
        .collect();
    let first = store
        .record_usage(&batch, Spender::default(), now())
        .await
        .unwrap();
    assert!(first
        .iter()
        .all(|o| matches!(o, RecordOutcome::Recorded(_))));
    let second = store
        .record_usage(&batch, Spender::default(), now())
        .await
        .unwrap();
    assert!(second
        .iter()
        .all(|o| matches!(o, RecordOutcome::Duplicate(_))));
    let snapshot = store.spend_snapshot(now()).await.unwrap();
    // 1000 × 0.5 + 500 × 2 EUR per 1M = 0.0015 EUR per item, three items.
    assert_eq!(snapshot.workspace.spent, Nanos::new(4_500_000));

    // A key with what SQL text quotes and escapes (PostgreSQL's batches write
    // their rows into the statement's text) is kept as sent.
    let key = r#"settle-1 it's a \ "key" $body$ '' \' ;-- é"#;
    let r = admitted(reserve(&store, &catalog, "mid", estimate(1000), now()).await);
    let mut s = settlement(&r.id, Some(usage(0, 1000)));
    s.idempotency_key = Some(key.into());
    let once = store.settle(s.clone()).await.unwrap();
    let again = store.settle(s).await.unwrap();
    assert!(once.newly_recorded && !again.newly_recorded);
    assert_eq!(once.id, again.id);
    let snapshot = store.spend_snapshot(now()).await.unwrap();
    assert_eq!(snapshot.workspace.spent, Nanos::new(6_500_000));
    let listed = store.usage_events(1, false).await.unwrap();
    assert_eq!(listed[0].idempotency_key.as_deref(), Some(key));
}

/// A retried record names the model it named the first time, though a config
/// change has since made that name an alias of another model: still a duplicate,
/// answered with the row recorded the first time. The same key naming another
/// model is a conflict.
async fn a_retry_naming_a_model_now_an_alias_is_a_duplicate(db: &TestDb) {
    let setup = setup(100 * EUR, 0);
    let store = db.store(&setup).await;
    let (small, mid) = (
        setup.catalog.resolve("small").unwrap(),
        setup.catalog.resolve("mid").unwrap(),
    );
    let record = |model, model_as_sent| UsageRecord {
        idempotency_key: "renamed-1".into(),
        model,
        model_as_sent,
        usage: usage(1000, 500),
    };
    let first = store
        .record_usage(&[record(small, "small")], Spender::default(), now())
        .await
        .unwrap();
    let RecordOutcome::Recorded(recorded) = &first[0] else {
        panic!("first record: {first:?}");
    };
    // `small` is now an alias of `mid`: the retry resolves to `mid`.
    let retry = store
        .record_usage(&[record(mid, "small")], Spender::default(), now())
        .await
        .unwrap();
    assert!(
        matches!(&retry[0], RecordOutcome::Duplicate(event) if event.id == recorded.id),
        "{retry:?}"
    );
    let other = store
        .record_usage(&[record(mid, "mid")], Spender::default(), now())
        .await
        .unwrap();
    assert!(
        matches!(&other[0], RecordOutcome::Conflict(event) if event.id == recorded.id),
        "{other:?}"
    );
    // Counted once, at `small`'s prices: 1000 × 0.1 + 500 × 0.5 EUR per 1M.
    let snapshot = store.spend_snapshot(now()).await.unwrap();
    assert_eq!(snapshot.workspace.spent, Nanos::new(350_000));
}

/// Recording usage goes through admission: a batch item past the plan is refused.
async fn recorded_usage_cannot_pass_the_plan(db: &TestDb) {
    let setup = setup(2 * EUR / 1000, 0);
    let store = db.store(&setup).await;
    let mid = setup.catalog.resolve("mid").unwrap();
    let batch: Vec<UsageRecord<'_>> = (0..3)
        .map(|i| UsageRecord {
            idempotency_key: format!("k{i}"),
            model: mid,
            model_as_sent: "mid",
            usage: usage(0, 500),
        })
        .collect();
    // 0.001 EUR each against 0.002: two fit, the third is blocked.
    let outcomes = store
        .record_usage(&batch, Spender::default(), now())
        .await
        .unwrap();
    assert!(matches!(outcomes[0], RecordOutcome::Recorded(_)));
    assert!(matches!(outcomes[1], RecordOutcome::Recorded(_)));
    assert!(
        matches!(&outcomes[2], RecordOutcome::Blocked(b) if b.code == BlockCode::PlanLimitReached)
    );
}

/// A stale settings write is refused and changes nothing; accepted ones are audited.
async fn stale_writes_conflict_and_change_nothing(db: &TestDb) {
    let setup = setup(100 * EUR, 0);
    let store = db.store(&setup).await;
    let admin = Actor::User {
        id: 1,
        email: "ada@example.com".into(),
    };
    let v = store.spend_snapshot(now()).await.unwrap().settings;
    assert!(v.automatic_fallback, "fallback is on by default");
    let saved = store
        .update_settings(&admin, Some(v.version), false, now())
        .await
        .unwrap();
    assert_eq!(saved.version, v.version + 1);
    let err = store
        .update_settings(&admin, Some(v.version), true, now())
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { current_version, .. } if current_version == saved.version)
    );
    assert!(
        !store
            .spend_snapshot(now())
            .await
            .unwrap()
            .settings
            .automatic_fallback
    );

    let cap = |eur: i64| ModelLimit {
        limit: Some(Nanos::new(eur * EUR)),
        enabled: true,
    };
    store
        .update_model_limits(
            &admin,
            &[LimitChange {
                model: ModelId::new("big"),
                expected_version: Some(0),
                limit: cap(5),
            }],
            now(),
        )
        .await
        .unwrap();
    // A save of two models where one is stale: neither is written.
    let err = store
        .update_model_limits(
            &admin,
            &[
                LimitChange {
                    model: ModelId::new("mid"),
                    expected_version: Some(0),
                    limit: cap(1),
                },
                LimitChange {
                    model: ModelId::new("big"),
                    expected_version: Some(0),
                    limit: cap(9),
                },
            ],
            now(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    let snapshot = store.spend_snapshot(now()).await.unwrap();
    let limit_of = |id: &str| {
        snapshot
            .models
            .iter()
            .find(|m| m.id.as_str() == id)
            .map(|m| m.limit)
    };
    assert_eq!(limit_of("big").unwrap().limit, cap(5));
    assert_eq!(limit_of("mid"), None);

    let audit = store.audit_log(10).await.unwrap();
    assert_eq!(audit.len(), 2);
    assert_eq!(audit[0].action, "model_limit");
    assert_eq!(audit[0].subject, "big");
    assert_eq!(audit[0].actor, "ada@example.com");
    assert_eq!(audit[0].new_value, r#"{"enabled":true,"limit_eur":"5"}"#);
    assert_eq!(audit[1].action, "settings.automatic_fallback");
    assert_eq!(audit[1].old_value, r#"{"automatic_fallback":true}"#);
}

/// Invalid changes come back as typed errors, never panics, and write nothing.
async fn invalid_changes_are_typed_errors(db: &TestDb) {
    let setup = setup(100 * EUR, 0);
    let store = db.store(&setup).await;
    let change = |model: &str, limit: ModelLimit| LimitChange {
        model: ModelId::new(model),
        expected_version: Some(0),
        limit,
    };
    let err = store
        .update_model_limits(
            &Actor::Cli,
            &[change(
                "mid",
                ModelLimit {
                    limit: None,
                    enabled: true,
                },
            )],
            now(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "enabled_without_amount");
    let err = store
        .update_model_limits(
            &Actor::Cli,
            &[change(
                "nope",
                ModelLimit {
                    limit: Some(Nanos::new(1)),
                    enabled: true,
                },
            )],
            now(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "unknown_model");
    let err = store
        .release(&ReservationId("missing".into()))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }));
    let bad = Usage {
        prompt_tokens: 1,
        cached_tokens: 2,
        completion_tokens: 0,
        reasoning_tokens: 0,
    };
    let r = admitted(reserve(&store, &setup.catalog, "mid", estimate(10), now()).await);
    let err = store
        .settle(settlement(&r.id, Some(bad)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "invalid_usage");
    // The reservation is still there to be settled properly.
    store
        .settle(settlement(&r.id, Some(usage(1, 1))))
        .await
        .unwrap();
    assert!(store.audit_log(10).await.unwrap().is_empty());
}

/// A cap set a moment ago applies to the next request: it falls back, and with
/// fallback off it is blocked.
async fn a_new_limit_applies_to_the_next_request(db: &TestDb) {
    let setup = setup(100 * EUR, 0);
    let store = db.store(&setup).await;
    let catalog = setup.catalog.clone();
    store
        .update_model_limits(
            &Actor::Cli,
            &[LimitChange {
                model: ModelId::new("big"),
                expected_version: Some(0),
                limit: ModelLimit {
                    limit: Some(Nanos::ZERO),
                    enabled: true,
                },
            }],
            now(),
        )
        .await
        .unwrap();
    let r = admitted(reserve(&store, &catalog, "test/big", estimate(100), now()).await);
    assert_eq!((r.requested.as_str(), r.served.as_str()), ("big", "mid"));
    let v = store.spend_snapshot(now()).await.unwrap().settings.version;
    store
        .update_settings(&Actor::Cli, Some(v), false, now())
        .await
        .unwrap();
    match reserve(&store, &catalog, "big", estimate(100), now()).await {
        ReserveOutcome::Blocked(b) => assert_eq!(b.code, BlockCode::ModelLimitReached),
        ReserveOutcome::Admitted(r) => panic!("admitted on {}", r.served),
    }
    // Spend counts against the served model.
    store
        .settle(settlement(&r.id, Some(usage(0, 100))))
        .await
        .unwrap();
    let snapshot = store.spend_snapshot(now()).await.unwrap();
    let spent = |id: &str| {
        snapshot
            .models
            .iter()
            .find(|m| m.id.as_str() == id)
            .map(|m| m.counter.spent)
            .unwrap_or(Nanos::ZERO)
    };
    assert_eq!(spent("big"), Nanos::ZERO);
    assert_eq!(spent("mid"), Nanos::new(200_000));
}

/// A limit set through another connection (the CLI, or another replica) applies
/// to this store's very next request, even though this store's writer has just
/// admitted requests on the books it read before (DESIGN.md R6).
async fn a_limit_set_elsewhere_applies_to_the_next_request(db: &TestDb) {
    let setup = setup(100 * EUR, 0);
    let gateway = db.store(&setup).await;
    let elsewhere = db.store(&setup).await;
    let catalog = setup.catalog.clone();
    for _ in 0..3 {
        let r = admitted(reserve(&gateway, &catalog, "big", estimate(100), now()).await);
        assert_eq!(r.served.as_str(), "big");
        gateway.release(&r.id).await.unwrap();
    }
    let v = elsewhere
        .spend_snapshot(now())
        .await
        .unwrap()
        .settings
        .version;
    elsewhere
        .update_settings(&Actor::Cli, Some(v), false, now())
        .await
        .unwrap();
    let limit = |model: &str, nanos: i64| LimitChange {
        model: ModelId::new(model),
        expected_version: Some(0),
        limit: ModelLimit {
            limit: Some(Nanos::new(nanos)),
            enabled: true,
        },
    };
    // "mid" may spend one request's worth: 100 output tokens at €2/Mtok.
    elsewhere
        .update_model_limits(
            &Actor::Cli,
            &[limit("big", 0), limit("mid", 200_000)],
            now(),
        )
        .await
        .unwrap();
    match reserve(&gateway, &catalog, "big", estimate(100), now()).await {
        ReserveOutcome::Blocked(b) => assert_eq!(b.code, BlockCode::ModelLimitReached),
        ReserveOutcome::Admitted(r) => panic!("admitted on {} past a limit of zero", r.served),
    }
    // Spend booked elsewhere counts here too.
    let used = admitted(reserve(&elsewhere, &catalog, "mid", estimate(100), now()).await);
    elsewhere
        .settle(settlement(&used.id, Some(usage(0, 100))))
        .await
        .unwrap();
    match reserve(&gateway, &catalog, "mid", estimate(100), now()).await {
        ReserveOutcome::Blocked(b) => assert_eq!(b.code, BlockCode::ModelLimitReached),
        ReserveOutcome::Admitted(r) => panic!("admitted on {} past its limit", r.served),
    }
    let snapshot = gateway.spend_snapshot(now()).await.unwrap();
    assert_eq!(snapshot.workspace.reserved, Nanos::ZERO);
    assert_eq!(snapshot.workspace.spent, Nanos::new(200_000));
}

/// A reservation that another connection ended (here its lease, swept by another
/// replica) is not settled again by the store that admitted it, however sure
/// that store was of it a moment before: the usage is refused, nothing is
/// counted twice and no counter goes below zero (DESIGN.md R7).
async fn a_reservation_ended_elsewhere_is_settled_once(db: &TestDb) {
    let setup = setup(100 * EUR, 0);
    let gateway = db.store(&setup).await;
    let elsewhere = db.store(&setup).await;
    let catalog = setup.catalog.clone();
    // Batches on books the gateway keeps: one settled, one to be swept.
    let settled = admitted(reserve(&gateway, &catalog, "mid", estimate(100), now()).await);
    let swept = admitted(reserve(&gateway, &catalog, "mid", estimate(100), now()).await);
    gateway
        .settle(settlement(&settled.id, Some(usage(0, 10))))
        .await
        .unwrap();
    let released = elsewhere
        .release_expired(now() + Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(released, 1);
    match gateway
        .settle(settlement(&swept.id, Some(usage(0, 10))))
        .await
    {
        Err(StoreError::NotFound { what }) => assert_eq!(what, "reservation"),
        other => panic!("a swept reservation was settled: {other:?}"),
    }
    let snapshot = gateway.spend_snapshot(now()).await.unwrap();
    assert_eq!(snapshot.workspace.reserved, Nanos::ZERO);
    assert_eq!(snapshot.workspace.spent, Nanos::new(20_000));
    // The gateway goes on admitting and settling on the books as they are.
    let next = admitted(reserve(&gateway, &catalog, "mid", estimate(100), now()).await);
    gateway
        .settle(settlement(&next.id, Some(usage(0, 10))))
        .await
        .unwrap();
    let snapshot = elsewhere.spend_snapshot(now()).await.unwrap();
    assert_eq!(snapshot.workspace.reserved, Nanos::ZERO);
    assert_eq!(snapshot.workspace.spent, Nanos::new(40_000));
}

/// A gateway's settlement that comes after the sweep released its hold (the
/// database was held up past the lease while the provider served the request)
/// is billed from the lapsed hold: spent once, nothing released twice, the
/// ledger equal to the counters. The usage API's settlement of a lapsed hold is
/// refused, and a lapsed hold is kept for `LAPSED_KEPT` only (DESIGN.md R7).
async fn a_late_settlement_bills_a_lapsed_hold(db: &TestDb) {
    let setup = setup(100 * EUR, 0);
    let gateway = db.store(&setup).await;
    let elsewhere = db.store(&setup).await;
    let catalog = setup.catalog.clone();
    let late = admitted(reserve(&gateway, &catalog, "mid", estimate(100), now()).await);
    let refused = admitted(reserve(&gateway, &catalog, "mid", estimate(100), now()).await);
    let forgotten = admitted(reserve(&gateway, &catalog, "mid", estimate(100), now()).await);
    let swept_at = now() + Duration::hours(1);
    assert_eq!(elsewhere.release_expired(swept_at).await.unwrap(), 3);
    let late_settlement = || Settlement {
        idempotency_key: Some(format!("settle:{}", late.id)),
        bill_if_lapsed: true,
        ..settlement(&late.id, Some(usage(0, 10)))
    };
    let event = gateway.settle(late_settlement()).await.unwrap();
    assert!(event.newly_recorded);
    assert_eq!(event.cost, Nanos::new(20_000));
    assert!(!event.estimated);
    assert!(event.lease_expired);
    // Settled again (a retry): the same event, counted once.
    let again = gateway.settle(late_settlement()).await.unwrap();
    assert!(!again.newly_recorded);
    assert_eq!(again.id, event.id);
    assert!(again.lease_expired);
    match gateway
        .settle(settlement(&refused.id, Some(usage(0, 10))))
        .await
    {
        Err(StoreError::NotFound { what }) => assert_eq!(what, "reservation"),
        other => panic!("the usage API settled a lapsed hold: {other:?}"),
    }
    // A week later the sweep forgets the lapsed holds.
    let week = swept_at + server::db::LAPSED_KEPT + Duration::minutes(1);
    assert_eq!(elsewhere.release_expired(week).await.unwrap(), 0);
    let forgotten_settlement = Settlement {
        bill_if_lapsed: true,
        ..settlement(&forgotten.id, Some(usage(0, 10)))
    };
    assert!(matches!(
        gateway.settle(forgotten_settlement).await,
        Err(StoreError::NotFound { .. })
    ));
    let snapshot = elsewhere.spend_snapshot(now()).await.unwrap();
    assert_eq!(snapshot.workspace.reserved, Nanos::ZERO);
    assert_eq!(snapshot.workspace.spent, Nanos::new(20_000));
    let ledger = elsewhere.ledger_totals(snapshot.cycle.start).await.unwrap();
    assert_eq!(ledger.events, 1);
    assert_eq!(ledger.total, snapshot.workspace.spent);
    // A hold settled in its lease is not flagged.
    let in_time = admitted(reserve(&gateway, &catalog, "mid", estimate(100), swept_at).await);
    let in_time = gateway
        .settle(settlement(&in_time.id, Some(usage(0, 10))))
        .await
        .unwrap();
    assert!(!in_time.lease_expired);
}

/// A request for 100 output tokens on `mid` (0.0002 EUR) spent by `user_id`
/// through the key `api_key_id`.
fn keyed_request(catalog: &Arc<Catalog>, user_id: i64, api_key_id: i64) -> ReserveRequest {
    ReserveRequest {
        catalog: catalog.clone(),
        model: ModelId::new("mid"),
        estimate: estimate(100),
        spender: Spender {
            user_id: Some(user_id),
            api_key_id: Some(api_key_id),
        },
        owner: "test".into(),
        lease_until: now() + Duration::minutes(1),
        now: now(),
    }
}

/// A new user with `email` and `role`, created by the CLI.
async fn user(store: &SharedStore, email: &str, role: app::store::Role) -> app::store::UserRecord {
    store
        .create_user(&Actor::Cli, email, "hash", role, now())
        .await
        .unwrap()
}

/// A reservation names its API key, and a key revoked (here through another
/// connection, as the CLI does) admits nothing from then on (DESIGN.md §4).
async fn a_revoked_key_admits_nothing(db: &TestDb) {
    let setup = setup(100 * EUR, 0);
    let store = db.store(&setup).await;
    let cli = db.store(&setup).await;
    let catalog = setup.catalog.clone();
    let user = user(&store, "member@example.com", app::store::Role::Member).await;
    let key = store
        .create_api_key(&Actor::Cli, user.id, "laptop", "0123abcd", now())
        .await
        .unwrap();
    let request = || keyed_request(&catalog, user.id, key.id);
    let held = admitted(store.reserve(request()).await.unwrap());
    cli.revoke_api_key(&Actor::Cli, key.id, now())
        .await
        .unwrap();
    match store.reserve(request()).await {
        Err(StoreError::NotFound { what }) => assert_eq!(what, "api key"),
        other => panic!("a revoked key was answered {other:?}"),
    }
    // What it held before is still settled normally.
    store
        .settle(settlement(&held.id, Some(usage(0, 100))))
        .await
        .unwrap();
    let snapshot = store.spend_snapshot(now()).await.unwrap();
    assert_eq!(snapshot.workspace.spent, Nanos::new(200_000));
    assert_eq!(snapshot.workspace.reserved, Nanos::ZERO);
}

/// A disabled user is found no more (sign-in, sessions), their keys are revoked
/// in the same step and admit nothing, what they hold still settles; enabled
/// again, they are found and may get new keys while the old stay revoked; every
/// step is in the audit log.
async fn a_disabled_user_signs_in_no_more_and_spends_nothing(db: &TestDb) {
    let setup = setup(100 * EUR, 0);
    let store = db.store(&setup).await;
    let cli = db.store(&setup).await;
    let catalog = setup.catalog.clone();
    let user = user(&store, "Leaver@example.com", app::store::Role::Admin).await;
    let laptop = store
        .create_api_key(&Actor::Cli, user.id, "laptop", "hash-laptop", now())
        .await
        .unwrap();
    let ci = store
        .create_api_key(&Actor::Cli, user.id, "ci", "hash-ci", now())
        .await
        .unwrap();
    store
        .revoke_api_key(&Actor::Cli, ci.id, now())
        .await
        .unwrap();
    let request = || keyed_request(&catalog, user.id, laptop.id);
    let held = admitted(store.reserve(request()).await.unwrap());

    let done = cli
        .disable_user(&Actor::Cli, "leaver@EXAMPLE.com", now())
        .await
        .unwrap();
    assert_eq!(done.user.id, user.id);
    assert_eq!(done.user.session_epoch, 1, "its sessions are over");
    assert_eq!(done.keys_revoked, 1, "the live key only");
    assert!(store
        .user_by_email("leaver@example.com")
        .await
        .unwrap()
        .is_none());
    assert!(store.user_by_id(user.id).await.unwrap().is_none());
    // An email PostgreSQL could not even compare is nobody's.
    assert!(store
        .user_by_email("leaver\0@example.com")
        .await
        .unwrap()
        .is_none());
    assert!(store
        .authenticate_api_key("hash-laptop", now())
        .await
        .unwrap()
        .is_none());
    match store.reserve(request()).await {
        Err(StoreError::NotFound { what }) => assert_eq!(what, "api key"),
        other => panic!("a disabled user's key was answered {other:?}"),
    }
    store
        .settle(settlement(&held.id, Some(usage(0, 100))))
        .await
        .unwrap();
    assert_eq!(
        store.spend_snapshot(now()).await.unwrap().workspace.spent,
        Nanos::new(200_000)
    );

    // Disabled once: again is NotFound, a new key is refused, the email stays taken.
    assert!(matches!(
        cli.disable_user(&Actor::Cli, "leaver@example.com", now())
            .await,
        Err(StoreError::NotFound { what: "user" })
    ));
    assert!(matches!(
        cli.create_api_key(&Actor::Cli, user.id, "new", "hash-new", now())
            .await,
        Err(StoreError::NotFound { what: "user" })
    ));
    assert!(matches!(
        cli.create_user(
            &Actor::Cli,
            "leaver@example.com",
            "hash",
            app::store::Role::Member,
            now()
        )
        .await,
        Err(StoreError::Invalid {
            code: "email_taken",
            ..
        })
    ));
    let listed = store.list_users().await.unwrap();
    let leaver = listed.iter().find(|u| u.id == user.id).unwrap();
    assert_eq!(leaver.disabled_at, Some(now()));
    assert_eq!(leaver.live_keys, 0);
    assert_eq!(leaver.role, app::store::Role::Admin);

    // Enabled again: found again, may get a new key; the old ones stay revoked.
    let back = cli
        .enable_user(&Actor::Cli, "LEAVER@example.com", now())
        .await
        .unwrap();
    assert_eq!(back.id, user.id);
    assert_eq!(
        back.session_epoch, 1,
        "sessions signed in before the disable stay ended"
    );
    assert!(store
        .user_by_email("leaver@example.com")
        .await
        .unwrap()
        .is_some());
    assert!(store
        .authenticate_api_key("hash-laptop", now())
        .await
        .unwrap()
        .is_none());
    cli.create_api_key(&Actor::Cli, user.id, "new", "hash-new", now())
        .await
        .unwrap();
    assert!(store
        .authenticate_api_key("hash-new", now())
        .await
        .unwrap()
        .is_some());
    assert!(matches!(
        cli.enable_user(&Actor::Cli, "leaver@example.com", now())
            .await,
        Err(StoreError::NotFound { what: "user" })
    ));

    let actions: Vec<(String, String)> = store
        .audit_log(10)
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.action, a.subject))
        .collect();
    let email = "leaver@example.com".to_owned();
    assert_eq!(
        actions,
        [
            ("api_key.create".to_owned(), email.clone()),
            ("user.enable".to_owned(), email.clone()),
            ("user.disable".to_owned(), email.clone()),
            ("api_key.revoke".to_owned(), email.clone()),
            ("api_key.create".to_owned(), email.clone()),
            ("api_key.create".to_owned(), email.clone()),
            ("user.create".to_owned(), email),
        ]
    );
}

/// The first request of a new cycle sees zero spend, with no job run in between,
/// and a request of the cycle before still sees that cycle's.
async fn a_new_cycle_starts_from_zero(db: &TestDb) {
    let setup = setup(2 * EUR / 1000, 0);
    let store = db.store(&setup).await;
    let catalog = setup.catalog.clone();
    let r = admitted(reserve(&store, &catalog, "mid", estimate(1000), now()).await);
    store.settle(settlement(&r.id, None)).await.unwrap();
    assert!(matches!(
        reserve(&store, &catalog, "mid", estimate(1000), now()).await,
        ReserveOutcome::Blocked(_)
    ));
    // The test plan renews on the 30th in November (clamped from the 31st), at
    // local midnight in Berlin: 2026-11-29T23:00Z.
    let boundary = Utc.with_ymd_and_hms(2026, 11, 29, 23, 0, 0).unwrap();
    let before = store
        .spend_snapshot(boundary - Duration::nanoseconds(1))
        .await
        .unwrap();
    assert_eq!(before.workspace.spent, Nanos::new(2 * EUR / 1000));
    let after = store.spend_snapshot(boundary).await.unwrap();
    assert_eq!(after.cycle.start, boundary);
    assert_eq!(after.workspace.spent, Nanos::ZERO);
    let first = admitted(reserve(&store, &catalog, "mid", estimate(1000), boundary).await);
    store.release(&first.id).await.unwrap();
    // The new cycle has counters now, and room. A request stamped a moment
    // before the boundary (on a replica whose clock is behind, say) is still
    // held to the spend of its own cycle.
    let late = boundary - Duration::seconds(1);
    assert!(matches!(
        reserve(&store, &catalog, "mid", estimate(1000), late).await,
        ReserveOutcome::Blocked(_)
    ));
    admitted(reserve(&store, &catalog, "mid", estimate(1000), boundary).await);
}

/// Holds whose lease ended are released by anyone; live ones are kept. Renewing
/// extends a live lease, never shortens it, and does not revive an ended one.
async fn expired_leases_are_released(db: &TestDb) {
    let setup = setup(100 * EUR, 0);
    let store = db.store(&setup).await;
    let catalog = Arc::clone(&setup.catalog);
    let stale = admitted(
        reserve(
            &store,
            &catalog,
            "mid",
            estimate(1000),
            now() - Duration::minutes(10),
        )
        .await,
    );
    let live = admitted(reserve(&store, &catalog, "mid", estimate(1000), now()).await);
    assert_eq!(store.release_expired(now()).await.unwrap(), 1);
    let snapshot = store.spend_snapshot(now()).await.unwrap();
    assert_eq!(snapshot.workspace.reserved, live.amount);
    assert!(matches!(
        store.settle(settlement(&stale.id, None)).await,
        Err(StoreError::NotFound { .. })
    ));
    // A release that comes after the sweep (the gateway's, tried again once the
    // database answers) finds nothing to release and changes nothing.
    assert!(matches!(
        store.release(&stale.id).await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(
        store.spend_snapshot(now()).await.unwrap().workspace,
        snapshot.workspace
    );
    let hour = now() + Duration::hours(1);
    let renewed = store.renew_lease(&live.id, hour, now()).await.unwrap();
    assert_eq!(renewed.timestamp_millis(), hour.timestamp_millis());
    // A shorter renewal keeps the longer lease.
    let kept = store
        .renew_lease(&live.id, now() + Duration::minutes(1), now())
        .await
        .unwrap();
    assert_eq!(kept, renewed);
    assert_eq!(
        store
            .release_expired(now() + Duration::minutes(30))
            .await
            .unwrap(),
        0
    );
    // Ended but not yet swept: not renewed, and the sweep still releases it.
    let ended = admitted(
        reserve(
            &store,
            &catalog,
            "mid",
            estimate(1000),
            now() - Duration::minutes(6),
        )
        .await,
    );
    assert!(matches!(
        store
            .renew_lease(&ended.id, now() + Duration::hours(1), now())
            .await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(store.release_expired(now()).await.unwrap(), 1);
}

/// Keys authenticate until revoked, and "last used" is written at most once a
/// minute, so a busy key does not put every request through a write.
async fn api_keys_authenticate_and_record_use_to_the_minute(db: &TestDb) {
    let setup = setup(100 * EUR, 0);
    let store = db.store(&setup).await;
    let t0 = now();
    let user = user(&store, "ada@example.com", app::store::Role::Member).await;
    let key = store
        .create_api_key(&Actor::Cli, user.id, "laptop", "hash-1", t0)
        .await
        .unwrap();
    assert_eq!(key.last_used_at, None);
    assert_eq!(
        store.authenticate_api_key("hash-2", t0).await.unwrap(),
        None
    );

    let used = |at: DateTime<Utc>| {
        let store = store.clone();
        async move {
            let (key, owner) = store
                .authenticate_api_key("hash-1", at)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(owner.email, "ada@example.com");
            let listed = store.list_api_keys(None).await.unwrap()[0].last_used_at;
            assert_eq!(key.last_used_at, listed, "the answer shows what is stored");
            listed.unwrap()
        }
    };
    assert_eq!(used(t0).await, t0);
    assert_eq!(
        used(t0 + Duration::seconds(59)).await,
        t0,
        "written once a minute at most"
    );
    assert_eq!(
        used(t0 + Duration::seconds(60)).await,
        t0 + Duration::seconds(60)
    );

    store.revoke_api_key(&Actor::Cli, key.id, t0).await.unwrap();
    assert_eq!(
        store.authenticate_api_key("hash-1", t0).await.unwrap(),
        None
    );
}

/// An upstream that reports absurd usage cannot break the books: each event is
/// booked while the counters hold it, the one that would carry a counter past
/// the largest whole number of nano-euros fails alone, as invalid (trying it
/// again cannot help: the gateway bills the estimate instead), and keeps its
/// hold, and the books stay readable and writable on both backends.
async fn absurd_usage_never_breaks_the_books(db: &TestDb) {
    let setup = setup(100 * EUR, 0);
    let store = db.store(&setup).await;
    let catalog = setup.catalog.clone();
    let held: Vec<_> = futures::future::join_all(
        (0..4).map(|_| reserve(&store, &catalog, "mid", estimate(1000), now())),
    )
    .await
    .into_iter()
    .map(admitted)
    .collect();
    // 1.5 × 10^15 output tokens at 2 EUR per 1M: 3 × 10^9 EUR, 3 × 10^18 nano-euros.
    let absurd = usage(0, 1_500_000_000_000_000);
    let per_event = 3_000_000_000_000_000_000_i64;
    for r in &held[..3] {
        store.settle(settlement(&r.id, Some(absurd))).await.unwrap();
    }
    let err = store
        .settle(settlement(&held[3].id, Some(absurd)))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Invalid {
                code: "constraint_violation",
                ..
            }
        ),
        "{err}"
    );

    let snapshot = store.spend_snapshot(now()).await.unwrap();
    assert_eq!(snapshot.workspace.spent, Nanos::new(3 * per_event));
    assert_eq!(
        snapshot.workspace.reserved, held[3].amount,
        "the hold is kept"
    );
    let ledger = store.ledger_totals(snapshot.cycle.start).await.unwrap();
    assert_eq!(
        (ledger.events, ledger.total),
        (3, Nanos::new(3 * per_event))
    );
    // Still writable: the hold settles on real usage, a setting changes.
    store
        .settle(settlement(&held[3].id, Some(usage(0, 100))))
        .await
        .unwrap();
    store
        .update_settings(&Actor::Cli, Some(snapshot.settings.version), false, now())
        .await
        .unwrap();
    let snapshot = store.spend_snapshot(now()).await.unwrap();
    assert_eq!(
        snapshot.workspace.spent,
        Nanos::new(3 * per_event + 200_000)
    );
    assert_eq!(snapshot.workspace.reserved, Nanos::ZERO);
}

/// Settlements arriving together are booked in one transaction (group commit);
/// one that cannot be booked fails alone, keeps its hold, and the others count.
async fn one_bad_settlement_among_many_fails_alone(db: &TestDb) {
    let setup = setup(40 * EUR, 10 * EUR);
    let store = db.store(&setup).await;
    let catalog = setup.catalog.clone();
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(admitted(
            reserve(&store, &catalog, "mid", estimate(1000), now()).await,
        ));
    }
    let bad = 7;
    let tasks: Vec<_> = held
        .iter()
        .enumerate()
        .map(|(i, reservation)| {
            let store = store.clone();
            // Its cost does not fit the books' integer nano-euros.
            let tokens = if i == bad {
                usage(u64::MAX, 1)
            } else {
                usage(500, 100)
            };
            let settle = settlement(&reservation.id, Some(tokens));
            tokio::spawn(async move { store.settle(settle).await })
        })
        .collect();
    let mut booked = 0;
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.unwrap() {
            Ok(event) => {
                assert_ne!(i, bad);
                assert!(event.newly_recorded);
                booked += 1;
            }
            Err(e) => {
                assert_eq!(i, bad, "{e}");
                assert_eq!(e.code(), "invalid_usage");
            }
        }
    }
    assert_eq!(booked, 19);
    let snapshot = store.spend_snapshot(now()).await.unwrap();
    let ledger = store.ledger_totals(snapshot.cycle.start).await.unwrap();
    assert_eq!(ledger.events, 19);
    assert_eq!(snapshot.workspace.spent, ledger.total);
    assert_eq!(snapshot.workspace.reserved, held[bad].amount);
    store.release(&held[bad].id).await.unwrap();
    let snapshot = store.spend_snapshot(now()).await.unwrap();
    assert_eq!(snapshot.workspace.reserved, Nanos::ZERO);
}

/// A plan whose start date or timezone changed mid-cycle moves the cycle's
/// bounds (R1), not its spend: the new cycle counts what the ledger booked
/// within its bounds plus the holds in flight, so the workspace cannot spend its
/// plan twice, and moving back restores the first cycle's books. The ledger's
/// sums for each cycle stay equal to its counters (R2).
async fn a_changed_plan_start_keeps_the_spend_of_the_cycle(db: &TestDb) {
    // Three requests of 0.002 EUR each fill the plan.
    let first = setup(6 * EUR / 1000, 0);
    let store = db.store(&first).await;
    let catalog = first.catalog.clone();
    let ledger_matches = |snapshot| assert_ledger_matches(&store, snapshot);
    let bill = |at: DateTime<Utc>| {
        let store = store.clone();
        let catalog = catalog.clone();
        async move {
            let r = admitted(reserve(&store, &catalog, "mid", estimate(1000), at).await);
            let mut settle = settlement(&r.id, None);
            settle.now = at;
            store.settle(settle).await.unwrap();
        }
    };
    // Before and after the 5th of November, in the cycle from 31 October.
    bill(Utc.with_ymd_and_hms(2026, 11, 2, 12, 0, 0).unwrap()).await;
    bill(now()).await;
    let in_flight = admitted(reserve(&store, &catalog, "mid", estimate(1000), now()).await);
    assert!(matches!(
        reserve(&store, &catalog, "mid", estimate(1000), now()).await,
        ReserveOutcome::Blocked(_)
    ));

    // Cycles now renew on the 5th: the cycle of `now()` starts on 5 November,
    // Berlin midnight, and holds one settled request and the one in flight.
    let mut fifth = setup(6 * EUR / 1000, 0);
    fifth.plan.start = chrono::NaiveDate::from_ymd_opt(2026, 1, 5).unwrap();
    store.apply_setup(&fifth, now()).await.unwrap();
    let snapshot = store.spend_snapshot(now()).await.unwrap();
    assert_eq!(
        snapshot.cycle.start,
        Utc.with_ymd_and_hms(2026, 11, 4, 23, 0, 0).unwrap()
    );
    assert_eq!(snapshot.workspace.spent, Nanos::new(2 * EUR / 1000));
    assert_eq!(snapshot.workspace.reserved, in_flight.amount);
    let mid = snapshot
        .models
        .iter()
        .find(|m| m.id.as_str() == "mid")
        .unwrap();
    assert_eq!(mid.counter.spent, Nanos::new(2 * EUR / 1000));
    assert_eq!(mid.counter.reserved, in_flight.amount);
    ledger_matches(snapshot).await;
    // Room for exactly one more request, as the new cycle's books say.
    let last = admitted(reserve(&store, &catalog, "mid", estimate(1000), now()).await);
    assert!(matches!(
        reserve(&store, &catalog, "mid", estimate(1000), now()).await,
        ReserveOutcome::Blocked(_)
    ));
    // The hold made before the change settles into the new cycle.
    store.settle(settlement(&in_flight.id, None)).await.unwrap();
    store.release(&last.id).await.unwrap();
    let snapshot = store.spend_snapshot(now()).await.unwrap();
    assert_eq!(snapshot.workspace.spent, Nanos::new(4 * EUR / 1000));
    assert_eq!(snapshot.workspace.reserved, Nanos::ZERO);
    ledger_matches(snapshot).await;

    // A timezone change re-cuts too, and the operator's change is audited.
    let mut tokyo = setup(6 * EUR / 1000, 0);
    tokyo.plan.timezone = chrono_tz::Asia::Tokyo;
    store.apply_setup(&tokyo, now()).await.unwrap();
    let snapshot = store.spend_snapshot(now()).await.unwrap();
    assert_eq!(
        snapshot.cycle.start,
        Utc.with_ymd_and_hms(2026, 10, 30, 15, 0, 0).unwrap()
    );
    assert_eq!(snapshot.workspace.spent, Nanos::new(6 * EUR / 1000));
    assert_eq!(snapshot.workspace.reserved, Nanos::ZERO);
    ledger_matches(snapshot).await;
    let audit = store.audit_log(10).await.unwrap();
    let plans: Vec<_> = audit.iter().filter(|a| a.action == "plan").collect();
    assert_eq!(plans.len(), 2);
    assert!(plans
        .iter()
        .all(|a| a.actor == "config" && a.subject == "workspace"));
    assert!(
        plans[0].old_value.contains("\"2026-01-05\""),
        "{}",
        plans[0].old_value
    );
    assert!(
        plans[0].new_value.contains("\"Asia/Tokyo\""),
        "{}",
        plans[0].new_value
    );

    // A new budget alone moves no boundary and leaves the books as they are.
    let mut raised = tokyo;
    raised.plan.amounts.budget = Nanos::new(EUR);
    store.apply_setup(&raised, now()).await.unwrap();
    let snapshot = store.spend_snapshot(now()).await.unwrap();
    assert_eq!(snapshot.workspace.spent, Nanos::new(6 * EUR / 1000));
    assert_eq!(store.audit_log(10).await.unwrap().len(), audit.len() + 1);

    // Back to the first plan: its cycle holds the three requests again, and a
    // fourth, booked under it, is in its ledger too.
    store.apply_setup(&first, now()).await.unwrap();
    let snapshot = store.spend_snapshot(now()).await.unwrap();
    assert_eq!(
        snapshot.cycle.start,
        Utc.with_ymd_and_hms(2026, 10, 30, 23, 0, 0).unwrap()
    );
    assert_eq!(snapshot.workspace.spent, Nanos::new(6 * EUR / 1000));
    ledger_matches(snapshot).await;
    store.apply_setup(&setup(EUR, 0), now()).await.unwrap();
    bill(now() + chrono::Duration::seconds(1)).await;
    let snapshot = store.spend_snapshot(now()).await.unwrap();
    assert_eq!(snapshot.workspace.spent, Nanos::new(8 * EUR / 1000));
    ledger_matches(snapshot).await;
}

/// Asserts that the ledger's sums for the cycle of `snapshot` equal its counters,
/// in total and model by model (R2).
async fn assert_ledger_matches(store: &SharedStore, snapshot: app::store::SpendSnapshot) {
    let ledger = store.ledger_totals(snapshot.cycle.start).await.unwrap();
    assert_eq!(
        ledger.total, snapshot.workspace.spent,
        "{:?}",
        snapshot.cycle
    );
    let counted: Vec<_> = snapshot
        .models
        .iter()
        .filter(|m| m.counter.spent != Nanos::ZERO)
        .map(|m| (m.id.clone(), m.counter.spent))
        .collect();
    assert_eq!(ledger.by_model, counted, "{:?}", snapshot.cycle);
}

/// When a new plan start moves the current cycle's bounds (R1), a request
/// admitted in the cycle before and settled in this one is counted in the cycle
/// of its admission under the new bounds: not in the new cycle when it was
/// admitted before it began, in it when it was admitted after. Counted once
/// either way, and the ledger's sums follow the counters (R2).
async fn a_recut_counts_a_request_in_the_cycle_of_its_admission(db: &TestDb) {
    let first = setup(EUR, 0);
    let store = db.store(&first).await;
    let catalog = first.catalog.clone();
    let bill = |output: u64, admitted_at: DateTime<Utc>| {
        let store = store.clone();
        let catalog = catalog.clone();
        async move {
            let r = admitted(reserve(&store, &catalog, "mid", estimate(output), admitted_at).await);
            store.settle(settlement(&r.id, None)).await.unwrap();
        }
    };
    let books = || async { store.spend_snapshot(now()).await.unwrap().workspace };
    let spent = |nanos| Counter {
        spent: Nanos::new(nanos),
        reserved: Nanos::ZERO,
    };
    // 0.002 EUR admitted on 30 October, the cycle before (it begins on 31
    // October in Berlin), settled on 10 November; 0.001 admitted on 2 November;
    // 0.0005 on 10 November. And a hold of 0.004 taken on 30 October, still in
    // flight.
    let october = Utc.with_ymd_and_hms(2026, 10, 30, 12, 0, 0).unwrap();
    bill(1000, october).await;
    bill(500, Utc.with_ymd_and_hms(2026, 11, 2, 12, 0, 0).unwrap()).await;
    bill(250, now()).await;
    let in_flight = admitted(reserve(&store, &catalog, "mid", estimate(2000), october).await);
    assert_eq!(books().await, spent(EUR / 1000 + EUR / 2000));

    // Cycles from the 5th: the cycle of 10 November holds only what was admitted
    // since 5 November; the hold stays in the cycle before.
    let mut fifth = setup(EUR, 0);
    fifth.plan.start = chrono::NaiveDate::from_ymd_opt(2026, 1, 5).unwrap();
    store.apply_setup(&fifth, now()).await.unwrap();
    assert_eq!(books().await, spent(EUR / 2000));
    assert_ledger_matches(&store, store.spend_snapshot(now()).await.unwrap()).await;

    // Cycles from the 25th: the cycle of 10 November began on 25 October and
    // holds all three, and the hold.
    let mut late = setup(EUR, 0);
    late.plan.start = chrono::NaiveDate::from_ymd_opt(2026, 1, 25).unwrap();
    store.apply_setup(&late, now()).await.unwrap();
    let mut expected = spent(EUR * 35 / 10_000);
    expected.reserved = in_flight.amount;
    assert_eq!(books().await, expected);
    assert_ledger_matches(&store, store.spend_snapshot(now()).await.unwrap()).await;

    // Back to the 5th, then settled: billed to the cycle it was admitted in, not
    // this one, and counted nowhere twice; back to the 25th, it is in this one.
    store.apply_setup(&fifth, now()).await.unwrap();
    assert_eq!(books().await, spent(EUR / 2000));
    store.settle(settlement(&in_flight.id, None)).await.unwrap();
    assert_eq!(books().await, spent(EUR / 2000));
    assert_ledger_matches(&store, store.spend_snapshot(now()).await.unwrap()).await;
    store.apply_setup(&late, now()).await.unwrap();
    assert_eq!(books().await, spent(EUR * 75 / 10_000));
    assert_ledger_matches(&store, store.spend_snapshot(now()).await.unwrap()).await;
}

/// A plan start moved by whole months on the same day moves no boundary (R1):
/// the change is audited, the cycle's counters stay as they were, and a request
/// admitted in the cycle before and settled in this one stays in the cycle it
/// was booked to, counted once (R2).
async fn a_start_moved_by_whole_months_keeps_the_books(db: &TestDb) {
    let first = setup(EUR, 0);
    let store = db.store(&first).await;
    let catalog = first.catalog.clone();
    let before_the_boundary = Utc.with_ymd_and_hms(2026, 10, 30, 12, 0, 0).unwrap();
    let late =
        admitted(reserve(&store, &catalog, "mid", estimate(1000), before_the_boundary).await);
    store.settle(settlement(&late.id, None)).await.unwrap();
    let r = admitted(reserve(&store, &catalog, "mid", estimate(500), now()).await);
    store.settle(settlement(&r.id, None)).await.unwrap();
    let before = store.spend_snapshot(now()).await.unwrap();
    assert_eq!(before.workspace.spent, Nanos::new(EUR / 1000));

    // 31 March instead of 31 January: the same boundaries, clamped alike.
    let mut moved = setup(EUR, 0);
    moved.plan.start = chrono::NaiveDate::from_ymd_opt(2026, 3, 31).unwrap();
    store.apply_setup(&moved, now()).await.unwrap();
    let after = store.spend_snapshot(now()).await.unwrap();
    assert_eq!(after.cycle, before.cycle);
    assert_eq!(after.workspace, before.workspace);
    assert_eq!(after.models, before.models);
    let ledger = store.ledger_totals(after.cycle.start).await.unwrap();
    assert_eq!(ledger.total, after.workspace.spent);
    let previous = store
        .ledger_totals(Utc.with_ymd_and_hms(2026, 9, 29, 22, 0, 0).unwrap())
        .await
        .unwrap();
    assert_eq!(previous.total, Nanos::new(2 * EUR / 1000));
    let audit = store.audit_log(10).await.unwrap();
    assert!(
        audit
            .iter()
            .any(|a| a.action == "plan" && a.new_value.contains("\"2026-03-31\"")),
        "{audit:?}"
    );
}

/// A config applied again with another workspace name or another catalog is
/// audited as a change of the plan is (actor `config`), with the values before
/// and after; the same config applied again is no change, and neither is the
/// first set-up.
async fn a_new_name_or_catalog_is_audited(db: &TestDb) {
    let first = setup(EUR, 0);
    let store = db.store(&first).await;
    store.apply_setup(&first, now()).await.unwrap();
    let audit = || async { store.audit_log(50).await.unwrap() };
    assert_eq!(audit().await, Vec::new());

    let limit = |nanos: Option<i64>| app::store::LimitChange {
        model: ModelId::new("small"),
        expected_version: None,
        limit: ModelLimit {
            limit: nanos.map(Nanos::new),
            enabled: nanos.is_some(),
        },
    };
    store
        .update_model_limits(&Actor::Cli, &[limit(Some(EUR))], now())
        .await
        .unwrap();
    let mut renamed = first.clone();
    renamed.name = "Acme".into();
    store.apply_setup(&renamed, now()).await.unwrap();
    // Without `small`, and `mid` dearer.
    let mut repriced = renamed.clone();
    let models: Vec<_> = common::catalog()
        .models()
        .iter()
        .filter(|m| m.id.as_str() != "small")
        .cloned()
        .map(|mut m| {
            if m.id.as_str() == "mid" {
                m.prices.output = app::domain::PricePerMTok::new("2.5".parse().unwrap()).unwrap();
            }
            m
        })
        .collect();
    repriced.catalog = std::sync::Arc::new(app::domain::Catalog::new(models).unwrap());
    store.apply_setup(&repriced, now()).await.unwrap();
    store.apply_setup(&repriced, now()).await.unwrap();

    // The dropped model's limit can be cleared, not set.
    let refused = store
        .update_model_limits(&Actor::Cli, &[limit(Some(2 * EUR))], now())
        .await;
    assert!(
        matches!(
            refused,
            Err(StoreError::Invalid {
                code: "unknown_model",
                ..
            })
        ),
        "{refused:?}"
    );
    store
        .update_model_limits(&Actor::Cli, &[limit(None)], now())
        .await
        .unwrap();
    let snapshot = store.spend_snapshot(now()).await.unwrap();
    assert!(snapshot
        .models
        .iter()
        .all(|m| m.limit.limit == ModelLimit::default()));

    let rows: Vec<_> = audit()
        .await
        .into_iter()
        .filter(|a| a.actor == "config")
        .collect();
    let changes: Vec<(&str, &str, &str)> = rows
        .iter()
        .map(|a| (a.actor.as_str(), a.action.as_str(), a.subject.as_str()))
        .collect();
    assert_eq!(
        changes,
        [
            ("config", "catalog", "workspace"),
            ("config", "workspace.name", "workspace"),
        ]
    );
    let json = |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap();
    assert_eq!(
        json(&rows[1].old_value),
        serde_json::json!({"name": "Test workspace"})
    );
    assert_eq!(
        json(&rows[1].new_value),
        serde_json::json!({"name": "Acme"})
    );
    let (old, new) = (json(&rows[0].old_value), json(&rows[0].new_value));
    let ids = |models: &serde_json::Value| -> Vec<String> {
        models
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&old), ["big", "mid", "small"]);
    assert_eq!(ids(&new), ["big", "mid"]);
    assert_eq!(old[1]["output_eur_per_mtok"], "2");
    assert_eq!(new[1]["output_eur_per_mtok"], "2.5");
}

/// An address is one user whatever the case it is typed in, non-ASCII letters
/// included: stored folded, found, refused as taken, disabled, enabled and given
/// keys by any spelling (`app::store::normalized_email`).
async fn an_email_is_one_user_whatever_its_case(db: &TestDb) {
    let store = db.store(&setup(100 * EUR, 0)).await;
    let user = user(&store, " Émile@Exemple.FR ", app::store::Role::Member).await;
    assert_eq!(user.email, "émile@exemple.fr");
    let found = store.user_by_email("ÉMILE@exemple.fr").await.unwrap();
    assert_eq!(found.map(|u| u.id), Some(user.id));
    // The accent typed as a combining mark (NFD, as some keyboards send it).
    let found = store
        .user_by_email("E\u{301}mile@exemple.fr")
        .await
        .unwrap();
    assert_eq!(found.map(|u| u.id), Some(user.id));
    assert!(matches!(
        store
            .create_user(
                &Actor::Cli,
                "émile@EXEMPLE.fr",
                "hash",
                app::store::Role::Admin,
                now()
            )
            .await,
        Err(StoreError::Invalid {
            code: "email_taken",
            ..
        })
    ));
    store
        .create_api_key(&Actor::Cli, user.id, "laptop", "hash-laptop", now())
        .await
        .unwrap();
    // Another letter is another user; an address drawn like a user's
    // (Cyrillic `е` for the Latin `e`) is refused, naming the user it looks like.
    store
        .create_user(
            &Actor::Cli,
            "emile@exemple.fr",
            "hash",
            app::store::Role::Member,
            now(),
        )
        .await
        .unwrap();
    match store
        .create_user(
            &Actor::Cli,
            "\u{0435}mile@exemple.fr",
            "hash",
            app::store::Role::Admin,
            now(),
        )
        .await
    {
        Err(StoreError::Invalid {
            code: "email_look_alike",
            message,
        }) => assert!(
            message.contains("existing user emile@exemple.fr"),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
    let keys = store.list_api_keys(Some("ÉMILE@EXEMPLE.FR")).await.unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].owner_email, "émile@exemple.fr");
    let done = store
        .disable_user(&Actor::Cli, "Émile@exemple.fr", now())
        .await
        .unwrap();
    assert_eq!(done.user.id, user.id);
    let back = store
        .enable_user(&Actor::Cli, "ÉMILE@EXEMPLE.FR", now())
        .await
        .unwrap();
    assert_eq!(back.id, user.id);
    assert_eq!(store.list_users().await.unwrap().len(), 2);
}

/// A member, `ada@example.com`, her key `laptop`, and a hold admitted for it
/// ([`keyed_request`]).
async fn ada_s_hold(
    store: &SharedStore,
    catalog: &Arc<Catalog>,
) -> (app::store::ApiKeyRecord, app::store::Reservation) {
    let ada = user(store, "ada@example.com", app::store::Role::Member).await;
    let key = store
        .create_api_key(&Actor::Cli, ada.id, "laptop", "hash-laptop", now())
        .await
        .unwrap();
    let request = keyed_request(catalog, ada.id, key.id);
    (key, admitted(store.reserve(request).await.unwrap()))
}

/// The holds of requests in flight are listed with their user, key, owner and
/// lease, and leave the list once settled or released.
async fn holds_in_flight_are_listed(db: &TestDb) {
    let setup = setup(100 * EUR, 0);
    let store = db.store(&setup).await;
    let catalog = setup.catalog.clone();
    assert!(store.list_reservations().await.unwrap().is_empty());
    let (key, keyed) = ada_s_hold(&store, &catalog).await;
    let later = now() + Duration::seconds(1);
    let anonymous = admitted(reserve(&store, &catalog, "mid", estimate(1000), later).await);

    let listed = store.list_reservations().await.unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0].id, keyed.id, "oldest first");
    assert_eq!(listed[0].amount, keyed.amount);
    assert_eq!(listed[0].served, ModelId::new("mid"));
    assert_eq!(listed[0].user_email.as_deref(), Some("ada@example.com"));
    assert_eq!(listed[0].api_key_id, Some(key.id));
    assert_eq!(listed[0].owner, "test");
    assert_eq!(listed[0].lease_until, now() + Duration::minutes(1));
    assert_eq!(listed[1].id, anonymous.id);
    assert_eq!(
        listed[1].amount,
        Nanos::new(2_000_000),
        "1000 tokens at 2 EUR per 1M"
    );
    assert_eq!(listed[1].user_email, None);
    assert_eq!(listed[1].lease_until, later + Duration::minutes(5));

    store
        .settle(settlement(&keyed.id, Some(usage(0, 10))))
        .await
        .unwrap();
    store.release(&anonymous.id).await.unwrap();
    assert!(store.list_reservations().await.unwrap().is_empty());
}

/// The ledger is listed newest first, each row with its user, key, counts and
/// flags; `flagged_only` keeps the rows billed an estimate (or over their
/// reservation, or after their lease), and `limit` the last ones.
async fn the_ledger_is_listed_newest_first(db: &TestDb) {
    let setup = setup(100 * EUR, 0);
    let store = db.store(&setup).await;
    let catalog = setup.catalog.clone();
    assert!(store.usage_events(10, false).await.unwrap().is_empty());
    let (key, keyed) = ada_s_hold(&store, &catalog).await;
    let billed = store
        .settle(settlement(&keyed.id, Some(usage(0, 10))))
        .await
        .unwrap();
    let anonymous = admitted(reserve(&store, &catalog, "mid", estimate(1000), now()).await);
    let estimated = store.settle(settlement(&anonymous.id, None)).await.unwrap();
    let mid = catalog.resolve("mid").unwrap();
    let record = UsageRecord {
        idempotency_key: "record-1".into(),
        model: mid,
        model_as_sent: "mid",
        usage: usage(1000, 500),
    };
    store
        .record_usage(&[record], Spender::default(), now())
        .await
        .unwrap();

    let listed = store.usage_events(10, false).await.unwrap();
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert_eq!(listed[0].idempotency_key.as_deref(), Some("record-1"));
    assert_eq!(listed[0].usage, Some(usage(1000, 500)));
    // 1000 × 0.5 + 500 × 2 EUR per 1M.
    assert_eq!(listed[0].cost, Nanos::new(1_500_000));
    assert_eq!(listed[1].id, estimated.id);
    assert_eq!((listed[1].usage, listed[1].estimated), (None, true));
    assert_eq!(listed[1].cost, anonymous.amount);
    assert_eq!(listed[1].user_email, None);
    assert_eq!(listed[2].id, billed.id);
    assert_eq!(listed[2].user_email.as_deref(), Some("ada@example.com"));
    assert_eq!(listed[2].api_key_id, Some(key.id));
    assert_eq!(listed[2].served, ModelId::new("mid"));
    assert_eq!(listed[2].usage, Some(usage(0, 10)));
    assert_eq!(listed[2].cost, billed.cost);
    assert!(!listed[2].estimated && !listed[2].over_reservation && !listed[2].lease_expired);
    assert_eq!(listed[2].occurred_at, now());

    let flagged = store.usage_events(10, true).await.unwrap();
    assert_eq!(flagged, vec![listed[1].clone()]);
    let last = store.usage_events(1, false).await.unwrap();
    assert_eq!(last, vec![listed[0].clone()]);
}

/// A new password replaces the old one of a user, enabled or disabled, and ends
/// their sessions (the epoch grows); their keys stay; the audit row says what
/// happened without the hash.
async fn a_new_password_ends_every_session(db: &TestDb) {
    let store = db.store(&setup(100 * EUR, 0)).await;
    let ada = user(&store, "ada@example.com", app::store::Role::Admin).await;
    store
        .create_api_key(&Actor::Cli, ada.id, "laptop", "hash-laptop", now())
        .await
        .unwrap();
    let changed = store
        .set_password(&Actor::Cli, "ADA@example.com", "new-hash", now())
        .await
        .unwrap();
    assert_eq!(changed.id, ada.id);
    assert_eq!(changed.password_hash, "new-hash");
    assert_eq!(changed.session_epoch, ada.session_epoch + 1);
    let found = store.user_by_email("ada@example.com").await.unwrap();
    assert_eq!(found.unwrap().password_hash, "new-hash");
    assert!(
        store
            .authenticate_api_key("hash-laptop", now())
            .await
            .unwrap()
            .is_some(),
        "the keys stay live"
    );
    let audit = &store.audit_log(1).await.unwrap()[0];
    assert_eq!(
        (audit.action.as_str(), audit.subject.as_str()),
        ("user.password", "ada@example.com")
    );
    assert!(!audit.new_value.contains("hash") && !audit.old_value.contains("hash"));

    // A disabled user's too: they sign in with it once enabled again.
    store
        .disable_user(&Actor::Cli, "ada@example.com", now())
        .await
        .unwrap();
    let again = store
        .set_password(&Actor::Cli, "ada@example.com", "newer-hash", now())
        .await
        .unwrap();
    assert_eq!(
        again.session_epoch,
        ada.session_epoch + 3,
        "disable, then this"
    );
    store
        .enable_user(&Actor::Cli, "ada@example.com", now())
        .await
        .unwrap();
    let found = store.user_by_email("ada@example.com").await.unwrap();
    assert_eq!(found.unwrap().password_hash, "newer-hash");
    assert!(matches!(
        store
            .set_password(&Actor::Cli, "nobody@example.com", "hash", now())
            .await,
        Err(StoreError::NotFound { what: "user" })
    ));
}

/// Rows written before emails were folded are folded when a store opens, the
/// letters SQL's `lower()` leaves alone included; of two that fold to one address
/// (where the backend's own index let both in), the first keeps it and the other
/// its email as typed, and the store still opens.
async fn emails_stored_before_folding_are_folded_at_start(db: &TestDb) {
    let setup = setup(100 * EUR, 0);
    let store = db.store(&setup).await;
    user(&store, "zoe@example.com", app::store::Role::Member).await;
    // The last one decomposed (NFD): `e` and a combining diaeresis.
    for email in [
        "Zoë@Example.COM",
        "Åsa@example.com",
        "Noe\u{308}l@Example.com",
    ] {
        insert_user_as_typed(db, email).await.unwrap();
    }
    // SQLite's index folds ASCII only and takes this one; PostgreSQL's `lower()`
    // folds `Å` too (here, in C.UTF-8) and refuses it.
    let both_kept = insert_user_as_typed(db, "åsa@example.com").await.is_ok();

    let reopened = db.store(&setup).await;
    let mut emails: Vec<String> = reopened
        .list_users()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.email)
        .collect();
    emails.sort();
    let mut expected = vec![
        "no\u{eb}l@example.com",
        "zoe@example.com",
        "zoë@example.com",
        "åsa@example.com",
    ];
    if both_kept {
        expected.insert(3, "Åsa@example.com");
    }
    assert_eq!(emails, expected);
    let zoe = reopened.user_by_email("ZOË@example.com").await.unwrap();
    assert_eq!(zoe.unwrap().email, "zoë@example.com");
    let asa = reopened.user_by_email("ÅSA@example.com").await.unwrap();
    assert_eq!(asa.unwrap().email, "åsa@example.com");
}

/// Inserts a member with `email` as typed, as versions before folding did.
async fn insert_user_as_typed(db: &TestDb, email: &str) -> Result<(), sqlx::Error> {
    let sql = "INSERT INTO users (workspace_id, email, password_hash, role, created_at) \
               VALUES (1, $1, 'hash', 'member', '2026-11-01T00:00:00Z')";
    if db.url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
        let done = sqlx::query(sql).bind(email).execute(&pool).await;
        pool.close().await;
        done.map(drop)
    } else {
        let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
        let done = sqlx::query(sql).bind(email).execute(&pool).await;
        pool.close().await;
        done.map(drop)
    }
}

on_both_backends!(
    the_ledger_is_listed_newest_first,
    holds_in_flight_are_listed,
    a_new_password_ends_every_session,
    an_email_is_one_user_whatever_its_case,
    a_new_name_or_catalog_is_audited,
    emails_stored_before_folding_are_folded_at_start,
    one_bad_settlement_among_many_fails_alone,
    absurd_usage_never_breaks_the_books,
    fifty_racing_requests_admit_exactly_ten,
    writes_without_a_version_all_land,
    stale_settings_saves_racing_lose,
    two_replicas_admit_exactly_ten,
    random_operations_keep_ledger_equal_to_counters,
    retried_batches_count_once,
    a_retry_naming_a_model_now_an_alias_is_a_duplicate,
    recorded_usage_cannot_pass_the_plan,
    stale_writes_conflict_and_change_nothing,
    invalid_changes_are_typed_errors,
    a_new_limit_applies_to_the_next_request,
    a_limit_set_elsewhere_applies_to_the_next_request,
    a_reservation_ended_elsewhere_is_settled_once,
    a_late_settlement_bills_a_lapsed_hold,
    a_revoked_key_admits_nothing,
    a_disabled_user_signs_in_no_more_and_spends_nothing,
    a_new_cycle_starts_from_zero,
    a_changed_plan_start_keeps_the_spend_of_the_cycle,
    a_start_moved_by_whole_months_keeps_the_books,
    a_recut_counts_a_request_in_the_cycle_of_its_admission,
    expired_leases_are_released,
    api_keys_authenticate_and_record_use_to_the_minute,
);

/// PostgreSQL: the holds that every request inserts and deletes leave dead rows
/// behind, which the store's own vacuum removes within seconds, whether or not
/// the server's autovacuum runs (it is off on the test server), so that
/// settlements do not look their hold up through them (`db::postgres`,
/// `VACUUM_EVERY`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_holds_ended_leave_no_dead_rows_behind() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let setup = setup(100 * EUR, 0);
    let store = db.store(&setup).await;
    for _ in 0..200 {
        let hold = admitted(reserve(&store, &setup.catalog, "mid", estimate(10), now()).await);
        store
            .settle(settlement(&hold.id, Some(usage(5, 5))))
            .await
            .unwrap();
    }
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    // (vacuums run by hand or by the store, dead rows) of the reservations table.
    let stats = || {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT vacuum_count, n_dead_tup FROM pg_stat_user_tables WHERE relname = 'reservations'",
        )
        .fetch_one(&pool)
    };
    // A vacuum that starts from here on finds every hold above ended.
    let (vacuums_before, _) = stats().await.unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut seen = stats().await.unwrap();
    while (seen.0 <= vacuums_before || seen.1 > 0) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        seen = stats().await.unwrap();
    }
    assert!(
        seen.0 > vacuums_before,
        "the reservations table was not vacuumed within 10 s"
    );
    assert_eq!(seen.1, 0, "dead rows left in the reservations table");
    let snapshot = store.spend_snapshot(now()).await.unwrap();
    assert_eq!(snapshot.workspace.reserved, Nanos::ZERO);
    pool.close().await;
}

/// PostgreSQL: a role that may not make temporary objects in its database (its
/// `TEMPORARY` privilege revoked) cannot make the function that opens a batch in
/// one round trip (`db::postgres`); the gateway's batches then ask step by step,
/// and admit and settle as ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_role_refused_temporary_objects_admits_and_settles() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let setup = setup(100 * EUR, 0);
    // The schema, made by the owner.
    drop(db.store(&setup).await);
    let admin = sqlx::PgPool::connect(&db.url).await.unwrap();
    let (db, url) = WithRole::not_owning(db, &admin, Temporary::Refused).await;
    let role = db.role.clone();
    let db = db.db.as_ref().unwrap();
    let database = url::Url::parse(&db.url).unwrap().path()[1..].to_owned();
    let may_make_temporary: bool =
        sqlx::query_scalar("SELECT has_database_privilege($1, $2, 'TEMPORARY')")
            .bind(&role)
            .bind(&database)
            .fetch_one(&admin)
            .await
            .unwrap();
    assert!(!may_make_temporary);
    let store = db.reached_at(url).store(&setup).await;
    // 1,000 prompt tokens at 0.5 EUR and 500 output tokens at 2 EUR per million.
    let spent = Nanos::new(EUR / 2000 + EUR / 1000);
    for _ in 0..3 {
        let hold = admitted(reserve(&store, &setup.catalog, "mid", estimate(1000), now()).await);
        let record = store
            .settle(settlement(&hold.id, Some(usage(1000, 500))))
            .await
            .unwrap();
        assert_eq!(record.cost, spent);
    }
    let snapshot = store.spend_snapshot(now()).await.unwrap();
    assert_eq!(snapshot.workspace.spent, Nanos::new(3 * spent.get()));
    assert_eq!(snapshot.workspace.reserved, Nanos::ZERO);
    drop(store);
    admin.close().await;
}

/// PostgreSQL: the store's vacuum of its reservations table (`db::postgres`)
/// logs no line a second: not when another session holds the table's vacuum
/// lock (another replica's vacuum, autovacuum), and for a role that may not
/// vacuum the table one warning that it is left to autovacuum.
#[tokio::test]
async fn postgres_the_vacuum_of_holds_does_not_fill_the_log() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    // Current-thread runtime: every task of the store logs on this thread.
    let logs = common::Logs::default();
    let _logging = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
            .with_ansi(false)
            .with_writer({
                let logs = logs.clone();
                move || logs.clone()
            })
            .finish(),
    );
    let ticks = std::time::Duration::from_millis(3500);
    let setup = setup(100 * EUR, 0);
    let store = db.store(&setup).await;
    let admin = sqlx::PgPool::connect(&db.url).await.unwrap();
    let mut vacuuming = admin.begin().await.unwrap();
    sqlx::query("LOCK TABLE reservations IN SHARE UPDATE EXCLUSIVE MODE")
        .execute(&mut *vacuuming)
        .await
        .unwrap();
    tokio::time::sleep(ticks).await;
    vacuuming.rollback().await.unwrap();
    drop(store);
    assert_eq!(
        logs.text(),
        "",
        "while another session held the vacuum lock"
    );

    let (db, url) = WithRole::not_owning(db, &admin, Temporary::Allowed).await;
    // A store open for less than a vacuum's interval, as for a command of the
    // CLI, says nothing of the vacuum.
    let brief = db
        .db
        .as_ref()
        .unwrap()
        .reached_at(url.clone())
        .store(&setup)
        .await;
    brief
        .update_settings(&Actor::Cli, None, false, now())
        .await
        .unwrap();
    drop(brief);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(logs.text(), "", "from a store open for a moment");
    let store = db.db.as_ref().unwrap().reached_at(url).store(&setup).await;
    admitted(reserve(&store, &setup.catalog, "mid", estimate(10), now()).await);
    tokio::time::sleep(ticks).await;
    drop(store);
    let text = logs.text();
    assert_eq!(
        text.lines().count(),
        1,
        "as a role that owns nothing: {text}"
    );
    assert!(
        text.contains("may not vacuum the reservations table") && text.contains("autovacuum"),
        "{text}"
    );
    admin.close().await;
}

/// A test database and a role made for it, both dropped when this is, the
/// database first (the role holds privileges in it), pass or fail.
struct WithRole {
    db: Option<TestDb>,
    role: String,
}

/// Whether a role made by [`WithRole::not_owning`] may make temporary objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Temporary {
    Allowed,
    /// Its database's `TEMPORARY` privilege revoked from `PUBLIC`.
    Refused,
}

impl WithRole {
    /// A login role that may read and write `db`'s tables (made already, by
    /// the owner) but owns none of them, and the URL of `db` as that role.
    async fn not_owning(
        db: TestDb,
        admin: &sqlx::PgPool,
        temporary: Temporary,
    ) -> (WithRole, String) {
        let role = format!("tollgate_not_owner_{}", uuid::Uuid::new_v4().simple());
        let mut url = url::Url::parse(&db.url).unwrap();
        let database = url.path()[1..].to_owned();
        let db = WithRole {
            db: Some(db),
            role: role.clone(),
        };
        let mut grants = vec![
            format!("CREATE ROLE {role} LOGIN"),
            format!("GRANT CREATE ON DATABASE {database} TO {role}"),
            format!("GRANT USAGE, CREATE ON SCHEMA public, tower_sessions TO {role}"),
            format!(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public, \
                 tower_sessions TO {role}"
            ),
            format!(
                "GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public, tower_sessions TO {role}"
            ),
        ];
        if temporary == Temporary::Refused {
            grants.push(format!(
                "REVOKE TEMPORARY ON DATABASE {database} FROM PUBLIC"
            ));
        }
        for grant in grants {
            sqlx::query(&grant).execute(admin).await.unwrap();
        }
        url.set_username(&role).unwrap();
        (db, url.to_string())
    }
}

impl Drop for WithRole {
    fn drop(&mut self) {
        drop(self.db.take());
        if let Ok(admin_url) = std::env::var("TEST_DATABASE_URL") {
            common::run_as_admin(admin_url, format!("DROP ROLE IF EXISTS {}", self.role));
        }
    }
}

/// PostgreSQL: a database whose default isolation is REPEATABLE READ (or
/// SERIALIZABLE) changes nothing: the store's writes run at READ COMMITTED, so
/// two replicas racing for room for 10 admit exactly 10, none failing on a
/// serialization error (`db::postgres`, `BEGIN`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_stricter_default_isolation_changes_nothing() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let database = url::Url::parse(&db.url).unwrap().path()[1..].to_owned();
    let admin = sqlx::PgPool::connect(&db.url).await.unwrap();
    sqlx::query(&format!(
        "ALTER DATABASE {database} SET default_transaction_isolation = 'repeatable read'"
    ))
    .execute(&admin)
    .await
    .unwrap();
    admin.close().await;
    two_replicas_admit_exactly_ten(&db).await;
}

/// PostgreSQL: timeouts an operator may set on the database are answered as
/// what they are (DESIGN.md §6): a session ended by `idle_session_timeout`
/// (57P05) is a lost connection, replaced at the next write; a statement
/// cancelled by a `statement_timeout` shorter than the lock wait (57014), while
/// another session holds the plan row, is the database busy, not a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_timeouts_set_on_the_database_are_answered_as_such() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let database = url::Url::parse(&db.url).unwrap().path()[1..].to_owned();
    let admin = sqlx::PgPool::connect(&db.url).await.unwrap();
    for setting in ["idle_session_timeout = '1s'", "statement_timeout = '1s'"] {
        sqlx::query(&format!("ALTER DATABASE {database} SET {setting}"))
            .execute(&admin)
            .await
            .unwrap();
    }
    let setup = setup(100 * EUR, 0);
    let store = db.store(&setup).await;
    admitted(reserve(&store, &setup.catalog, "mid", estimate(10), now()).await);
    // The hot path's connection is ended while idle.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    admitted(reserve(&store, &setup.catalog, "mid", estimate(10), now()).await);
    let mut holder = admin.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM plans FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let blocked = try_reserve(&store, &setup.catalog, "mid", estimate(10), now()).await;
    assert!(matches!(blocked, Err(StoreError::Busy(_))), "{blocked:?}");
    holder.rollback().await.unwrap();
    admin.close().await;
}

/// PostgreSQL's test database (kept while the first value lives) with a store
/// on it that has admitted one request, so its hot path is connected, and a pool
/// of the administrator's own beside it; `None` when `TEST_DATABASE_URL` is unset.
async fn postgres_store_in_use() -> Option<(TestDb, WorkspaceSetup, SharedStore, sqlx::PgPool)> {
    let db = TestDb::postgres().await?;
    let setup = setup(100 * EUR, 0);
    let store = db.store(&setup).await;
    admitted(reserve(&store, &setup.catalog, "mid", estimate(10), now()).await);
    let admin = sqlx::PgPool::connect(&db.url).await.unwrap();
    Some((db, setup, store, admin))
}

/// PostgreSQL: a database emptied under a running store (dropped and made again,
/// say) has no tables: every call is answered `Unavailable` (503 to its caller,
/// as for a database out of reach), not as a fault of the store (500).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_database_emptied_under_the_store_is_unavailable() {
    let Some((_db, setup, store, admin)) = postgres_store_in_use().await else {
        return;
    };
    sqlx::query("DROP SCHEMA public CASCADE")
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query("CREATE SCHEMA public")
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let admission = try_reserve(&store, &setup.catalog, "mid", estimate(10), now()).await;
    assert!(
        matches!(admission, Err(StoreError::Unavailable(_))),
        "{admission:?}"
    );
    let snapshot = store.spend_snapshot(now()).await;
    assert!(
        matches!(snapshot, Err(StoreError::Unavailable(_))),
        "{snapshot:?}"
    );
    // A gateway request's key and a sign-in's user are looked up first.
    let key = store
        .authenticate_api_key("0".repeat(64).as_str(), now())
        .await;
    assert!(matches!(key, Err(StoreError::Unavailable(_))), "{key:?}");
    let user = store.user_by_email("ada@example.com").await;
    assert!(matches!(user, Err(StoreError::Unavailable(_))), "{user:?}");
}

/// PostgreSQL: a connection lost between an admission's `COMMIT` and its
/// answer. The admission is answered `Unavailable` (its caller gets 503 and
/// never uses the hold), though the database kept the hold; the next batch, on
/// a new connection, releases it, instead of its holding room until its lease
/// ends (DESIGN.md R7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_hold_committed_without_an_answer_is_released() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let setup = setup(100 * EUR, 0);
    let link = common::cut::Link::to_server_of(&db.url).await;
    let store = db.reached_at(link.url_through(&db.url)).store(&setup).await;
    let admin = sqlx::PgPool::connect(&db.url).await.unwrap();
    let holds = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM reservations")
            .fetch_one(&admin)
            .await
            .unwrap()
    };

    link.lose_answer_to_next_commit();
    let lost = try_reserve(&store, &setup.catalog, "mid", estimate(10), now()).await;
    assert!(matches!(lost, Err(StoreError::Unavailable(_))), "{lost:?}");
    assert_eq!(holds().await, 1, "the database kept the hold");

    let hold = admitted(reserve(&store, &setup.catalog, "mid", estimate(10), now()).await);
    assert_eq!(holds().await, 1, "only the new hold is left");
    let snapshot = store.spend_snapshot(now()).await.unwrap();
    assert_eq!(snapshot.workspace.reserved, hold.amount);
    store.release(&hold.id).await.unwrap();
    assert_eq!(holds().await, 0);
    let snapshot = store.spend_snapshot(now()).await.unwrap();
    assert_eq!(snapshot.workspace.reserved, Nanos::ZERO);
    admin.close().await;
}

/// Writers of other replicas queued on the plan row: the hot path's statement
/// waits for the lock in turns, each within `lock_timeout`, longer in all than
/// the hot path waits for an answer. It is answered busy, not taken for a lost
/// connection.
#[tokio::test]
async fn postgres_a_write_queued_behind_several_writers_is_answered_busy() {
    let Some((_db, setup, store, admin)) = postgres_store_in_use().await else {
        return;
    };
    let mut first = admin.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM plans FOR UPDATE")
        .execute(&mut *first)
        .await
        .unwrap();
    // The second writer queues behind the first, and holds the row once the
    // first is done.
    let second = tokio::spawn({
        let admin = admin.clone();
        async move {
            let mut second = admin.begin().await.unwrap();
            sqlx::query("SELECT 1 FROM plans FOR UPDATE")
                .execute(&mut *second)
                .await
                .unwrap();
            second
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let blocked = tokio::spawn({
        let store = store.clone();
        let catalog = setup.catalog.clone();
        async move { try_reserve(&store, &catalog, "mid", estimate(10), now()).await }
    });
    // The hot path's statement now waits behind the second writer; the first
    // lets go before the lock timeout, and the second holds on.
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    first.rollback().await.unwrap();
    let second = second.await.unwrap();
    let blocked = blocked.await.unwrap();
    assert!(
        matches!(blocked, Err(StoreError::Busy(_))),
        "{blocked:?} after {:?}",
        started.elapsed()
    );
    second.rollback().await.unwrap();
    admitted(reserve(&store, &setup.catalog, "mid", estimate(10), now()).await);
    admin.close().await;
}
