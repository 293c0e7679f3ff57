//! The budget rules of DESIGN.md as pure functions and types over exact decimals and
//! `chrono`: billing cycles (R1), money (R2), pricing (R3), status (R4), model limits
//! (R5), admission and fallback (R6), reservations (R7), spend shares (R8) and the
//! tab's euro input (§3).
//!
//! No I/O, no async, no clock, no framework: everything here is a function of its
//! arguments, so it runs the same in the server, in the browser (wasm32) and in tests.
//! Amounts are `rust_decimal::Decimal` euros or `i64` nano-euros, never floats.

// Lint attributes are allowed as inner attributes of any module, so these hold for the
// domain whether it is a crate root (scratch build) or `app::domain`.
#![forbid(unsafe_code)]
#![deny(
    missing_docs,
    clippy::float_arithmetic,
    clippy::float_cmp,
    clippy::unwrap_used,
    clippy::expect_used
)]

pub mod admission;
pub mod catalog;
pub mod cycle;
pub mod estimate;
pub mod euro_input;
pub mod limits;
pub mod money;
pub mod pricing;
pub mod shares;
pub mod status;

pub use admission::{
    admit, admit_known_cost, Admission, BlockCode, Blocked, Counter, ModelState, Snapshot,
};
pub use catalog::{
    check_name, reorders_text, writable, Catalog, CatalogError, Model, ModelId, Prices,
    MAX_MODEL_NAME_CHARS,
};
pub use cycle::{BillingCycle, CycleError};
pub use estimate::{prompt_token_bound_from_bytes, reservation, EstimateError, TokenEstimate};
pub use euro_input::{parse_eur_input, EuroInputError};
pub use limits::{LimitError, ModelLimit};
pub use money::{format_eur, format_eur_exact, Money, MoneyError, Nanos, PricePerMTok};
pub use pricing::{cost, PricingError, Usage, UsageError};
pub use shares::{by_display_name, spend_by_model, ModelSpend};
pub use status::{PlanAmounts, Status};
