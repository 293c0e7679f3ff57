//! Spending & Budget: the cycle, spent, plan budget and overage limit (read-only),
//! the progress bar, the status (R4), the reset date, and the automatic fallback
//! toggle with its Save.

use leptos::prelude::*;

use crate::{
    api::SaveAutomaticFallback,
    domain::Status,
    report::TabView,
    ui::{FormStatus, SaveButton},
};

/// A padlock: the value is set by the operator's plan, not in the UI.
#[component]
fn Lock() -> impl IntoView {
    view! {
        <svg class="lock" viewBox="0 0 16 16" width="14" height="14" role="img" aria-label="Read-only">
            <title>"Read-only: set by the plan"</title>
            <path d="M4 7V5a4 4 0 1 1 8 0v2h1v8H3V7zm2 0h4V5a2 2 0 1 0-4 0z" fill="currentColor"/>
        </svg>
    }
}

/// The id of the section's Save button.
pub(super) const SAVE_ID: &str = "save-fallback";

/// The Spending & Budget section.
#[component]
pub fn SpendingAndBudget(
    view: TabView,
    save: ServerAction<SaveAutomaticFallback>,
    drafts: super::Drafts,
) -> impl IntoView {
    let report = view;
    drafts.rebase_fallback(
        report.automatic_fallback,
        report.settings_version,
        save.pending().get_untracked(),
    );
    // The switch as saved, or as changed and not saved yet (`Drafts`).
    let (fallback, settings_version) = drafts
        .fallback
        .get_untracked()
        .unwrap_or((report.automatic_fallback, report.settings_version));
    let saved = report.automatic_fallback;
    let switched =
        move |ev| drafts.change_fallback(event_target_checked(&ev), saved, settings_version);
    let percent = report.used_percent.clone();
    let bar = report.bar_percent.clone();
    let status_class = match report.status {
        Status::WithinPlanBudget => "status ok",
        Status::UsingOverage => "status warn",
        Status::LimitReached => "status stop",
    };
    let edited = move || drafts.fallback.with(Option::is_some);
    let outcome = crate::ui::form_outcome(save, report.saved_form.as_deref());
    view! {
        <section class="card" aria-labelledby="spending-title">
            <header class="card-header">
                <h2 id="spending-title">"Spending & Budget"</h2>
                <p class="period" id="billing-period">
                    <span class="visually-hidden">"Current billing period: "</span>
                    {report.first_day.clone()} " – " {report.last_day.clone()}
                </p>
            </header>
            <dl class="figures">
                <div>
                    <dt>"Spent in this cycle"</dt>
                    <dd id="spent">{report.spent.clone()}</dd>
                </div>
                <div>
                    <dt>"Plan budget " <Lock/></dt>
                    <dd id="plan-budget">{report.plan_budget.clone()}</dd>
                </div>
                <div>
                    <dt>"Overage limit " <Lock/></dt>
                    <dd id="overage-limit">{report.overage_limit.clone()}</dd>
                </div>
            </dl>
            <div
                class="progress"
                role="progressbar"
                aria-label="Spent of the allowance"
                aria-valuemin="0"
                aria-valuemax="100"
                aria-valuenow=bar.clone()
                aria-valuetext=format!("{percent}%")
            >
                <div class="progress-fill" style=format!("width: {bar}%")></div>
            </div>
            <p class="progress-text">
                <span id="spent-of-allowance">{report.spent.clone()} " of " {report.allowance.clone()}</span>
                " · " <span id="used-percent">{format!("{percent}%")}</span>
            </p>
            <p class="reserved">
                "Held for requests in flight: " <span id="reserved">{report.reserved.clone()}</span>
            </p>
            <p class=status_class id="status" role="status">{report.status.label()}</p>
            <p class="resets">"Resets monthly · next reset " <span id="next-reset">{report.resets_on.clone()}</span></p>

            // See the limits form: the browser must not restore the switch.
            <ActionForm action=save attr:class="fallback-form" attr:autocomplete="off">
                <input type="hidden" name="settings_version" value=settings_version.to_string()/>
                <label class="toggle">
                    <input
                        type="checkbox"
                        role="switch"
                        name="automatic_fallback"
                        id="automatic-fallback"
                        checked=fallback
                        on:change=switched
                    />
                    <span>"Automatically switch to a cheaper model when a model limit is reached"</span>
                </label>
                <SaveButton id=SAVE_ID label="Save automatic fallback" pending=save.pending()/>
                <FormStatus id="fallback-result" outcome edited/>
            </ActionForm>
        </section>
    }
}
