//! The Token Limits numbers as one serialisable report, built from the counters
//! (R8: never from the ledger). The tab renders it; `GET /api/v1/spend` returns it
//! as JSON in the shape of DESIGN.md §4: EUR amounts as exact decimal strings,
//! instants in RFC 3339 UTC.

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::domain::{ModelId, Money, Status};

/// The billing cycle as reported (R1): `[start, end)` and its first and last local days.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CycleReport {
    /// First instant of the cycle, UTC.
    pub start: DateTime<Utc>,
    /// First instant of the next cycle, UTC: when the limits reset.
    pub end: DateTime<Utc>,
    /// First local date of the cycle.
    pub first_day: NaiveDate,
    /// Last local date of the cycle (end minus one day).
    pub last_day: NaiveDate,
    /// The local date the next cycle starts ("Resets on").
    pub resets_on: NaiveDate,
}

/// One model in the report: a catalog model, spent or not, or a model no longer in
/// the catalog that has spend in the cycle (R8 lists every model with spend).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelReport {
    /// The model's API id.
    pub id: ModelId,
    /// Its display name; the id for a model no longer in the catalog.
    pub display_name: String,
    /// False for a model the catalog the books were set up with no longer lists:
    /// its spend still counts in the cycle (and in the shares), but it takes no
    /// requests and no limit is saved for it from the tab.
    pub in_catalog: bool,
    /// Spent on it in the cycle, EUR (exact).
    #[serde(rename = "spent_eur")]
    pub spent: Money,
    /// Share of the cycle's spend, percent with one decimal; the shares sum to 100.0
    /// when anything was spent (R8).
    #[serde(with = "rust_decimal::serde::str")]
    pub share_percent: Decimal,
    /// Its cap per cycle, EUR, if one is saved (active only when enabled, R5).
    #[serde(rename = "limit_eur")]
    pub limit: Option<Money>,
    /// The cap's toggle.
    pub limit_enabled: bool,
    /// Optimistic version of the model's limit (0: never saved), sent back on save.
    pub limit_version: i64,
}

/// Everything the Token Limits tab shows (DESIGN.md §3, §4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpendReport {
    /// The current billing cycle.
    pub cycle: CycleReport,
    /// R4 status of the cycle.
    pub status: Status,
    /// Plan budget per cycle, EUR.
    #[serde(rename = "plan_budget_eur")]
    pub plan_budget: Money,
    /// Overage limit on top of the budget, EUR.
    #[serde(rename = "overage_limit_eur")]
    pub overage_limit: Money,
    /// Settled spend in the cycle, EUR.
    #[serde(rename = "spent_eur")]
    pub spent: Money,
    /// Held for requests in flight, EUR (R7).
    #[serde(rename = "reserved_eur")]
    pub reserved: Money,
    /// The automatic fallback toggle.
    pub automatic_fallback: bool,
    /// Optimistic version of the settings, sent back on save.
    pub settings_version: i64,
    /// Every catalog model, and every model outside it with spend in the cycle,
    /// sorted as R8 sorts spend (amount descending, ties by display name).
    pub models: Vec<ModelReport>,
}

impl SpendReport {
    /// Plan budget plus overage limit, EUR.
    pub fn allowance(&self) -> Money {
        self.plan_budget + self.overage_limit
    }

    /// Spent over allowance in percent, rounded down to one decimal: above
    /// 100.0 when usage reported beyond its hold took the spend past the
    /// allowance (R7); 100.0 for an allowance of zero (nothing can be spent).
    pub fn used_percent(&self) -> Decimal {
        let allowance = self.allowance().amount();
        if allowance <= Decimal::ZERO {
            return Decimal::new(1000, 1);
        }
        let percent = self.spent.amount() * Decimal::ONE_HUNDRED / allowance;
        let mut percent = percent.round_dp_with_strategy(1, rust_decimal::RoundingStrategy::ToZero);
        percent.rescale(1);
        percent
    }

    /// [`SpendReport::used_percent`] capped at 100.0: how full the progress bar is.
    pub fn bar_percent(&self) -> Decimal {
        self.used_percent().min(Decimal::new(1000, 1))
    }
}

#[cfg(feature = "ssr")]
mod build {
    use super::*;
    use crate::domain::{spend_by_model, Nanos};
    use crate::store::SpendSnapshot;

    impl SpendReport {
        /// The report of `snapshot`: every model of the catalog the books were
        /// set up with, with its spend, share (R8), limit and versions, then every
        /// model with spend that the catalog no longer lists (R8: every model with
        /// spend has a row, and the shares sum to 100.0 over the cycle's whole
        /// spend); status by R4.
        pub fn build(snapshot: &SpendSnapshot) -> SpendReport {
            let books = |id: &ModelId| snapshot.models.iter().find(|m| &m.id == id);
            let listed = |id: &ModelId| snapshot.catalog.iter().any(|m| &m.id == id);
            let catalog = snapshot.catalog.iter().map(|m| {
                let spent = books(&m.id).map(|b| b.counter.spent).unwrap_or(Nanos::ZERO);
                (m.id.clone(), m.display_name.clone(), spent)
            });
            let retired = snapshot
                .models
                .iter()
                .filter(|b| b.counter.spent > Nanos::ZERO && !listed(&b.id))
                .map(|b| (b.id.clone(), b.id.to_string(), b.counter.spent));
            let spends = spend_by_model(catalog.chain(retired));
            let models = spends
                .into_iter()
                .map(|row| {
                    let stored = books(&row.id).map(|b| b.limit).unwrap_or_default();
                    ModelReport {
                        in_catalog: listed(&row.id),
                        spent: row.spent.to_money(),
                        share_percent: row.share_percent,
                        limit: stored.limit.limit.map(Nanos::to_money),
                        limit_enabled: stored.limit.enabled,
                        limit_version: stored.version,
                        id: row.id,
                        display_name: row.display_name,
                    }
                })
                .collect();
            let cycle = &snapshot.cycle;
            SpendReport {
                cycle: CycleReport {
                    start: cycle.start,
                    end: cycle.end,
                    first_day: cycle.first_day,
                    last_day: cycle.last_day,
                    resets_on: cycle.last_day.succ_opt().unwrap_or(cycle.last_day),
                },
                status: Status::of(&snapshot.plan.amounts, snapshot.workspace.spent),
                plan_budget: snapshot.plan.amounts.budget.to_money(),
                overage_limit: snapshot.plan.amounts.overage.to_money(),
                spent: snapshot.workspace.spent.to_money(),
                reserved: snapshot.workspace.reserved.to_money(),
                automatic_fallback: snapshot.settings.automatic_fallback,
                settings_version: snapshot.settings.version,
                models,
            }
        }
    }
}

/// The Token Limits tab as the browser gets it: every amount, date and percentage
/// already formatted on the server (`€1,234.56`, `1 Dec 2026`, `63.2%`), so the
/// hydrated page needs no decimal or calendar code (it keeps the wasm small) and
/// shows exactly what the server rendered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TabView {
    /// The billing period's first local day, e.g. `1 Nov 2026`.
    pub first_day: String,
    /// Its last local day.
    pub last_day: String,
    /// The local day of the next reset.
    pub resets_on: String,
    /// Spent in the cycle, `€12.26`.
    pub spent: String,
    /// Held for requests in flight (R7), in cents like every figure of the tab
    /// (R2): `€1.25`, `€0.00`; a hold that rounds to nothing but is not nothing
    /// is `less than €0.01`. Counted against the allowance before they settle,
    /// so the tab shows it.
    pub reserved: String,
    /// Plan budget.
    pub plan_budget: String,
    /// Overage limit.
    pub overage_limit: String,
    /// Plan budget plus overage limit.
    pub allowance: String,
    /// Spent over allowance, percent with one decimal (`2.0`; above `100.0`
    /// when usage reported beyond its hold passed the allowance).
    pub used_percent: String,
    /// How full the progress bar is: `used_percent` capped at `100.0`.
    pub bar_percent: String,
    /// R4 status.
    pub status: Status,
    /// The automatic fallback toggle.
    pub automatic_fallback: bool,
    /// Optimistic version of the settings, sent back on save.
    pub settings_version: i64,
    /// Every catalog model, and every other model with spend, in R8 order.
    pub models: Vec<ModelRowView>,
    /// The rows of a Model limits form refused without JavaScript, as typed,
    /// which the page it was sent back to shows in place of the saved values
    /// (once: they are taken from the session). Empty otherwise.
    #[serde(default)]
    pub refused_limits: Vec<crate::api::LimitInput>,
    /// The path of the server function whose form was saved without
    /// JavaScript just before (`/fn/save_model_limits`): the page the browser
    /// was sent back to says "Saved." beside that form, once (taken from the
    /// session, so a reload of the same address does not say it again). None
    /// otherwise.
    #[serde(default)]
    pub saved_form: Option<String>,
}

/// One model on the tab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRowView {
    /// API id.
    pub id: String,
    /// Display name.
    pub display_name: String,
    /// In this cycle, `€7.74`.
    pub spent: String,
    /// True when the model has spend in the cycle (listed under Spend by model).
    pub has_spend: bool,
    /// False for a model the config no longer lists: shown under Spend by model
    /// only, with no Limit field.
    pub in_catalog: bool,
    /// Share of the cycle's spend with one decimal, `63.2`.
    pub share_percent: String,
    /// The Limit field's value: the saved cap as `€12.50`, or empty.
    pub limit_input: String,
    /// The Enabled toggle.
    pub limit_enabled: bool,
    /// Optimistic version of the limit, sent back on save.
    pub limit_version: i64,
    /// True when the model's active limit is used up (spent ≥ limit, R5/R6): new
    /// requests for it fall back or are blocked.
    pub limit_reached: bool,
    /// A word beside an enabled limit that does something other than it may
    /// seem to: one of €0.00 lets no request through, one above the plan
    /// budget plus overage never stops anything the plan would not. `None`
    /// for every other limit.
    pub limit_note: Option<String>,
}

/// [`ModelRowView::limit_note`] of `model` in a workspace allowed
/// `allowance` (plan budget plus overage limit, EUR); `tollgate limit set`
/// says it too.
pub fn limit_note(model: &ModelReport, allowance: Money) -> Option<String> {
    let limit = model.limit.filter(|_| model.limit_enabled)?;
    if limit == Money::ZERO {
        Some(
            "At €0.00 this limit lets no request through: each request for this model \
             goes to a cheaper model, or is blocked."
                .to_owned(),
        )
    } else if limit > allowance {
        Some(format!(
            "This is more than the workspace may spend in a cycle ({}): the plan's limit \
             is reached first.",
            crate::domain::format_eur(allowance)
        ))
    } else {
        None
    }
}

/// `money` in cents, or `less than €0.01` for a positive amount that rounds to
/// `€0.00` (a few requests' holds): the tab must not say nothing is held.
fn held(money: Money) -> String {
    let cents = crate::domain::format_eur(money);
    if money > Money::ZERO && cents == "€0.00" {
        "less than €0.01".to_owned()
    } else {
        cents
    }
}

impl From<&SpendReport> for TabView {
    fn from(report: &SpendReport) -> TabView {
        let day = |date: NaiveDate| date.format("%-d %b %Y").to_string();
        let eur = crate::domain::format_eur;
        TabView {
            first_day: day(report.cycle.first_day),
            last_day: day(report.cycle.last_day),
            resets_on: day(report.cycle.resets_on),
            spent: eur(report.spent),
            reserved: held(report.reserved),
            plan_budget: eur(report.plan_budget),
            overage_limit: eur(report.overage_limit),
            allowance: eur(report.allowance()),
            used_percent: report.used_percent().to_string(),
            bar_percent: report.bar_percent().to_string(),
            status: report.status,
            automatic_fallback: report.automatic_fallback,
            settings_version: report.settings_version,
            models: report
                .models
                .iter()
                .map(|m| ModelRowView {
                    id: m.id.to_string(),
                    display_name: m.display_name.clone(),
                    spent: eur(m.spent),
                    has_spend: m.spent > Money::ZERO,
                    in_catalog: m.in_catalog,
                    share_percent: m.share_percent.to_string(),
                    limit_input: m.limit.map(eur).unwrap_or_default(),
                    limit_enabled: m.limit_enabled,
                    limit_version: m.limit_version,
                    limit_reached: m.limit_enabled && m.limit.is_some_and(|cap| m.spent >= cap),
                    limit_note: limit_note(m, report.allowance()),
                })
                .collect(),
            refused_limits: Vec::new(),
            saved_form: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_show_in_cents_and_never_as_nothing_when_something_is_held() {
        let held_of = |mantissa: i64, scale: u32| held(Money::new(Decimal::new(mantissa, scale)));
        assert_eq!(held_of(0, 0), "€0.00");
        assert_eq!(held_of(418, 6), "less than €0.01");
        assert_eq!(held_of(4_999, 6), "less than €0.01");
        assert_eq!(held_of(5, 3), "€0.01");
        assert_eq!(held_of(1_234, 3), "€1.23");
    }

    /// The text says how far past the allowance the spend went; only the bar
    /// stops at 100.0.
    #[test]
    fn the_percentage_used_is_the_real_one_and_the_bar_is_capped() {
        let report = |spent: &str, budget: &str, overage: &str| {
            let eur = |text: &str| Money::new(text.parse::<Decimal>().unwrap());
            let day = NaiveDate::from_ymd_opt(2026, 12, 1).unwrap();
            let at = day.and_hms_opt(0, 0, 0).unwrap().and_utc();
            SpendReport {
                cycle: CycleReport {
                    start: at,
                    end: at,
                    first_day: day,
                    last_day: day,
                    resets_on: day,
                },
                status: Status::WithinPlanBudget,
                plan_budget: eur(budget),
                overage_limit: eur(overage),
                spent: eur(spent),
                reserved: Money::ZERO,
                automatic_fallback: true,
                settings_version: 0,
                models: Vec::new(),
            }
        };
        let shown = |report: SpendReport| {
            let tab = TabView::from(&report);
            (tab.used_percent, tab.bar_percent)
        };
        assert_eq!(
            shown(report("12.26", "500", "100")),
            ("2.0".into(), "2.0".into())
        );
        assert_eq!(
            shown(report("600", "500", "100")),
            ("100.0".into(), "100.0".into())
        );
        assert_eq!(
            shown(report("0.05082", "0.01", "0")),
            ("508.2".into(), "100.0".into())
        );
        assert_eq!(
            shown(report("599.99", "500", "100")),
            ("99.9".into(), "99.9".into())
        );
        assert_eq!(
            shown(report("0", "0", "0")),
            ("100.0".into(), "100.0".into())
        );
    }

    /// An enabled limit of €0.00, or one above the allowance, gets a word of
    /// what it does; a disabled one, or one within the allowance, none.
    #[test]
    fn limits_that_do_other_than_they_seem_say_so() {
        let eur = |text: &str| Money::new(text.parse::<Decimal>().unwrap());
        let model = |limit: Option<&str>, enabled: bool| ModelReport {
            id: ModelId::from("gpt-5"),
            display_name: "GPT-5".into(),
            in_catalog: true,
            spent: Money::ZERO,
            share_percent: Decimal::ZERO,
            limit: limit.map(eur),
            limit_enabled: enabled,
            limit_version: 1,
        };
        let allowance = eur("600");
        let note = |limit, enabled| limit_note(&model(limit, enabled), allowance);
        assert!(note(Some("0"), true)
            .unwrap()
            .contains("lets no request through"));
        assert_eq!(
            note(Some("600.01"), true).unwrap(),
            "This is more than the workspace may spend in a cycle (€600.00): the plan's \
             limit is reached first."
        );
        assert_eq!(note(Some("600"), true), None);
        assert_eq!(note(Some("12.50"), true), None);
        assert_eq!(note(Some("0"), false), None);
        assert_eq!(note(Some("5000"), false), None);
        assert_eq!(note(None, true), None);
    }
}
