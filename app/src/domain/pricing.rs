//! Pricing one request from its token usage (DESIGN.md R3).

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::catalog::Prices;
use super::money::Money;

/// Tokens one request used, as the upstream reports them (OpenAI `usage` shape).
///
/// `cached_tokens` are part of `prompt_tokens`; `reasoning_tokens` are part of
/// `completion_tokens` and billed once, as output (DESIGN.md R3).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Usage {
    /// All prompt tokens, cached ones included.
    pub prompt_tokens: u64,
    /// Prompt tokens served from the provider's cache (≤ `prompt_tokens`).
    pub cached_tokens: u64,
    /// All completion tokens, reasoning included.
    pub completion_tokens: u64,
    /// Completion tokens spent on reasoning (≤ `completion_tokens`); informational.
    pub reasoning_tokens: u64,
}

/// A usage report that contradicts itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsageError {
    /// More cached tokens than prompt tokens.
    #[error("cached tokens ({cached}) exceed prompt tokens ({prompt})")]
    CachedExceedsPrompt {
        /// Reported cached tokens.
        cached: u64,
        /// Reported prompt tokens.
        prompt: u64,
    },
    /// More reasoning tokens than completion tokens.
    #[error("reasoning tokens ({reasoning}) exceed completion tokens ({completion})")]
    ReasoningExceedsCompletion {
        /// Reported reasoning tokens.
        reasoning: u64,
        /// Reported completion tokens.
        completion: u64,
    },
}

impl UsageError {
    /// Stable snake_case code that callers match on instead of the message.
    pub fn code(&self) -> &'static str {
        match self {
            UsageError::CachedExceedsPrompt { .. } => "cached_exceeds_prompt",
            UsageError::ReasoningExceedsCompletion { .. } => "reasoning_exceeds_completion",
        }
    }
}

impl Usage {
    /// Checks that the subsets are inside their totals: cached ≤ prompt and
    /// reasoning ≤ completion. Errors with the first [`UsageError`] found.
    pub fn validate(&self) -> Result<(), UsageError> {
        if self.cached_tokens > self.prompt_tokens {
            return Err(UsageError::CachedExceedsPrompt {
                cached: self.cached_tokens,
                prompt: self.prompt_tokens,
            });
        }
        if self.reasoning_tokens > self.completion_tokens {
            return Err(UsageError::ReasoningExceedsCompletion {
                reasoning: self.reasoning_tokens,
                completion: self.completion_tokens,
            });
        }
        Ok(())
    }
}

/// Why a request could not be priced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    /// The usage report contradicts itself.
    #[error(transparent)]
    InvalidUsage(#[from] UsageError),
    /// The cost does not fit a `Decimal` (beyond any real bill).
    #[error("the cost of this usage overflows")]
    Overflow,
}

impl PricingError {
    /// Stable snake_case code that callers match on instead of the message.
    pub fn code(&self) -> &'static str {
        match self {
            PricingError::InvalidUsage(e) => e.code(),
            PricingError::Overflow => "cost_overflow",
        }
    }
}

/// The exact cost in EUR of `usage` at `prices` (DESIGN.md R3):
/// `(prompt − cached) × input + cached × cached_input + completion × output`, prices
/// per 1M tokens. Reasoning tokens are inside `completion_tokens` and are not added
/// again.
///
/// Exact (no rounding) for any real price and token count; the caller rounds once to
/// nano-euros with [`Money::to_nanos_rounded`] when it stores the event (R2). Errors on
/// invalid usage or on overflow past the `Decimal` range.
pub fn cost(prices: &Prices, usage: &Usage) -> Result<Money, PricingError> {
    usage.validate()?;
    let uncached = usage.prompt_tokens - usage.cached_tokens;
    let term = |tokens: u64, price: Decimal| Decimal::from(tokens).checked_mul(price);
    let total = term(uncached, prices.input.eur_per_mtok())
        .zip(term(
            usage.cached_tokens,
            prices.cached_input.eur_per_mtok(),
        ))
        .and_then(|(a, b)| a.checked_add(b))
        .zip(term(usage.completion_tokens, prices.output.eur_per_mtok()))
        .and_then(|(ab, c)| ab.checked_add(c))
        .and_then(|sum| sum.checked_div(Decimal::from(1_000_000u32)))
        .ok_or(PricingError::Overflow)?;
    Ok(Money::new(total))
}

#[cfg(test)]
mod tests {
    use super::super::money::{Nanos, PricePerMTok};
    use super::*;
    use rust_decimal_macros::dec;

    fn prices(input: Decimal, cached: Decimal, output: Decimal) -> Prices {
        Prices {
            input: PricePerMTok::new(input).unwrap(),
            cached_input: PricePerMTok::new(cached).unwrap(),
            output: PricePerMTok::new(output).unwrap(),
        }
    }

    #[test]
    fn cached_and_reasoning_tokens_are_billed_once_at_their_prices() {
        // GPT-5-like prices from the design's example config.
        let p = prices(dec!(1.08), dec!(0.108), dec!(8.60));
        let usage = Usage {
            prompt_tokens: 10_000,
            cached_tokens: 4_000,
            completion_tokens: 2_000,
            reasoning_tokens: 1_500,
        };
        // 6000 × 1.08 + 4000 × 0.108 + 2000 × 8.60 = 6480 + 432 + 17200 = 24112 per 1M.
        assert_eq!(cost(&p, &usage).unwrap(), Money::new(dec!(0.024112)));
        let no_reasoning = Usage {
            reasoning_tokens: 0,
            ..usage
        };
        assert_eq!(cost(&p, &no_reasoning), cost(&p, &usage));
    }

    #[test]
    fn three_requests_of_ten_cents_sum_to_thirty_cents_exactly() {
        // 100,000 output tokens at 1 EUR per 1M = 0.10 EUR.
        let p = prices(dec!(0), dec!(0), dec!(1));
        let usage = Usage {
            completion_tokens: 100_000,
            ..Usage::default()
        };
        let one = cost(&p, &usage).unwrap();
        assert_eq!(one, Money::new(dec!(0.10)));
        let total: Money = [one, one, one].into_iter().sum();
        assert_eq!(total, Money::new(dec!(0.30)));
        let stored: Nanos = (0..3).map(|_| one.to_nanos_rounded().unwrap()).sum();
        assert_eq!(stored, Nanos::new(300_000_000));
    }

    #[test]
    fn tiny_costs_stay_exact_until_stored() {
        let p = prices(dec!(0.15), dec!(0.075), dec!(0.60));
        let usage = Usage {
            prompt_tokens: 7,
            cached_tokens: 3,
            completion_tokens: 1,
            reasoning_tokens: 0,
        };
        // 4 × 0.15 + 3 × 0.075 + 0.60 = 1.425 per 1M = 0.000001425 EUR.
        let c = cost(&p, &usage).unwrap();
        assert_eq!(c, Money::new(dec!(0.000001425)));
        assert_eq!(c.to_nanos_rounded().unwrap(), Nanos::new(1425));
    }

    #[test]
    fn contradictory_usage_is_rejected() {
        let p = prices(dec!(1), dec!(1), dec!(1));
        let bad_cache = Usage {
            prompt_tokens: 1,
            cached_tokens: 2,
            ..Usage::default()
        };
        assert_eq!(
            cost(&p, &bad_cache),
            Err(PricingError::InvalidUsage(
                UsageError::CachedExceedsPrompt {
                    cached: 2,
                    prompt: 1
                }
            ))
        );
        let bad_reasoning = Usage {
            completion_tokens: 1,
            reasoning_tokens: 2,
            ..Usage::default()
        };
        assert_eq!(
            bad_reasoning.validate().map_err(|e| e.code()),
            Err("reasoning_exceeds_completion")
        );
    }

    #[test]
    fn huge_usage_overflows_with_an_error() {
        let p = prices(Decimal::MAX, dec!(0), Decimal::MAX);
        let usage = Usage {
            prompt_tokens: u64::MAX,
            completion_tokens: u64::MAX,
            ..Usage::default()
        };
        assert_eq!(cost(&p, &usage), Err(PricingError::Overflow));
    }
}
