//! Admission and fallback (DESIGN.md R6): the decision for one request, taken on a
//! consistent snapshot of the plan, the limits, the fallback flag and the counters.
//!
//! The store reads the snapshot and applies the answer inside one atomic step; this
//! module only decides. It allocates nothing on the admit and fallback paths (ids
//! are shared strings); only a block builds its message.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use super::catalog::{Catalog, Model, ModelId};
use super::estimate::{reservation, TokenEstimate};
use super::limits::ModelLimit;
use super::money::{format_eur_exact, Nanos};
use super::status::PlanAmounts;

/// Spend and holds for one cycle, in nano-euros (the per-cycle counters of DESIGN.md §6).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Counter {
    /// Settled cost in the cycle.
    pub spent: Nanos,
    /// Cost held for requests in flight (DESIGN.md R7).
    pub reserved: Nanos,
}

impl Counter {
    /// `spent + reserved` (saturating): what admission compares with a limit.
    pub fn used(&self) -> Nanos {
        self.spent + self.reserved
    }

    /// The counter after holding `reservation` for an admitted request (R7).
    pub fn reserve(self, reservation: Nanos) -> Counter {
        Counter {
            spent: self.spent,
            reserved: self.reserved + reservation,
        }
    }

    /// The counter after a request settles: its `reservation` is replaced by its
    /// `actual` cost, which is recorded even when it is the larger (R7).
    pub fn settle(self, reservation: Nanos, actual: Nanos) -> Counter {
        Counter {
            spent: self.spent + actual,
            reserved: self.reserved - reservation,
        }
    }

    /// The counter after `reservation` is released unused (upstream error, dropped
    /// client, expired lease: R7).
    pub fn release(self, reservation: Nanos) -> Counter {
        Counter {
            spent: self.spent,
            reserved: self.reserved - reservation,
        }
    }
}

/// One model's counter in the current cycle and its limit setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ModelState {
    /// Spend and holds of the model in the cycle (requests it served).
    pub counter: Counter,
    /// Its limit setting (R5).
    pub limit: ModelLimit,
}

/// Everything admission reads, as of one atomic step (DESIGN.md R6).
#[derive(Debug, Clone, Copy)]
pub struct Snapshot<'a> {
    /// The plan's budget and overage, nano-euros.
    pub plan: PlanAmounts,
    /// The workspace's "automatically switch to a cheaper model" toggle.
    pub automatic_fallback: bool,
    /// The workspace's counter in the current cycle.
    pub workspace: Counter,
    /// Per-model counters and limits by id; a model that is missing has spent
    /// nothing and has no limit.
    pub models: &'a HashMap<ModelId, ModelState>,
    /// End of the current billing cycle (R1), quoted in block messages.
    pub resets_at: DateTime<Utc>,
    /// The workspace's timezone: block messages quote the reset as the tab
    /// does, on its local date (R1).
    pub timezone: Tz,
}

impl Snapshot<'_> {
    fn model_state(&self, id: &ModelId) -> ModelState {
        self.models.get(id).copied().unwrap_or_default()
    }
}

/// Which limit blocked a request: the `code` of the 429 error body (DESIGN.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockCode {
    /// The workspace's allowance has no room (R6 step 1).
    PlanLimitReached,
    /// The requested model's cap has no room and no fallback applies (R6 step 2).
    ModelLimitReached,
}

impl BlockCode {
    /// Stable snake_case code: `plan_limit_reached` or `model_limit_reached`.
    pub fn as_str(self) -> &'static str {
        match self {
            BlockCode::PlanLimitReached => "plan_limit_reached",
            BlockCode::ModelLimitReached => "model_limit_reached",
        }
    }
}

/// A refused request: the error the client sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// Which limit refused it.
    pub code: BlockCode,
    /// A sentence for a person: which limit (naming the model for a model limit),
    /// the amounts, and when the limit resets (its local date and time, and the
    /// instant in UTC when the workspace is in another timezone).
    pub message: String,
    /// When the cycle ends and the limit has room again (R1), UTC.
    pub resets_at: DateTime<Utc>,
}

/// The decision for one request (DESIGN.md vocabulary "admission").
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "an admission must be applied: reserve and serve, or answer the block"]
pub enum Admission {
    /// Serve it on the requested model, holding `reservation` nano-euros.
    Admit {
        /// The requested (and served) model.
        model: ModelId,
        /// Nano-euros to hold on the workspace and the model (R7).
        reservation: Nanos,
    },
    /// Serve it on a cheaper model because the requested model's cap has no room.
    Fallback {
        /// The requested model.
        from: ModelId,
        /// The model that serves it and whose counter is charged.
        to: ModelId,
        /// Nano-euros to hold, priced on `to` (R7).
        reservation: Nanos,
    },
    /// Refuse it.
    Block(Blocked),
}

impl Admission {
    /// The model that serves the request and is charged, if it is served.
    pub fn served_model(&self) -> Option<&ModelId> {
        match self {
            Admission::Admit { model, .. } => Some(model),
            Admission::Fallback { to, .. } => Some(to),
            Admission::Block(_) => None,
        }
    }

    /// The nano-euros to hold, if the request is served.
    pub fn reservation(&self) -> Option<Nanos> {
        match self {
            Admission::Admit { reservation, .. } | Admission::Fallback { reservation, .. } => {
                Some(*reservation)
            }
            Admission::Block(_) => None,
        }
    }
}

/// True when `used` is below `limit` and `used + reservation` does not exceed it.
///
/// Both halves of DESIGN.md R6: the first (`used ≥ limit` blocks) is what stops a
/// zero-cost request at a reached limit; the second keeps the hold inside it.
fn has_room(used: Nanos, reservation: Nanos, limit: Nanos) -> bool {
    used < limit
        && used
            .checked_add(reservation)
            .is_some_and(|total| total <= limit)
}

/// Decides admission for a request on `requested` with `estimate` (DESIGN.md R6).
///
/// `requested` is the model the request's `model` name resolved to in `catalog`, so
/// every alias shares one counter. With `c` the reservation on the requested model
/// (R7, rounded up):
/// 1. the workspace's `spent + reserved ≥ allowance`, or `+ c > allowance`: block,
///    `plan_limit_reached`;
/// 2. the requested model's active cap has `spent + reserved ≥ cap` or `+ c > cap`:
///    with automatic fallback on, serve on the most expensive strictly cheaper model
///    (output price, then input price) whose own active cap, if any, has room for its
///    own reservation and whose reservation fits the allowance, passing over any whose
///    `max_output_tokens` is below the request's output cap (it would refuse the
///    request upstream); with none, or with fallback off, block, `model_limit_reached`;
/// 3. otherwise admit on the requested model.
///
/// Fallback only walks down the price order once: it never picks a dearer or
/// equal-priced model and never loops. A reservation too large to represent counts as
/// having no room. Allocation-free unless it blocks.
pub fn admit(
    snapshot: &Snapshot<'_>,
    catalog: &Catalog,
    requested: &Model,
    estimate: &TokenEstimate,
) -> Admission {
    let allowance = snapshot.plan.allowance();
    let workspace_used = snapshot.workspace.used();
    let c = reservation(requested, estimate).unwrap_or(Nanos::MAX);

    if !has_room(workspace_used, c, allowance) {
        return Admission::Block(plan_block(snapshot, Ask::Estimate(c)));
    }

    let state = snapshot.model_state(&requested.id);
    let Some(cap) = state.limit.active_cap() else {
        return admit_on(requested, c);
    };
    if has_room(state.counter.used(), c, cap) {
        return admit_on(requested, c);
    }

    // A cheaper model whose own output maximum is below the output the request
    // asks for would only refuse it upstream: it is passed over, and a block
    // says so when it was the only reason.
    let mut output_too_large = None;
    if snapshot.automatic_fallback {
        for candidate in catalog.cheaper_than(&requested.id) {
            if let Some(cap) = estimate
                .output_cap
                .filter(|cap| *cap > u64::from(candidate.max_output_tokens))
            {
                output_too_large = Some(cap);
                continue;
            }
            let Ok(candidate_c) = reservation(candidate, estimate) else {
                continue;
            };
            if !has_room(workspace_used, candidate_c, allowance) {
                continue;
            }
            let candidate_state = snapshot.model_state(&candidate.id);
            let candidate_fits = candidate_state
                .limit
                .active_cap()
                .is_none_or(|cap| has_room(candidate_state.counter.used(), candidate_c, cap));
            if candidate_fits {
                return Admission::Fallback {
                    from: requested.id.clone(),
                    to: candidate.id.clone(),
                    reservation: candidate_c,
                };
            }
        }
    }
    Admission::Block(model_block(
        snapshot,
        requested,
        state.counter,
        cap,
        Ask::Estimate(c),
        output_too_large,
    ))
}

/// Admission of usage that already happened on `model` at a known `cost` in
/// nano-euros (the usage API's bulk recording, DESIGN.md §4): the same two checks as
/// [`admit`] with `c = cost`, but no fallback, since the model cannot be changed
/// after the fact. Recording it must not carry the workspace past its allowance or
/// the model past its active cap (R4, R5, R6).
///
/// Errors: the [`Blocked`] answer, with `plan_limit_reached` or
/// `model_limit_reached`.
pub fn admit_known_cost(
    snapshot: &Snapshot<'_>,
    model: &Model,
    cost: Nanos,
) -> Result<(), Blocked> {
    if !has_room(snapshot.workspace.used(), cost, snapshot.plan.allowance()) {
        return Err(plan_block(snapshot, Ask::Known(cost)));
    }
    let state = snapshot.model_state(&model.id);
    match state.limit.active_cap() {
        Some(cap) if !has_room(state.counter.used(), cost, cap) => {
            let no_fallback = Snapshot {
                automatic_fallback: false,
                ..*snapshot
            };
            Err(model_block(
                &no_fallback,
                model,
                state.counter,
                cap,
                Ask::Known(cost),
                None,
            ))
        }
        _ => Ok(()),
    }
}

fn admit_on(model: &Model, reservation: Nanos) -> Admission {
    Admission::Admit {
        model: model.id.clone(),
        reservation,
    }
}

/// The reset as the messages quote it: on its local date, as the tab's "Resets
/// on" shows it (R1), with the instant in UTC too when the workspace's timezone
/// is another: "31 Dec 2026 at 00:00 Europe/Berlin (2026-12-30 23:00 UTC)",
/// "31 Dec 2026 at 00:00 UTC".
fn reset_text(snapshot: &Snapshot<'_>) -> String {
    let local = snapshot.resets_at.with_timezone(&snapshot.timezone);
    let mut text = local.format("%-d %b %Y at %H:%M").to_string();
    if snapshot.timezone == Tz::UTC {
        text.push_str(" UTC");
    } else {
        text.push_str(&format!(
            " {} ({})",
            snapshot.timezone.name(),
            snapshot.resets_at.format("%Y-%m-%d %H:%M UTC")
        ));
    }
    text
}

/// What a blocked admission asked for, in nano-euros.
#[derive(Debug, Clone, Copy)]
enum Ask {
    /// A request's reservation (R7), `Nanos::MAX` when too large to count.
    Estimate(Nanos),
    /// Usage that already happened (the usage API's bulk recording).
    Known(Nanos),
}

impl Ask {
    /// "this request could cost up to €0.00215".
    fn cost_text(self) -> String {
        match self {
            Ask::Estimate(c) if c == Nanos::MAX => {
                "this request could cost more than can be counted".into()
            }
            Ask::Estimate(c) => format!("this request could cost up to {}", eur(c)),
            Ask::Known(c) => format!("this usage costs {}", eur(c)),
        }
    }

    /// What the caller can do about it.
    fn remedy(self, resets: &str) -> String {
        match self {
            Ask::Estimate(_) => format!(
                "Send a shorter prompt, ask for fewer output tokens (max_completion_tokens or max_tokens) \
                 or fewer choices (n), or wait until the cycle resets on {resets}."
            ),
            Ask::Known(_) => {
                format!("It was not recorded. The cycle resets on {resets}.")
            }
        }
    }
}

/// An amount for a refusal message, exact: the message compares amounts, and
/// rounded to cents a small request could read as costing "€0.01" with "€0.01
/// left".
fn eur(nanos: Nanos) -> String {
    format_eur_exact(nanos.to_money())
}

fn plan_block(snapshot: &Snapshot<'_>, ask: Ask) -> Blocked {
    let allowance = snapshot.plan.allowance();
    let used = snapshot.workspace.used();
    let resets = reset_text(snapshot);
    let message = if used >= allowance {
        format!(
            "Plan limit reached: the workspace has used its allowance of {} for this \
             billing cycle ({} spent or held for requests in progress). Requests are \
             blocked until the cycle resets on {resets} or the operator raises the plan.",
            eur(allowance),
            eur(used),
        )
    } else {
        format!(
            "Plan limit reached: {}, but only {} of the workspace's allowance of {} for \
             this billing cycle is left. {}",
            ask.cost_text(),
            eur(allowance - used),
            eur(allowance),
            ask.remedy(&resets),
        )
    };
    Blocked {
        code: BlockCode::PlanLimitReached,
        message,
        resets_at: snapshot.resets_at,
    }
}

/// A `model_limit_reached` block of a request on `model`; `output_too_large`
/// is the output cap of a request that a cheaper model was passed over for.
fn model_block(
    snapshot: &Snapshot<'_>,
    model: &Model,
    counter: Counter,
    cap: Nanos,
    ask: Ask,
    output_too_large: Option<u64>,
) -> Blocked {
    let used = counter.used();
    let situation = if used >= cap {
        format!(
            "{} has used its limit of {} for this billing cycle ({} spent or held)",
            model.label(),
            eur(cap),
            eur(used),
        )
    } else {
        format!(
            "{}, but only {} of the {} limit of {} for this billing cycle is left",
            ask.cost_text(),
            eur(cap - used),
            eur(cap),
            model.label(),
        )
    };
    let message = match ask {
        Ask::Known(_) => format!(
            "Model limit reached: {situation}. The usage was not recorded. The limit \
             resets on {}.",
            reset_text(snapshot),
        ),
        Ask::Estimate(_) => {
            let fallback = match (snapshot.automatic_fallback, output_too_large) {
                (false, _) => "automatic fallback to a cheaper model is off".to_owned(),
                (true, None) => "no cheaper model has room for it".to_owned(),
                (true, Some(tokens)) => format!(
                    "no cheaper model has room for it and can produce the {tokens} output \
                     tokens it asks for"
                ),
            };
            format!(
                "Model limit reached: {situation}, and {fallback}. The limit resets on {}.",
                reset_text(snapshot),
            )
        }
    };
    Blocked {
        code: BlockCode::ModelLimitReached,
        message,
        resets_at: snapshot.resets_at,
    }
}

#[cfg(test)]
mod tests {
    use super::super::catalog::tests::model;
    use super::*;
    use proptest::prelude::*;

    /// One euro in nano-euros.
    const EUR: i64 = 1_000_000_000;

    fn catalog() -> Catalog {
        let mut gpt5 = model("gpt-5", (108, 2), (860, 2));
        gpt5.aliases = vec!["openai/gpt-5".into()];
        gpt5.display_name = "GPT-5".into();
        Catalog::new(vec![
            model("dear", (10, 0), (50, 0)),
            gpt5,
            model("gpt-5-twin", (108, 2), (860, 2)),
            model("mini", (216, 3), (172, 2)),
            model("nano", (43, 3), (344, 3)),
        ])
        .unwrap()
    }

    /// 1000 prompt tokens and 100 output tokens: gpt-5 1,940,000 nano-euros, mini
    /// 388,000, nano 77,400.
    const EST: TokenEstimate = TokenEstimate {
        prompt_tokens: 1000,
        output_cap: Some(100),
        n: 1,
    };
    const C_GPT5: i64 = 1_940_000;
    const C_MINI: i64 = 388_000;
    const C_NANO: i64 = 77_400;

    const ZERO_COST: TokenEstimate = TokenEstimate {
        prompt_tokens: 0,
        output_cap: Some(0),
        n: 1,
    };

    fn resets() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-12-31T23:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn plan(allowance: i64) -> PlanAmounts {
        PlanAmounts {
            budget: Nanos::new(allowance),
            overage: Nanos::ZERO,
        }
    }

    fn state(spent: i64, cap: Option<i64>) -> ModelState {
        ModelState {
            counter: Counter {
                spent: Nanos::new(spent),
                reserved: Nanos::ZERO,
            },
            limit: ModelLimit {
                limit: cap.map(Nanos::new),
                enabled: cap.is_some(),
            },
        }
    }

    fn snapshot(models: &HashMap<ModelId, ModelState>, fallback: bool) -> Snapshot<'_> {
        Snapshot {
            plan: PlanAmounts {
                budget: Nanos::new(500 * EUR),
                overage: Nanos::new(100 * EUR),
            },
            automatic_fallback: fallback,
            workspace: Counter::default(),
            models,
            resets_at: resets(),
            timezone: Tz::UTC,
        }
    }

    fn states(entries: &[(&str, ModelState)]) -> HashMap<ModelId, ModelState> {
        entries
            .iter()
            .map(|(id, s)| (ModelId::from(*id), *s))
            .collect()
    }

    fn decide(snap: &Snapshot<'_>, name: &str, est: &TokenEstimate) -> Admission {
        let c = catalog();
        let requested = c.resolve(name).unwrap().clone();
        admit(snap, &c, &requested, est)
    }

    fn fallback_to(to: &str, reservation: i64) -> Admission {
        Admission::Fallback {
            from: ModelId::from("gpt-5"),
            to: ModelId::from(to),
            reservation: Nanos::new(reservation),
        }
    }

    /// Asserts that `a` blocks with `code` and a message that says `says`.
    fn assert_blocked(a: &Admission, code: BlockCode, says: &str) {
        let Admission::Block(b) = a else {
            panic!("{a:?}")
        };
        assert_eq!(b.code, code);
        assert!(b.message.contains(says), "{}", b.message);
    }

    fn block_code(a: &Admission) -> Option<BlockCode> {
        match a {
            Admission::Block(b) => Some(b.code),
            _ => None,
        }
    }

    #[test]
    fn admits_on_the_requested_model_with_its_reservation() {
        let none = HashMap::new();
        let a = decide(&snapshot(&none, true), "gpt-5", &EST);
        assert_eq!(
            a,
            Admission::Admit {
                model: ModelId::from("gpt-5"),
                reservation: Nanos::new(C_GPT5)
            }
        );
        assert_eq!(a.served_model(), Some(&ModelId::from("gpt-5")));
        assert_eq!(a.reservation(), Some(Nanos::new(C_GPT5)));
    }

    #[test]
    fn plan_step_blocks_at_and_past_the_allowance() {
        let none = HashMap::new();
        let mut snap = snapshot(&none, true);
        snap.plan = plan(10 * EUR);

        // spent + reserved + c == allowance: admitted.
        snap.workspace = Counter {
            spent: Nanos::new(10 * EUR - C_GPT5 - 5),
            reserved: Nanos::new(5),
        };
        assert!(matches!(
            decide(&snap, "gpt-5", &EST),
            Admission::Admit { .. }
        ));

        // One nano-euro more: blocked, although a cheaper model would fit (step 1
        // checks the requested model's own reservation).
        snap.workspace.reserved = Nanos::new(6);
        let a = decide(&snap, "gpt-5", &EST);
        assert_eq!(block_code(&a), Some(BlockCode::PlanLimitReached));
        let Admission::Block(b) = a else { panic!() };
        // Exact, so a tiny request does not read "up to €0.01, but only €0.01 left".
        assert!(b.message.contains("up to €0.00194,"), "{}", b.message);
        assert!(b.message.contains("only €0.001939999 of"), "{}", b.message);
        assert!(b.message.contains("€10.00"), "{}", b.message);
        assert!(
            b.message.contains("31 Dec 2026 at 23:00 UTC."),
            "{}",
            b.message
        );
        assert_eq!(b.resets_at, resets());
        // In the workspace's timezone, on the date the tab shows.
        snap.timezone = chrono_tz::Europe::Berlin;
        let Admission::Block(b) = decide(&snap, "gpt-5", &EST) else {
            panic!()
        };
        assert!(
            b.message
                .contains("1 Jan 2027 at 00:00 Europe/Berlin (2026-12-31 23:00 UTC)."),
            "{}",
            b.message
        );
        assert_eq!(b.code.as_str(), "plan_limit_reached");
    }

    #[test]
    fn block_messages_give_exact_amounts() {
        let none = HashMap::new();
        let mut snap = snapshot(&none, true);
        // €12.255 used of €600: what is left is said exactly, €587.745, not
        // rounded to a cent that, with the tab's €12.26 spent, would pass €600.
        snap.workspace.spent = Nanos::new(12 * EUR + 255_000_000);
        let huge = TokenEstimate {
            prompt_tokens: 1000,
            output_cap: Some(1000),
            n: 1_000_000,
        };
        let Admission::Block(b) = decide(&snap, "gpt-5", &huge) else {
            panic!("a billion output tokens fit a €600 plan")
        };
        assert!(b.message.contains("only €587.745 of"), "{}", b.message);
        assert!(b.message.contains("up to €8,600.00108,"), "{}", b.message);
        assert!(b.message.contains("fewer choices (n)"), "{}", b.message);
        assert!(
            b.message.contains("(max_completion_tokens or max_tokens)"),
            "either field sets the output cap: {}",
            b.message
        );
        assert!(b.message.contains("a shorter prompt"), "{}", b.message);

        // An estimate too large to count is said so, not as i64::MAX nano-euros.
        let uncountable = TokenEstimate {
            prompt_tokens: u64::MAX,
            output_cap: Some(u64::MAX),
            n: u32::MAX,
        };
        let Admission::Block(b) = decide(&snap, "gpt-5", &uncountable) else {
            panic!("an uncountable request was admitted")
        };
        assert!(
            b.message.contains("more than can be counted"),
            "{}",
            b.message
        );
        assert!(!b.message.contains("9,223,372"), "{}", b.message);
    }

    #[test]
    fn zero_cost_request_is_blocked_at_limit_reached() {
        let none = HashMap::new();
        let mut snap = snapshot(&none, true);
        snap.workspace.spent = snap.plan.allowance();
        let a = decide(&snap, "nano", &ZERO_COST);
        assert_eq!(block_code(&a), Some(BlockCode::PlanLimitReached));
        let Admission::Block(b) = a else { panic!() };
        assert!(b.message.contains("€600.00"), "{}", b.message);

        snap.workspace.spent = snap.plan.allowance() - Nanos::new(1);
        assert!(matches!(
            decide(&snap, "nano", &ZERO_COST),
            Admission::Admit { .. }
        ));
    }

    #[test]
    fn empty_plan_blocks_everything() {
        let none = HashMap::new();
        let mut snap = snapshot(&none, true);
        snap.plan = plan(0);
        let a = decide(&snap, "nano", &ZERO_COST);
        assert_eq!(block_code(&a), Some(BlockCode::PlanLimitReached));
    }

    #[test]
    fn zero_cost_request_is_blocked_by_a_full_cap() {
        let full = states(&[("nano", state(5 * EUR, Some(5 * EUR)))]);
        let a = decide(&snapshot(&full, true), "nano", &ZERO_COST);
        assert_eq!(block_code(&a), Some(BlockCode::ModelLimitReached));
        let room = states(&[("nano", state(5 * EUR - 1, Some(5 * EUR)))]);
        let a = decide(&snapshot(&room, true), "nano", &ZERO_COST);
        assert!(matches!(a, Admission::Admit { .. }));
    }

    #[test]
    fn enabled_cap_of_zero_diverts_or_blocks() {
        let zero = states(&[("gpt-5", state(0, Some(0)))]);
        assert_eq!(
            decide(&snapshot(&zero, true), "gpt-5", &EST),
            fallback_to("mini", C_MINI)
        );
        let a = decide(&snapshot(&zero, false), "gpt-5", &EST);
        assert_eq!(block_code(&a), Some(BlockCode::ModelLimitReached));
        // Disabled, the same amount is no cap at all.
        let mut off = zero.clone();
        if let Some(s) = off.get_mut("gpt-5") {
            s.limit.enabled = false;
        }
        assert!(matches!(
            decide(&snapshot(&off, false), "gpt-5", &EST),
            Admission::Admit { .. }
        ));
    }

    #[test]
    fn model_step_blocks_when_the_reservation_does_not_fit_the_cap() {
        let tight = states(&[("gpt-5", state(EUR - C_GPT5 + 1, Some(EUR)))]);
        assert_eq!(
            block_code(&decide(&snapshot(&tight, false), "gpt-5", &EST)),
            Some(BlockCode::ModelLimitReached)
        );
        let exact = states(&[("gpt-5", state(EUR - C_GPT5, Some(EUR)))]);
        assert!(matches!(
            decide(&snapshot(&exact, false), "gpt-5", &EST),
            Admission::Admit { .. }
        ));
    }

    #[test]
    fn fallback_takes_the_most_expensive_strictly_cheaper_model_with_room() {
        let full = states(&[("gpt-5", state(EUR, Some(EUR)))]);
        // Not "dear" (dearer), not "gpt-5-twin" (same price), not "nano" (cheaper
        // than the best candidate).
        assert_eq!(
            decide(&snapshot(&full, true), "gpt-5", &EST),
            fallback_to("mini", C_MINI)
        );
    }

    #[test]
    fn fallback_skips_a_cheaper_model_whose_cap_is_full() {
        let m = states(&[
            ("gpt-5", state(EUR, Some(EUR))),
            ("mini", state(0, Some(C_MINI - 1))),
        ]);
        assert_eq!(
            decide(&snapshot(&m, true), "gpt-5", &EST),
            fallback_to("nano", C_NANO)
        );
        // Room for its own (smaller) reservation is what counts, not gpt-5's.
        let m = states(&[
            ("gpt-5", state(EUR, Some(EUR))),
            ("mini", state(0, Some(C_MINI))),
        ]);
        assert_eq!(
            decide(&snapshot(&m, true), "gpt-5", &EST),
            fallback_to("mini", C_MINI)
        );
    }

    #[test]
    fn fallback_passes_over_a_model_that_cannot_produce_the_output_asked() {
        let mut mini = model("mini", (216, 3), (172, 2));
        mini.max_output_tokens = 100;
        let c = Catalog::new(vec![
            model("gpt-5", (108, 2), (860, 2)),
            mini,
            model("nano", (43, 3), (344, 3)),
        ])
        .unwrap();
        let full = states(&[("gpt-5", state(EUR, Some(EUR)))]);
        let snap = snapshot(&full, true);
        let requested = c.resolve("gpt-5").unwrap();
        let asking = |output_cap| TokenEstimate { output_cap, ..EST };
        // mini can produce the 100 tokens asked, not 101; nano (1000) can.
        assert_eq!(
            admit(&snap, &c, requested, &asking(Some(100))).served_model(),
            Some(&ModelId::from("mini"))
        );
        assert_eq!(
            admit(&snap, &c, requested, &asking(Some(101))).served_model(),
            Some(&ModelId::from("nano"))
        );
        // A request that sets no cap is held at each model's own maximum.
        assert_eq!(
            admit(&snap, &c, requested, &asking(None)).served_model(),
            Some(&ModelId::from("mini"))
        );
        // With nano full too, the block says why mini was passed over.
        let full = states(&[
            ("gpt-5", state(EUR, Some(EUR))),
            ("nano", state(EUR, Some(EUR))),
        ]);
        let a = admit(&snapshot(&full, true), &c, requested, &asking(Some(500)));
        assert_blocked(
            &a,
            BlockCode::ModelLimitReached,
            "can produce the 500 output tokens",
        );
    }

    #[test]
    fn fallback_never_picks_a_dearer_or_equal_priced_model() {
        // Only the twin (equal price) and "dear" have room: block.
        let m = states(&[
            ("gpt-5", state(EUR, Some(EUR))),
            ("mini", state(EUR, Some(EUR))),
            ("nano", state(EUR, Some(EUR))),
        ]);
        let a = decide(&snapshot(&m, true), "gpt-5", &EST);
        assert_eq!(block_code(&a), Some(BlockCode::ModelLimitReached));
        let Admission::Block(b) = a else { panic!() };
        assert!(b.message.contains("GPT-5 (gpt-5)"), "{}", b.message);
        assert!(b.message.contains("€1.00"), "{}", b.message);
        assert!(b.message.contains("no cheaper model"), "{}", b.message);
        assert!(
            b.message.contains("31 Dec 2026 at 23:00 UTC"),
            "{}",
            b.message
        );
        assert_eq!(b.code.as_str(), "model_limit_reached");

        // The cheapest model has nowhere to go.
        let m = states(&[("nano", state(EUR, Some(EUR)))]);
        let a = decide(&snapshot(&m, true), "nano", &EST);
        assert_eq!(block_code(&a), Some(BlockCode::ModelLimitReached));
    }

    #[test]
    fn fallback_off_blocks_and_says_so() {
        let full = states(&[("gpt-5", state(EUR, Some(EUR)))]);
        let a = decide(&snapshot(&full, false), "gpt-5", &EST);
        assert_blocked(
            &a,
            BlockCode::ModelLimitReached,
            "fallback to a cheaper model is off",
        );
    }

    #[test]
    fn fallback_reservation_must_fit_the_allowance() {
        // mini can produce far more output than gpt-5, so with no output cap its
        // reservation is the larger one.
        let mut mini = model("mini", (216, 3), (172, 2));
        mini.max_output_tokens = 1_000_000;
        let gpt5 = model("gpt-5", (108, 2), (860, 2));
        let c = Catalog::new(vec![gpt5, mini, model("nano", (43, 3), (344, 3))]).unwrap();
        let est = TokenEstimate {
            prompt_tokens: 1000,
            output_cap: None,
            n: 1,
        };
        let c_gpt5 = reservation(c.resolve("gpt-5").unwrap(), &est).unwrap();
        let c_mini = reservation(c.resolve("mini").unwrap(), &est).unwrap();
        let c_nano = reservation(c.resolve("nano").unwrap(), &est).unwrap();
        assert!(c_mini > c_gpt5 && c_nano < c_gpt5);

        let full = states(&[("gpt-5", state(EUR, Some(EUR)))]);
        let mut snap = snapshot(&full, true);
        // Exactly gpt-5's reservation is left: step 1 passes, mini does not fit.
        snap.plan = plan(10 * EUR);
        snap.workspace.spent = Nanos::new(10 * EUR) - c_gpt5;
        let requested = c.resolve("gpt-5").unwrap();
        assert_eq!(
            admit(&snap, &c, requested, &est),
            Admission::Fallback {
                from: ModelId::from("gpt-5"),
                to: ModelId::from("nano"),
                reservation: c_nano
            }
        );
        // With room for mini too, mini (the dearer candidate) is chosen.
        snap.workspace.spent = Nanos::ZERO;
        assert_eq!(
            admit(&snap, &c, requested, &est).served_model(),
            Some(&ModelId::from("mini"))
        );
    }

    #[test]
    fn aliases_share_one_counter() {
        let c = catalog();
        let by_alias = c.resolve("openai/gpt-5").unwrap();
        let by_id = c.resolve("gpt-5").unwrap();
        assert_eq!(by_alias.id, by_id.id);
        let full = states(&[("gpt-5", state(EUR, Some(EUR)))]);
        let snap = snapshot(&full, false);
        let a = admit(&snap, &c, by_alias, &EST);
        assert_eq!(block_code(&a), Some(BlockCode::ModelLimitReached));
    }

    #[test]
    fn counters_settle_and_release() {
        let c = Counter::default().reserve(Nanos::new(10));
        assert_eq!(c.used(), Nanos::new(10));
        let settled = c.settle(Nanos::new(10), Nanos::new(12));
        assert_eq!(
            settled,
            Counter {
                spent: Nanos::new(12),
                reserved: Nanos::ZERO
            }
        );
        assert_eq!(c.release(Nanos::new(10)), Counter::default());
    }

    /// One step of a simulated workload.
    #[derive(Debug, Clone)]
    enum Op {
        Request {
            model: usize,
            prompt: u64,
            cap: Option<u64>,
        },
        /// Settle the oldest hold at `percent` % of its reservation (may exceed 100).
        Settle {
            percent: i64,
        },
        Release,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0usize..5, 0u64..200_000, proptest::option::of(0u64..2_000))
                .prop_map(|(model, prompt, cap)| Op::Request { model, prompt, cap }),
            2 => (0i64..150).prop_map(|percent| Op::Settle { percent }),
            1 => Just(Op::Release),
        ]
    }

    proptest! {
        #[test]
        fn no_admission_passes_the_allowance_or_an_active_cap(
            allowance in 0i64..(2 * EUR),
            caps in proptest::collection::vec(proptest::option::of(0i64..EUR), 5),
            fallback in any::<bool>(),
            ops in proptest::collection::vec(op(), 1..80),
        ) {
            let c = catalog();
            let mut models: HashMap<ModelId, ModelState> = c
                .models()
                .iter()
                .zip(&caps)
                .map(|(m, cap)| (m.id.clone(), state(0, *cap)))
                .collect();
            let mut workspace = Counter::default();
            let mut holds: Vec<(ModelId, Nanos)> = Vec::new();
            for op in ops {
                match op {
                    Op::Request { model, prompt, cap } => {
                        let requested = &c.models()[model];
                        let est = TokenEstimate { prompt_tokens: prompt, output_cap: cap, n: 1 };
                        let snap = Snapshot {
                            plan: plan(allowance),
                            automatic_fallback: fallback,
                            workspace,
                            models: &models,
                            resets_at: resets(),
                            timezone: Tz::UTC,
                        };
                        let decision = admit(&snap, &c, requested, &est);
                        if let (Some(served), Some(r)) = (decision.served_model(), decision.reservation()) {
                            let served = served.clone();
                            prop_assert!(workspace.used() < Nanos::new(allowance));
                            workspace = workspace.reserve(r);
                            prop_assert!(workspace.used() <= Nanos::new(allowance));
                            let served_model = c.get(&served).unwrap();
                            prop_assert_eq!(Ok(r), reservation(served_model, &est));
                            if served != requested.id {
                                prop_assert!(fallback);
                                prop_assert!(served_model.is_strictly_cheaper_than(requested));
                            }
                            let s = models.get_mut(&served).unwrap();
                            if let Some(cap) = s.limit.active_cap() {
                                prop_assert!(s.counter.used() < cap);
                                s.counter = s.counter.reserve(r);
                                prop_assert!(s.counter.used() <= cap);
                            } else {
                                s.counter = s.counter.reserve(r);
                            }
                            holds.push((served, r));
                        }
                    }
                    Op::Settle { percent } => {
                        if !holds.is_empty() {
                            let (id, r) = holds.remove(0);
                            let actual = Nanos::new(r.get() * percent / 100);
                            workspace = workspace.settle(r, actual);
                            let s = models.get_mut(&id).unwrap();
                            s.counter = s.counter.settle(r, actual);
                        }
                    }
                    Op::Release => {
                        if let Some((id, r)) = holds.pop() {
                            workspace = workspace.release(r);
                            let s = models.get_mut(&id).unwrap();
                            s.counter = s.counter.release(r);
                        }
                    }
                }
                let reserved: Nanos = holds.iter().map(|(_, r)| *r).sum();
                prop_assert_eq!(workspace.reserved, reserved);
                let model_total: Nanos = models.values().map(|s| s.counter.spent).sum();
                prop_assert_eq!(workspace.spent, model_total);
            }
        }
    }

    #[test]
    fn known_cost_is_admitted_only_within_plan_and_cap() {
        let catalog = catalog();
        let gpt5 = catalog.resolve("gpt-5").unwrap();
        let mut models = HashMap::new();
        models.insert(
            gpt5.id.clone(),
            ModelState {
                counter: Counter {
                    spent: Nanos::new(4 * EUR),
                    reserved: Nanos::ZERO,
                },
                limit: ModelLimit {
                    limit: Some(Nanos::new(5 * EUR)),
                    enabled: true,
                },
            },
        );
        let snapshot = Snapshot {
            plan: PlanAmounts {
                budget: Nanos::new(10 * EUR),
                overage: Nanos::ZERO,
            },
            automatic_fallback: true,
            workspace: Counter {
                spent: Nanos::new(4 * EUR),
                reserved: Nanos::ZERO,
            },
            models: &models,
            resets_at: chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 12, 31, 23, 0, 0).unwrap(),
            timezone: Tz::UTC,
        };
        // Exactly up to the cap fits; one nano-euro more is refused without fallback.
        assert_eq!(admit_known_cost(&snapshot, gpt5, Nanos::new(EUR)), Ok(()));
        let blocked = admit_known_cost(&snapshot, gpt5, Nanos::new(EUR + 1)).unwrap_err();
        assert_eq!(blocked.code, BlockCode::ModelLimitReached);
        // Said as what it is: usage that happened and was not recorded, with no
        // advice about output tokens or fallback, which cannot apply to it.
        assert!(
            blocked.message.contains("this usage costs €1.000000001")
                && blocked.message.contains("was not recorded")
                && !blocked.message.contains("fallback")
                && !blocked.message.contains("output tokens"),
            "{}",
            blocked.message
        );
        // A model without a cap is held by the allowance alone.
        let other = catalog.models().iter().find(|m| m.id != gpt5.id).unwrap();
        assert_eq!(
            admit_known_cost(&snapshot, other, Nanos::new(6 * EUR)),
            Ok(())
        );
        let blocked = admit_known_cost(&snapshot, other, Nanos::new(6 * EUR + 1)).unwrap_err();
        assert_eq!(blocked.code, BlockCode::PlanLimitReached);
    }
}
