//! Money in euros: exact decimal amounts, the nano-euro integers that storage and
//! counters use, and the one place that turns an amount into text for a person.
//!
//! DESIGN.md R2: no binary floating point ever touches an amount. `Money` is an exact
//! `Decimal`; `Nanos` is an integer count of 10⁻⁹ EUR. Conversions between the two
//! name their rounding, because the direction matters: settled costs round half away
//! from zero (so the ledger equals the counters), reservations round up (so they never
//! undercount).

use std::fmt;
use std::iter::Sum;
use std::ops::{Add, Neg, Sub};

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Nano-euros per euro: the storage unit is 10⁻⁹ EUR (DESIGN.md R2).
const NANOS_PER_EUR_SCALE: u32 = 9;

/// Errors of money arithmetic and conversions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// The amount does not fit in an `i64` of nano-euros (about ±9.2 billion EUR).
    #[error("the amount does not fit in the nano-euro range (about ±9.2 billion EUR)")]
    Overflow,
    /// A price per million tokens was negative; prices are never negative.
    #[error("a price cannot be negative (got {0} EUR per 1M tokens)")]
    NegativePrice(Decimal),
}

impl MoneyError {
    /// Stable snake_case code that callers match on instead of the message.
    pub fn code(&self) -> &'static str {
        match self {
            MoneyError::Overflow => "money_overflow",
            MoneyError::NegativePrice(_) => "negative_price",
        }
    }
}

/// An exact amount of euros (EUR), possibly negative.
///
/// Wraps a `Decimal` (28 significant digits). Arithmetic saturates at the `Decimal`
/// bounds (about ±7.9 × 10²⁸ EUR) instead of panicking; no amount reachable from the
/// nano-euro counters comes near them. `Display` and serde use the plain normalised
/// decimal (`12.5`, `0.000001`, `500`), never exponent notation and never a float; for
/// a person use [`format_eur`]. DESIGN.md R2.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(Decimal);

impl Money {
    /// Zero euros.
    pub const ZERO: Money = Money(Decimal::ZERO);

    /// An amount of `amount` EUR, kept exactly.
    pub fn new(amount: Decimal) -> Money {
        Money(amount)
    }

    /// The amount in EUR.
    pub fn amount(self) -> Decimal {
        self.0
    }

    /// The amount in whole nano-euros, rounded half away from zero.
    ///
    /// This is the one rounding a settled cost goes through before it is stored
    /// (DESIGN.md R2). Errors with [`MoneyError::Overflow`] past `i64` nano-euros.
    pub fn to_nanos_rounded(self) -> Result<Nanos, MoneyError> {
        to_nanos(self.0, RoundingStrategy::MidpointAwayFromZero)
    }

    /// The amount in whole nano-euros, rounded toward +infinity.
    ///
    /// Used for reservations, which must never undercount (DESIGN.md R7). Errors with
    /// [`MoneyError::Overflow`] past `i64` nano-euros.
    pub fn to_nanos_ceil(self) -> Result<Nanos, MoneyError> {
        to_nanos(self.0, RoundingStrategy::ToPositiveInfinity)
    }

    /// The amount rounded to cents (EUR, 2 decimals), half away from zero.
    ///
    /// Display only: DESIGN.md R2 rounds to cents at the edge, never in storage.
    pub fn round_to_cents(self) -> Money {
        Money(
            self.0
                .round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero),
        )
    }

    /// Adds two amounts, `None` past the `Decimal` range.
    pub fn checked_add(self, other: Money) -> Option<Money> {
        self.0.checked_add(other.0).map(Money)
    }
}

fn to_nanos(amount: Decimal, strategy: RoundingStrategy) -> Result<Nanos, MoneyError> {
    // Round at 9 decimals first, then read the integer mantissa: multiplying the
    // Decimal by 10⁹ could overflow its 96 bits where the i128 below cannot
    // (2⁹⁶ × 10⁹ < 2¹²⁷).
    let rounded = amount.round_dp_with_strategy(NANOS_PER_EUR_SCALE, strategy);
    let missing_scale = NANOS_PER_EUR_SCALE.saturating_sub(rounded.scale());
    let nanos = rounded
        .mantissa()
        .checked_mul(pow10(missing_scale))
        .ok_or(MoneyError::Overflow)?;
    i64::try_from(nanos)
        .map(Nanos)
        .map_err(|_| MoneyError::Overflow)
}

/// 10^exp as an i128; callers pass at most 28 (the largest `Decimal` scale), well
/// inside i128's 38 digits.
pub(super) fn pow10(exp: u32) -> i128 {
    10_i128.saturating_pow(exp)
}

impl Add for Money {
    type Output = Money;
    fn add(self, rhs: Money) -> Money {
        Money(self.0.saturating_add(rhs.0))
    }
}

impl Sub for Money {
    type Output = Money;
    fn sub(self, rhs: Money) -> Money {
        Money(self.0.saturating_sub(rhs.0))
    }
}

impl Neg for Money {
    type Output = Money;
    fn neg(self) -> Money {
        Money(-self.0)
    }
}

impl Sum for Money {
    fn sum<I: Iterator<Item = Money>>(iter: I) -> Money {
        iter.fold(Money::ZERO, Add::add)
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.normalize(), f)
    }
}

impl Serialize for Money {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Normalised so that JSON shows "0.25", not "0.250000000".
        Serialize::serialize(&self.0.normalize(), serializer)
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Money, D::Error> {
        <Decimal as Deserialize>::deserialize(deserializer).map(Money)
    }
}

/// An amount in nano-euros (10⁻⁹ EUR) as an `i64`: the unit of every stored amount,
/// counter, limit and reservation (DESIGN.md R2).
///
/// Range about ±9.2 billion EUR. `+`, `-` and `Sum` saturate at the `i64` bounds
/// rather than wrap or panic: a saturated total compares as "over every limit", which
/// is the safe side for admission; [`Nanos::checked_add`] is there where a ledger
/// total must be exact or fail. Serialised as a JSON integer.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Nanos(i64);

impl Nanos {
    /// Zero nano-euros.
    pub const ZERO: Nanos = Nanos(0);
    /// The largest representable amount (about 9.2 billion EUR).
    pub const MAX: Nanos = Nanos(i64::MAX);

    /// `nanos` × 10⁻⁹ EUR.
    pub const fn new(nanos: i64) -> Nanos {
        Nanos(nanos)
    }

    /// The raw count of nano-euros.
    pub const fn get(self) -> i64 {
        self.0
    }

    /// The exact amount in EUR (no rounding: 9 decimals always fit a `Decimal`).
    pub fn to_money(self) -> Money {
        Money(Decimal::from_i128_with_scale(
            i128::from(self.0),
            NANOS_PER_EUR_SCALE,
        ))
    }

    /// Exact sum, `None` past the `i64` range.
    pub fn checked_add(self, other: Nanos) -> Option<Nanos> {
        self.0.checked_add(other.0).map(Nanos)
    }

    /// Exact difference, `None` past the `i64` range.
    pub fn checked_sub(self, other: Nanos) -> Option<Nanos> {
        self.0.checked_sub(other.0).map(Nanos)
    }

    /// True for amounts below zero.
    pub const fn is_negative(self) -> bool {
        self.0 < 0
    }
}

impl Add for Nanos {
    type Output = Nanos;
    fn add(self, rhs: Nanos) -> Nanos {
        Nanos(self.0.saturating_add(rhs.0))
    }
}

impl Sub for Nanos {
    type Output = Nanos;
    fn sub(self, rhs: Nanos) -> Nanos {
        Nanos(self.0.saturating_sub(rhs.0))
    }
}

impl Sum for Nanos {
    fn sum<I: Iterator<Item = Nanos>>(iter: I) -> Nanos {
        iter.fold(Nanos::ZERO, Add::add)
    }
}

impl<'a> Sum<&'a Nanos> for Nanos {
    fn sum<I: Iterator<Item = &'a Nanos>>(iter: I) -> Nanos {
        iter.copied().sum()
    }
}

/// A price in EUR per 1,000,000 tokens; never negative (DESIGN.md vocabulary "price").
///
/// Kept normalised (no trailing zeros) so that the integer reservation arithmetic of
/// DESIGN.md R7 works on the smallest mantissa. Serialised as a decimal string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "Decimal", into = "Decimal")]
pub struct PricePerMTok(Decimal);

impl PricePerMTok {
    /// Free: 0 EUR per 1M tokens.
    pub const ZERO: PricePerMTok = PricePerMTok(Decimal::ZERO);

    /// `eur` EUR per 1M tokens. Errors with [`MoneyError::NegativePrice`] below zero.
    pub fn new(eur: Decimal) -> Result<PricePerMTok, MoneyError> {
        if eur.is_sign_negative() && !eur.is_zero() {
            return Err(MoneyError::NegativePrice(eur));
        }
        // `normalize` also turns a "-0" into a plain zero.
        Ok(PricePerMTok(eur.normalize()))
    }

    /// The price in EUR per 1M tokens.
    pub fn eur_per_mtok(self) -> Decimal {
        self.0
    }
}

impl TryFrom<Decimal> for PricePerMTok {
    type Error = MoneyError;
    fn try_from(eur: Decimal) -> Result<PricePerMTok, MoneyError> {
        PricePerMTok::new(eur)
    }
}

impl From<PricePerMTok> for Decimal {
    fn from(price: PricePerMTok) -> Decimal {
        price.0
    }
}

impl fmt::Display for PricePerMTok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// `money` as a person reads it in English: euro sign, cents rounded half away from
/// zero, thousands grouped with commas: `€1,234.56`, `€0.00`, `-€1.00`.
///
/// DESIGN.md R2 (cents only at the edge) and §3 (the tab's money format). The output
/// parses back to the same cents with `parse_eur_input` (positive amounts).
pub fn format_eur(money: Money) -> String {
    let mut cents = money.round_to_cents().0;
    // A tiny negative amount rounds to zero cents, which reads as "€0.00", not "-€0.00".
    let negative = cents.is_sign_negative() && !cents.is_zero();
    cents.set_sign_positive(true);
    cents.rescale(2);
    let total_cents = cents.mantissa();
    let rest = total_cents % 100;
    grouped(
        negative,
        &(total_cents / 100).to_string(),
        &format!("{rest:02}"),
    )
}

/// `money` exactly, for a sentence that compares amounts: grouped like
/// [`format_eur`], with every decimal it has and at least two: `€587.745`,
/// `€0.004200001`, `€600.00`. Rounded to cents, such amounts could read as
/// "€0.00, more than the €0.00 reserved" (DESIGN.md R2: exact amounts).
pub fn format_eur_exact(money: Money) -> String {
    let amount = money.0.normalize();
    let negative = amount.is_sign_negative() && !amount.is_zero();
    let text = amount.abs().to_string();
    let (euros, fraction) = text.split_once('.').unwrap_or((&text, ""));
    grouped(negative, euros, &format!("{fraction:0<2}"))
}

/// `-€1,234.` + `fraction`: the euro sign, the euros grouped by thousands.
fn grouped(negative: bool, euros: &str, fraction: &str) -> String {
    let mut out = String::with_capacity(euros.len() + euros.len() / 3 + fraction.len() + 4);
    if negative {
        out.push('-');
    }
    out.push('€');
    let lead = euros.len() % 3;
    for (i, digit) in euros.chars().enumerate() {
        if i != 0 && i % 3 == lead {
            out.push(',');
        }
        out.push(digit);
    }
    out.push('.');
    out.push_str(fraction);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rust_decimal_macros::dec;

    fn eur(d: Decimal) -> Money {
        Money::new(d)
    }

    #[test]
    fn nanos_round_trip_exactly() {
        let m = eur(dec!(12.345678901));
        let n = m.to_nanos_rounded().unwrap();
        assert_eq!(n, Nanos::new(12_345_678_901));
        assert_eq!(n.to_money(), m);
        assert_eq!(n.to_money().to_string(), "12.345678901");
    }

    #[test]
    fn settled_costs_round_half_away_from_zero() {
        assert_eq!(
            eur(dec!(0.0000000005)).to_nanos_rounded().unwrap(),
            Nanos::new(1)
        );
        assert_eq!(
            eur(dec!(0.0000000004999)).to_nanos_rounded().unwrap(),
            Nanos::new(0)
        );
        assert_eq!(
            eur(dec!(-0.0000000005)).to_nanos_rounded().unwrap(),
            Nanos::new(-1)
        );
        assert_eq!(
            eur(dec!(0.0000000025)).to_nanos_rounded().unwrap(),
            Nanos::new(3),
            "not banker's rounding"
        );
    }

    #[test]
    fn reservations_round_up() {
        assert_eq!(
            eur(dec!(0.0000000000001)).to_nanos_ceil().unwrap(),
            Nanos::new(1)
        );
        assert_eq!(
            eur(dec!(0.0000000004)).to_nanos_ceil().unwrap(),
            Nanos::new(1)
        );
        assert_eq!(
            eur(dec!(0.0000000004)).to_nanos_rounded().unwrap(),
            Nanos::new(0)
        );
        assert_eq!(
            eur(dec!(-0.0000000004)).to_nanos_ceil().unwrap(),
            Nanos::new(0)
        );
        assert_eq!(
            eur(dec!(2)).to_nanos_ceil().unwrap(),
            Nanos::new(2_000_000_000)
        );
    }

    #[test]
    fn overflow_is_an_error_not_a_panic() {
        assert_eq!(
            eur(dec!(10_000_000_000)).to_nanos_rounded(),
            Err(MoneyError::Overflow)
        );
        assert_eq!(eur(Decimal::MAX).to_nanos_ceil(), Err(MoneyError::Overflow));
        assert_eq!(
            eur(Decimal::MIN).to_nanos_rounded(),
            Err(MoneyError::Overflow)
        );
        assert!(eur(dec!(9_000_000_000)).to_nanos_rounded().is_ok());
        assert_eq!(Nanos::MAX.checked_add(Nanos::new(1)), None);
        assert_eq!(Nanos::MAX + Nanos::new(1), Nanos::MAX);
    }

    #[test]
    fn three_times_ten_cents_is_thirty_cents() {
        let ten = eur(dec!(0.10));
        assert_eq!([ten, ten, ten].into_iter().sum::<Money>(), eur(dec!(0.30)));
        let n = ten.to_nanos_rounded().unwrap();
        assert_eq!([n, n, n].iter().sum::<Nanos>().to_money(), eur(dec!(0.3)));
    }

    #[test]
    fn format_eur_exact_keeps_every_decimal() {
        assert_eq!(format_eur_exact(eur(dec!(587.745))), "€587.745");
        assert_eq!(format_eur_exact(eur(dec!(1234567.5))), "€1,234,567.50");
        assert_eq!(format_eur_exact(eur(dec!(0.004200001))), "€0.004200001");
        assert_eq!(format_eur_exact(eur(dec!(600.000))), "€600.00");
        assert_eq!(format_eur_exact(eur(dec!(-0.5))), "-€0.50");
        assert_eq!(format_eur_exact(Money::ZERO), "€0.00");
    }

    #[test]
    fn format_eur_in_english() {
        assert_eq!(format_eur(eur(dec!(1234.56))), "€1,234.56");
        assert_eq!(format_eur(Money::ZERO), "€0.00");
        assert_eq!(format_eur(eur(dec!(-1))), "-€1.00");
        assert_eq!(format_eur(eur(dec!(0.005))), "€0.01");
        assert_eq!(format_eur(eur(dec!(0.0049))), "€0.00");
        assert_eq!(format_eur(eur(dec!(-0.004))), "€0.00");
        assert_eq!(format_eur(eur(dec!(-0.005))), "-€0.01");
        assert_eq!(format_eur(eur(dec!(999.995))), "€1,000.00");
        assert_eq!(format_eur(eur(dec!(100))), "€100.00");
        assert_eq!(format_eur(eur(dec!(123456))), "€123,456.00");
        assert_eq!(format_eur(eur(dec!(1234567.891))), "€1,234,567.89");
        assert_eq!(format_eur(eur(dec!(12.5))), "€12.50");
        assert_eq!(format_eur(eur(dec!(0.07))), "€0.07");
    }

    #[test]
    fn display_is_plain_decimal() {
        assert_eq!(eur(dec!(500.00)).to_string(), "500");
        assert_eq!(eur(dec!(0.250)).to_string(), "0.25");
        assert_eq!(Nanos::new(1).to_money().to_string(), "0.000000001");
    }

    #[test]
    fn prices_are_never_negative() {
        assert_eq!(
            PricePerMTok::new(dec!(-0.01)),
            Err(MoneyError::NegativePrice(dec!(-0.01)))
        );
        assert_eq!(
            PricePerMTok::new(dec!(1.0800))
                .unwrap()
                .eur_per_mtok()
                .scale(),
            2
        );
        assert!(PricePerMTok::new(dec!(0)).is_ok());
        assert!(PricePerMTok::new(dec!(-0)).is_ok());
    }

    #[test]
    fn reads_decimal_strings() {
        use serde::de::{value::Error, IntoDeserializer};
        let money = Money::deserialize(IntoDeserializer::<Error>::into_deserializer("12.50"));
        assert_eq!(money, Ok(eur(dec!(12.5))));
        let price = PricePerMTok::deserialize(IntoDeserializer::<Error>::into_deserializer("-1"));
        assert!(
            price.is_err(),
            "a negative price is refused while reading the config"
        );
        let nanos = Nanos::deserialize(IntoDeserializer::<Error>::into_deserializer(7_i64));
        assert_eq!(nanos, Ok(Nanos::new(7)));
    }

    proptest! {
        #[test]
        fn nano_round_trip_is_exact(n in any::<i64>()) {
            let nanos = Nanos::new(n);
            prop_assert_eq!(nanos.to_money().to_nanos_rounded(), Ok(nanos));
            prop_assert_eq!(nanos.to_money().to_nanos_ceil(), Ok(nanos));
        }

        #[test]
        fn ceil_never_below_rounded(mantissa in any::<i64>(), scale in 9u32..=18) {
            let m = Money::new(Decimal::new(mantissa, scale));
            let ceil = m.to_nanos_ceil().unwrap();
            let rounded = m.to_nanos_rounded().unwrap();
            prop_assert!(ceil >= rounded);
            prop_assert!(ceil.to_money() >= m);
            prop_assert!(ceil.get() - rounded.get() <= 1);
        }
    }
}
