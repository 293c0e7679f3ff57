//! Reservations: the cost held for a request before it runs (DESIGN.md R7).

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::catalog::{Model, Prices};
use super::money::{Nanos, PricePerMTok};

/// What a request may consume, known before it is sent upstream (DESIGN.md R7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TokenEstimate {
    /// An upper bound on prompt tokens: the model's tokenizer count where one is kept,
    /// else [`prompt_token_bound_from_bytes`].
    pub prompt_tokens: u64,
    /// The request's output cap per choice: `max_completion_tokens`, else `max_tokens`
    /// (the larger when a request sets both: both are forwarded);
    /// `None` when it sets neither (the model's `max_output_tokens` applies).
    pub output_cap: Option<u64>,
    /// Number of choices (`n`); 0 is read as 1, the API's default.
    pub n: u32,
}

/// Why no reservation could be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EstimateError {
    /// The reservation exceeds the nano-euro range (about 9.2 billion EUR).
    #[error("the reservation for this request is too large to represent")]
    Overflow,
}

impl EstimateError {
    /// Stable snake_case code that callers match on instead of the message.
    pub fn code(&self) -> &'static str {
        match self {
            EstimateError::Overflow => "reservation_overflow",
        }
    }
}

/// Tokens added to the byte bound for what the chat template adds around the
/// conversation (reply priming, a few special tokens), when the per-message framing
/// is not already covered by counting JSON bytes.
const TEMPLATE_MARGIN_TOKENS: u64 = 16;

/// An upper bound on the prompt tokens of `text_bytes` bytes of UTF-8 (DESIGN.md R7,
/// for models without a well-kept tokenizer).
///
/// Why bytes bound tokens: byte-level BPE tokenizers (GPT, Llama 3, Mistral,
/// Qwen, ...) have every single byte in their vocabulary and each token covers at
/// least one byte of input, so a text never has more tokens than UTF-8 bytes;
/// SentencePiece models with byte fallback obey the same bound. Pass the byte
/// length of the request's serialised `messages` (and `tools`): the JSON framing of
/// each message (`{"role":"user","content":""}`, 28 bytes or more) outweighs the few
/// special tokens a chat template puts around it, and a fixed margin covers reply
/// priming. Images and audio are not text and must be counted by the caller.
pub fn prompt_token_bound_from_bytes(text_bytes: usize) -> u64 {
    u64::try_from(text_bytes)
        .unwrap_or(u64::MAX)
        .saturating_add(TEMPLATE_MARGIN_TOKENS)
}

/// The reservation for `estimate` on `model`, in nano-euros, rounded up (DESIGN.md R7).
///
/// `prompt_tokens × input price + output tokens × n × output price`, prices per 1M
/// tokens, where output tokens are the request's cap as it set it, or the model's
/// `max_output_tokens` when it set none (R7). A cap above the catalog's maximum is
/// reserved as asked (the gateway and the usage API refuse one before admission,
/// but this function holds for any estimate): an upstream that honoured it would
/// otherwise bill more than was held. Prompt tokens are priced at the higher of the input and
/// cached-input prices, so the reservation holds even for a catalog whose cached
/// price is the higher one. Computed in exact integer arithmetic and rounded up to
/// whole nano-euros: it never undercounts the cost of any usage within the estimate.
/// Errors with [`EstimateError::Overflow`] past `i64` nano-euros.
pub fn reservation(model: &Model, estimate: &TokenEstimate) -> Result<Nanos, EstimateError> {
    let max_out = u64::from(model.max_output_tokens);
    let per_choice = estimate.output_cap.unwrap_or(max_out);
    let choices = u64::from(estimate.n.max(1));
    let output_tokens = u128::from(per_choice) * u128::from(choices);
    reservation_for(&model.prices, estimate.prompt_tokens, output_tokens)
}

fn reservation_for(
    prices: &Prices,
    prompt_tokens: u64,
    output_tokens: u128,
) -> Result<Nanos, EstimateError> {
    let [input, cached_input, output] =
        [prices.input, prices.cached_input, prices.output].map(PricePerMTok::eur_per_mtok);
    let scale = input
        .scale()
        .max(cached_input.scale())
        .max(output.scale())
        .max(NANOS_PER_MTOK_EUR_DIGITS);
    let per_prompt_token =
        scaled_mantissa(input, scale)?.max(scaled_mantissa(cached_input, scale)?);
    let per_output_token = scaled_mantissa(output, scale)?;
    let numerator = u128::from(prompt_tokens)
        .checked_mul(per_prompt_token)
        .zip(output_tokens.checked_mul(per_output_token))
        .and_then(|(prompt, output)| prompt.checked_add(output))
        .ok_or(EstimateError::Overflow)?;
    let divisor = pow10(scale - NANOS_PER_MTOK_EUR_DIGITS)?;
    // Prices with at most three decimals (the usual case) need no division at all.
    let nanos = if divisor == 1 {
        numerator
    } else {
        numerator.div_ceil(divisor)
    };
    i64::try_from(nanos)
        .map(Nanos::new)
        .map_err(|_| EstimateError::Overflow)
}

/// EUR per 1M tokens to nano-euros per token is a factor of 10⁹ / 10⁶ = 10³.
const NANOS_PER_MTOK_EUR_DIGITS: u32 = 3;

/// A price `mantissa / 10^s` EUR per 1M tokens as an integer numerator over the
/// common scale `S ≥ 3`: `mantissa × 10^(S − s)`.
///
/// The reservation is then `Σ tokens × numerator / 10^(S − 3)` nano-euros, one exact
/// integer division rounded up. Integers instead of `Decimal` because admission
/// prices many fallback candidates per request, and a ceiling must not depend on how
/// a decimal library rounds an intermediate result. Prices are never negative.
fn scaled_mantissa(price: Decimal, scale: u32) -> Result<u128, EstimateError> {
    u128::try_from(price.mantissa())
        .ok()
        .zip(pow10(scale - price.scale()).ok())
        .and_then(|(mantissa, factor)| mantissa.checked_mul(factor))
        .ok_or(EstimateError::Overflow)
}

fn pow10(exp: u32) -> Result<u128, EstimateError> {
    10_u128.checked_pow(exp).ok_or(EstimateError::Overflow)
}

#[cfg(test)]
mod tests {
    use super::super::catalog::ModelId;
    use super::super::money::Money;
    use super::super::pricing::{cost, Usage};
    use super::*;
    use proptest::prelude::*;
    use rust_decimal_macros::dec;

    fn model(input: Decimal, cached: Decimal, output: Decimal, max_out: u32) -> Model {
        Model {
            id: ModelId::new("m"),
            display_name: "M".into(),
            aliases: vec![],
            upstream: "u".into(),
            upstream_model: "m".into(),
            prices: Prices {
                input: PricePerMTok::new(input).unwrap(),
                cached_input: PricePerMTok::new(cached).unwrap(),
                output: PricePerMTok::new(output).unwrap(),
            },
            max_output_tokens: max_out,
        }
    }

    #[test]
    fn prompt_at_input_price_plus_output_cap_times_n() {
        let m = model(dec!(1.08), dec!(0.108), dec!(8.60), 128_000);
        let est = TokenEstimate {
            prompt_tokens: 1_000,
            output_cap: Some(500),
            n: 2,
        };
        // 1000 × 1.08 + 500 × 2 × 8.60 = 1080 + 8600 = 9680 per 1M = 9680 nano-euros × 1000.
        assert_eq!(reservation(&m, &est), Ok(Nanos::new(9_680_000)));
    }

    #[test]
    fn without_a_cap_the_model_maximum_applies_and_a_cap_is_reserved_as_asked() {
        let m = model(dec!(1), dec!(1), dec!(10), 1_000);
        let none = TokenEstimate {
            prompt_tokens: 0,
            output_cap: None,
            n: 1,
        };
        assert_eq!(reservation(&m, &none), Ok(Nanos::new(10_000_000)));
        // Above the catalog's maximum: the upstream gets the request unchanged and
        // may honour it, so all of it is held.
        let above = TokenEstimate {
            output_cap: Some(5_000),
            ..none
        };
        assert_eq!(reservation(&m, &above), Ok(Nanos::new(50_000_000)));
        let zero_n = TokenEstimate { n: 0, ..none };
        assert_eq!(reservation(&m, &zero_n), reservation(&m, &none));
    }

    #[test]
    fn rounds_up_to_whole_nano_euros() {
        // 1 token at 0.0001 EUR per 1M = 10⁻¹⁰ EUR: reserve a whole nano-euro.
        let m = model(dec!(0.0001), dec!(0), dec!(0), 1);
        let est = TokenEstimate {
            prompt_tokens: 1,
            output_cap: Some(0),
            n: 1,
        };
        assert_eq!(reservation(&m, &est), Ok(Nanos::new(1)));
        let exact = TokenEstimate {
            prompt_tokens: 10,
            ..est
        };
        assert_eq!(reservation(&m, &exact), Ok(Nanos::new(1)));
        let over = TokenEstimate {
            prompt_tokens: 11,
            ..est
        };
        assert_eq!(reservation(&m, &over), Ok(Nanos::new(2)));
    }

    #[test]
    fn a_higher_cached_price_is_still_covered() {
        let m = model(dec!(1), dec!(3), dec!(0), 1);
        let est = TokenEstimate {
            prompt_tokens: 1_000_000,
            output_cap: Some(0),
            n: 1,
        };
        assert_eq!(reservation(&m, &est), Ok(Nanos::new(3_000_000_000)));
    }

    #[test]
    fn overflow_is_an_error() {
        let m = model(dec!(1000000), dec!(0), dec!(1000000), u32::MAX);
        let est = TokenEstimate {
            prompt_tokens: u64::MAX,
            output_cap: None,
            n: u32::MAX,
        };
        assert_eq!(reservation(&m, &est), Err(EstimateError::Overflow));
    }

    #[test]
    fn byte_bound_covers_the_text_plus_a_margin() {
        assert_eq!(prompt_token_bound_from_bytes(0), 16);
        assert_eq!(prompt_token_bound_from_bytes(1_000), 1_016);
        // "héllo" is 6 bytes in UTF-8; no tokenizer splits it into more than 6 tokens.
        assert!(prompt_token_bound_from_bytes("héllo".len()) >= 6);
    }

    fn price() -> impl Strategy<Value = Decimal> {
        (0i64..100_000_000, 0u32..=9).prop_map(|(m, s)| Decimal::new(m, s))
    }

    proptest! {
        #[test]
        fn reservation_never_undercounts_the_cost_it_covers(
            input in price(), cached in price(), output in price(),
            prompt in 0u64..2_000_000, cached_share in 0u64..=100,
            cap in 0u64..200_000, used_share in 0u64..=100, n in 1u32..4,
        ) {
            let m = model(input, cached, output, 128_000);
            let est = TokenEstimate { prompt_tokens: prompt, output_cap: Some(cap), n };
            let reserved = reservation(&m, &est).unwrap();
            let cached_tokens = prompt * cached_share / 100;
            let completion = cap * u64::from(n) * used_share / 100;
            let usage = Usage {
                prompt_tokens: prompt,
                cached_tokens,
                completion_tokens: completion,
                reasoning_tokens: completion / 2,
            };
            let actual = cost(&m.prices, &usage).unwrap();
            prop_assert!(reserved.to_money() >= actual);
            // And it is the exact ceiling when the usage is the whole estimate at the
            // input price.
            let full = Usage {
                prompt_tokens: prompt,
                cached_tokens: if cached > input { prompt } else { 0 },
                completion_tokens: cap * u64::from(n),
                reasoning_tokens: 0,
            };
            let full_cost: Money = cost(&m.prices, &full).unwrap();
            prop_assert_eq!(Ok(reserved), full_cost.to_nanos_ceil());
        }
    }
}
