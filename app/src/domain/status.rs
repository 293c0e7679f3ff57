//! The workspace's plan envelope and its status line (DESIGN.md R4).

use serde::{Deserialize, Serialize};

use super::money::Nanos;

/// The plan's amounts for one cycle, in nano-euros (DESIGN.md vocabulary "plan").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PlanAmounts {
    /// `plan_budget`: what the plan covers per cycle.
    pub budget: Nanos,
    /// `overage_limit`: what may be spent on top of the budget per cycle.
    pub overage: Nanos,
}

impl PlanAmounts {
    /// The allowance, `budget + overage` (saturating), in nano-euros: the most the
    /// workspace may spend in a cycle (DESIGN.md R4).
    pub fn allowance(&self) -> Nanos {
        self.budget + self.overage
    }
}

/// Where the workspace's spend stands in its cycle (DESIGN.md R4). Serialised as the
/// snake_case code of [`Status::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Spent is at most the plan budget.
    WithinPlanBudget,
    /// Spent is above the plan budget but below the allowance.
    UsingOverage,
    /// Spent has reached the allowance: every new request is blocked.
    LimitReached,
}

impl Status {
    /// The status for `spent` nano-euros against `plan` (DESIGN.md R4).
    ///
    /// *Limit reached* when `spent ≥ allowance` (≥, so it wins when there is no
    /// overage, and a plan of 0 with no overage is reached from the start); otherwise
    /// *Within plan budget* while `spent ≤ budget`; otherwise *Using overage*.
    pub fn of(plan: &PlanAmounts, spent: Nanos) -> Status {
        if spent >= plan.allowance() {
            Status::LimitReached
        } else if spent <= plan.budget {
            Status::WithinPlanBudget
        } else {
            Status::UsingOverage
        }
    }

    /// Stable snake_case code, as in the spend API's `status` (DESIGN.md §4).
    pub fn as_str(self) -> &'static str {
        match self {
            Status::WithinPlanBudget => "within_plan_budget",
            Status::UsingOverage => "using_overage",
            Status::LimitReached => "limit_reached",
        }
    }

    /// The status line the Token Limits tab shows (DESIGN.md §3).
    pub fn label(self) -> &'static str {
        match self {
            Status::WithinPlanBudget => "Within plan budget",
            Status::UsingOverage => "Using overage",
            Status::LimitReached => "Limit reached",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EUR: i64 = 1_000_000_000;

    fn plan(budget_eur: i64, overage_eur: i64) -> PlanAmounts {
        PlanAmounts {
            budget: Nanos::new(budget_eur * EUR),
            overage: Nanos::new(overage_eur * EUR),
        }
    }

    #[test]
    fn thresholds_are_inclusive_where_the_design_says() {
        let p = plan(500, 100);
        assert_eq!(p.allowance(), Nanos::new(600 * EUR));
        assert_eq!(Status::of(&p, Nanos::ZERO), Status::WithinPlanBudget);
        assert_eq!(
            Status::of(&p, Nanos::new(500 * EUR)),
            Status::WithinPlanBudget
        );
        assert_eq!(
            Status::of(&p, Nanos::new(500 * EUR + 1)),
            Status::UsingOverage
        );
        assert_eq!(
            Status::of(&p, Nanos::new(600 * EUR - 1)),
            Status::UsingOverage
        );
        assert_eq!(Status::of(&p, Nanos::new(600 * EUR)), Status::LimitReached);
        assert_eq!(Status::of(&p, Nanos::new(700 * EUR)), Status::LimitReached);
    }

    #[test]
    fn limit_reached_wins_without_overage() {
        let p = plan(500, 0);
        assert_eq!(Status::of(&p, Nanos::new(500 * EUR)), Status::LimitReached);
        assert_eq!(
            Status::of(&p, Nanos::new(500 * EUR - 1)),
            Status::WithinPlanBudget
        );
    }

    #[test]
    fn empty_plan_is_reached_from_the_start() {
        assert_eq!(Status::of(&plan(0, 0), Nanos::ZERO), Status::LimitReached);
        assert_eq!(
            Status::of(&plan(0, 10), Nanos::ZERO),
            Status::WithinPlanBudget
        );
        assert_eq!(
            Status::of(&plan(0, 10), Nanos::new(1)),
            Status::UsingOverage
        );
    }

    #[test]
    fn reads_its_code() {
        use serde::de::{value::Error, IntoDeserializer};
        let status = Status::deserialize(IntoDeserializer::<Error>::into_deserializer(
            "using_overage",
        ));
        assert_eq!(status, Ok(Status::UsingOverage));
    }

    #[test]
    fn codes_and_labels() {
        let all = [
            Status::WithinPlanBudget,
            Status::UsingOverage,
            Status::LimitReached,
        ];
        let codes: Vec<_> = all.iter().map(|s| s.as_str()).collect();
        let labels: Vec<_> = all.iter().map(|s| s.label()).collect();
        assert_eq!(
            codes,
            ["within_plan_budget", "using_overage", "limit_reached"]
        );
        assert_eq!(
            labels,
            ["Within plan budget", "Using overage", "Limit reached"]
        );
    }
}
