//! Spend by model and each model's share of the total (DESIGN.md R8).

use std::cmp::{Ordering, Reverse};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::catalog::ModelId;
use super::money::Nanos;

/// One row of "Spend by model (this cycle)" (DESIGN.md R8, §3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpend {
    /// The model.
    pub id: ModelId,
    /// Its display name.
    pub display_name: String,
    /// Its spend in the current cycle, nano-euros.
    pub spent: Nanos,
    /// Its share of the workspace's spend, in percent with exactly one decimal
    /// (`81.8`, `0.0`, `100.0`); serialised as a decimal string.
    pub share_percent: Decimal,
}

/// The order of two display names as a person reads a list: letters compared
/// without their case ("Gemini" before "GPT-5.4 Nano"), then, between names
/// that differ only in case, by their exact text, so the order is total. The
/// order of R8's ties (DESIGN.md R8) and of the Model limits rows.
pub fn by_display_name(a: &str, b: &str) -> Ordering {
    let folded = |name: &str| {
        name.chars()
            .flat_map(char::to_lowercase)
            .collect::<String>()
    };
    folded(a).cmp(&folded(b)).then_with(|| a.cmp(b))
}

/// Tenths of a percent in a whole.
const TENTHS: i128 = 1000;

/// The rows of "Spend by model" for per-model spend `(id, display name, spent
/// nano-euros)`, read from the per-cycle counters (DESIGN.md R8).
///
/// Sorted by spend, descending, ties by display name ([`by_display_name`], then
/// id, so the order is total).
/// Shares have one decimal and, when the total is positive, sum to exactly 100.0:
/// each share is floored to a tenth and the tenths left over go one each to the
/// largest remainders, equal remainders to the larger amount, then by display name.
/// Models with no spend stay in the list with 0.0 (the caller filters); with no spend
/// at all every share is 0.0. A negative amount (never produced by the counters)
/// counts as zero.
pub fn spend_by_model(
    spends: impl IntoIterator<Item = (ModelId, String, Nanos)>,
) -> Vec<ModelSpend> {
    let mut rows: Vec<(ModelSpend, i128)> = spends
        .into_iter()
        .map(|(id, display_name, spent)| {
            let row = ModelSpend {
                id,
                display_name,
                spent,
                share_percent: Decimal::ZERO,
            };
            (row, i128::from(spent.get().max(0)))
        })
        .collect();
    rows.sort_by(|(a, amount_a), (b, amount_b)| {
        amount_b
            .cmp(amount_a)
            .then_with(|| by_display_name(&a.display_name, &b.display_name))
            .then_with(|| a.id.cmp(&b.id))
    });

    let total: i128 = rows.iter().map(|(_, amount)| amount).sum();
    let mut tenths: Vec<i128> = vec![0; rows.len()];
    if total > 0 {
        let mut remainders: Vec<(i128, usize)> = Vec::with_capacity(rows.len());
        for (i, (_, amount)) in rows.iter().enumerate() {
            // i64 amounts × 1000 cannot overflow an i128.
            let scaled = amount * TENTHS;
            tenths[i] = scaled / total;
            remainders.push((scaled % total, i));
        }
        let handed_out: i128 = tenths.iter().sum();
        let left = usize::try_from(TENTHS - handed_out).unwrap_or(0);
        // Rows are already in (amount desc, display name) order, so among equal
        // remainders the smaller index is the larger amount, then the earlier name.
        remainders.sort_by_key(|&(remainder, i)| (Reverse(remainder), i));
        for &(_, i) in remainders.iter().take(left) {
            tenths[i] += 1;
        }
    }
    rows.into_iter()
        .zip(tenths)
        .map(|((mut row, _), t)| {
            row.share_percent = Decimal::from_i128_with_scale(t, 1);
            row
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rust_decimal_macros::dec;

    fn input(rows: &[(&str, &str, i64)]) -> Vec<(ModelId, String, Nanos)> {
        rows.iter()
            .map(|(id, name, n)| (ModelId::from(*id), (*name).to_owned(), Nanos::new(*n)))
            .collect()
    }

    fn shares(rows: &[ModelSpend]) -> Vec<String> {
        rows.iter().map(|r| r.share_percent.to_string()).collect()
    }

    fn names(rows: &[ModelSpend]) -> Vec<&str> {
        rows.iter().map(|r| r.display_name.as_str()).collect()
    }

    #[test]
    fn thirds_sum_to_exactly_one_hundred() {
        let rows = spend_by_model(input(&[("a", "A", 1), ("b", "B", 1), ("c", "C", 1)]));
        // 33.33… each: the one spare tenth goes to the first by display name.
        assert_eq!(shares(&rows), ["33.4", "33.3", "33.3"]);
        assert_eq!(names(&rows), ["A", "B", "C"]);
    }

    #[test]
    fn sorted_by_amount_then_display_name() {
        let rows = spend_by_model(input(&[
            ("z", "Zeta", 5),
            ("m", "Mu", 10),
            ("a", "Alpha", 5),
            ("none", "Nothing", 0),
        ]));
        assert_eq!(names(&rows), ["Mu", "Alpha", "Zeta", "Nothing"]);
        assert_eq!(shares(&rows), ["50.0", "25.0", "25.0", "0.0"]);
    }

    /// Ties are read by a person: case does not order them, so a lower-case
    /// letter does not sort after every capital.
    #[test]
    fn ties_are_ordered_by_display_name_whatever_its_case() {
        let rows = spend_by_model(input(&[
            ("gpt", "GPT-5.4 Nano", 0),
            ("gem", "Gemini", 0),
            ("mis", "mistral-small", 0),
            ("cla", "Claude", 0),
        ]));
        assert_eq!(
            names(&rows),
            ["Claude", "Gemini", "GPT-5.4 Nano", "mistral-small"]
        );
        assert_eq!(by_display_name("a", "A"), Ordering::Greater);
        assert_eq!(by_display_name("Éclair", "éclair"), Ordering::Less);
        assert_eq!(by_display_name("b", "b"), Ordering::Equal);
    }

    #[test]
    fn largest_remainder_wins_then_larger_amount() {
        // 2/3 = 66.666… (remainder .666), 1/3 = 33.333… (remainder .333).
        let rows = spend_by_model(input(&[("a", "A", 1), ("b", "B", 2)]));
        assert_eq!(shares(&rows), ["66.7", "33.3"]);
        let rows = spend_by_model(input(&[
            ("s", "Small", 1),
            ("b", "Big", 3),
            ("m", "Mid", 2),
        ]));
        // 1/6 = 16.66…, 3/6 = 50.0, 2/6 = 33.33…
        assert_eq!(names(&rows), ["Big", "Mid", "Small"]);
        assert_eq!(shares(&rows), ["50.0", "33.3", "16.7"]);
        // Two rows with the same remainder: 0.05 % each; the larger amount gets it.
        // Total 2000: 999 → 49.95 %, 1 → 0.05 %, 1000 → 50.0 %.
        let rows = spend_by_model(input(&[("x", "X", 999), ("y", "Y", 1), ("z", "Z", 1000)]));
        assert_eq!(names(&rows), ["Z", "X", "Y"]);
        assert_eq!(shares(&rows), ["50.0", "50.0", "0.0"]);
    }

    #[test]
    fn all_zero_gives_all_zero_and_one_model_gives_one_hundred() {
        let rows = spend_by_model(input(&[("a", "A", 0), ("b", "B", 0)]));
        assert_eq!(shares(&rows), ["0.0", "0.0"]);
        let rows = spend_by_model(input(&[("a", "A", 7)]));
        assert_eq!(shares(&rows), ["100.0"]);
        assert!(spend_by_model(Vec::new()).is_empty());
    }

    #[test]
    fn design_example_share() {
        // DESIGN.md §4: 10.1 of 12.345678901 EUR is 81.8 %.
        let rows = spend_by_model(input(&[
            ("gpt-5", "GPT-5", 10_100_000_000),
            ("mini", "GPT-5 Mini", 2_245_678_901),
        ]));
        assert_eq!(rows[0].share_percent, dec!(81.8));
        assert_eq!(rows[1].share_percent, dec!(18.2));
    }

    #[test]
    fn shares_sum_to_one_hundred_for_1_to_60_models() {
        for count in 1..=60i64 {
            let rows: Vec<_> = (0..count)
                .map(|i| {
                    // Awkward amounts: primes, nano-euro odds and a few zeros.
                    let n = if i % 11 == 5 {
                        0
                    } else {
                        (i * 7919 + 13) * 1_000_003 + i
                    };
                    (
                        ModelId::new(format!("m{i}")),
                        format!("Model {i}"),
                        Nanos::new(n),
                    )
                })
                .collect();
            let out = spend_by_model(rows);
            let sum: Decimal = out.iter().map(|r| r.share_percent).sum();
            assert_eq!(sum, dec!(100.0), "{count} models");
            assert!(out.iter().all(|r| r.share_percent.scale() == 1));
            assert!(out.windows(2).all(|w| w[0].spent >= w[1].spent));
        }
    }

    proptest! {
        #[test]
        fn shares_always_sum_to_one_hundred(
            amounts in proptest::collection::vec(0i64..4_000_000_000_000, 1..60),
        ) {
            let rows: Vec<_> = amounts
                .iter()
                .enumerate()
                .map(|(i, n)| (ModelId::new(format!("m{i}")), format!("M{}", i % 7), Nanos::new(*n)))
                .collect();
            let out = spend_by_model(rows);
            let sum: Decimal = out.iter().map(|r| r.share_percent).sum();
            if amounts.iter().any(|n| *n > 0) {
                prop_assert_eq!(sum, dec!(100.0));
            } else {
                prop_assert_eq!(sum, Decimal::ZERO);
            }
            let total: i128 = amounts.iter().map(|n| i128::from(*n)).sum();
            for r in &out {
                // Each share is its exact share rounded down or up by less than 0.1.
                let exact_tenths_floor = if total == 0 { 0 } else { i128::from(r.spent.get()) * 1000 / total };
                let got = r.share_percent.mantissa();
                prop_assert!(got == exact_tenths_floor || got == exact_tenths_floor + 1);
                if r.spent == Nanos::ZERO {
                    prop_assert_eq!(r.share_percent, Decimal::ZERO);
                }
            }
        }
    }
}
