//! Admission over a 50-model catalog with a few active limits (DESIGN.md R6).
//! Run: `cargo bench -p app --bench admission`.
#![expect(
    clippy::unwrap_used,
    reason = "a bench with a broken fixture should stop at once"
)]

use std::collections::HashMap;
use std::hint::black_box;

use app::domain::{
    admit, Admission, Catalog, Counter, Model, ModelId, ModelLimit, ModelState, Nanos, PlanAmounts,
    PricePerMTok, Prices, Snapshot, TokenEstimate,
};
use chrono::{TimeZone, Utc};
use criterion::{criterion_group, criterion_main, Criterion};
use rust_decimal::Decimal;

const EUR: i64 = 1_000_000_000;

fn price(mantissa: i64, scale: u32) -> PricePerMTok {
    match PricePerMTok::new(Decimal::new(mantissa, scale)) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

/// Models m00 (dearest) to m49 (cheapest), each with an alias.
fn catalog() -> Catalog {
    let models = (0..50i64)
        .map(|i| Model {
            id: ModelId::new(format!("m{i:02}")),
            display_name: format!("Model {i}"),
            aliases: vec![format!("vendor/m{i:02}")],
            upstream: "openai".into(),
            upstream_model: format!("m{i:02}"),
            prices: Prices {
                input: price((50 - i) * 37, 2),
                cached_input: price((50 - i) * 37, 3),
                output: price((50 - i) * 211, 2),
            },
            max_output_tokens: 16_384 + (i as u32) * 1000,
        })
        .collect();
    match Catalog::new(models) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

fn limited(spent: i64, cap: i64) -> ModelState {
    ModelState {
        counter: Counter {
            spent: Nanos::new(spent),
            reserved: Nanos::new(0),
        },
        limit: ModelLimit {
            limit: Some(Nanos::new(cap)),
            enabled: true,
        },
    }
}

fn bench(c: &mut Criterion) {
    let catalog = catalog();
    // A few active limits: m10, m11 and m12 are full, m20 and m30 have room.
    let states: HashMap<ModelId, ModelState> = [
        ("m10", limited(50 * EUR, 50 * EUR)),
        ("m11", limited(20 * EUR, 20 * EUR)),
        ("m12", limited(10 * EUR, 10 * EUR)),
        ("m20", limited(EUR, 100 * EUR)),
        ("m30", limited(EUR, 100 * EUR)),
    ]
    .into_iter()
    .map(|(id, s)| (ModelId::from(id), s))
    .collect();
    let snapshot = Snapshot {
        plan: PlanAmounts {
            budget: Nanos::new(500 * EUR),
            overage: Nanos::new(100 * EUR),
        },
        automatic_fallback: true,
        workspace: Counter {
            spent: Nanos::new(120 * EUR),
            reserved: Nanos::new(EUR),
        },
        models: &states,
        resets_at: Utc.with_ymd_and_hms(2026, 12, 31, 23, 0, 0).unwrap(),
        timezone: chrono_tz::Tz::UTC,
    };
    let estimate = TokenEstimate {
        prompt_tokens: 4_000,
        output_cap: Some(1_000),
        n: 1,
    };

    let admitted = catalog.resolve("vendor/m20").unwrap();
    assert!(matches!(
        admit(&snapshot, &catalog, admitted, &estimate),
        Admission::Admit { .. }
    ));
    c.bench_function("admit path (capped model with room)", |b| {
        b.iter(|| {
            admit(
                black_box(&snapshot),
                &catalog,
                black_box(admitted),
                &estimate,
            )
        })
    });

    let uncapped = catalog.resolve("m05").unwrap();
    c.bench_function("admit path (no model limit)", |b| {
        b.iter(|| {
            admit(
                black_box(&snapshot),
                &catalog,
                black_box(uncapped),
                &estimate,
            )
        })
    });

    // m10 is full; m11 and m12 (the next cheaper) are full too: served by m13.
    let full = catalog.resolve("m10").unwrap();
    let decision = admit(&snapshot, &catalog, full, &estimate);
    assert_eq!(decision.served_model(), Some(&ModelId::from("m13")));
    c.bench_function("fallback path (3 full caps, 4th candidate)", |b| {
        b.iter(|| admit(black_box(&snapshot), &catalog, black_box(full), &estimate))
    });

    // Worst case: every model but the cheapest is capped and full, so the walk
    // prices and looks up all 49 cheaper models and serves on m49.
    let all_full: HashMap<ModelId, ModelState> = (0..49)
        .map(|i| (ModelId::new(format!("m{i:02}")), limited(EUR, EUR)))
        .collect();
    let worst = Snapshot {
        models: &all_full,
        ..snapshot
    };
    let dearest = catalog.resolve("m00").unwrap();
    let decision = admit(&worst, &catalog, dearest, &estimate);
    assert_eq!(decision.served_model(), Some(&ModelId::from("m49")));
    c.bench_function("fallback worst case (walks all 49 cheaper models)", |b| {
        b.iter(|| admit(black_box(&worst), &catalog, black_box(dearest), &estimate))
    });

    // Fallback off: the same request is blocked and the message is built.
    let off = Snapshot {
        automatic_fallback: false,
        ..snapshot
    };
    c.bench_function("block path (model limit, message built)", |b| {
        b.iter(|| admit(black_box(&off), &catalog, black_box(full), &estimate))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
