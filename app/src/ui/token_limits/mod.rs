//! The Token Limits tab of the Admin Panel (DESIGN.md §3): Spending & Budget, Model
//! limits, Spend by model (this cycle). One section a file.

mod model_limits;
mod spend_by_model;
mod spending;

use std::collections::HashMap;

use leptos::prelude::*;
use leptos_meta::Title;

use super::{
    focus_by_id, focused_id,
    layout::{use_current_user, AppShell, Section},
    no_access::NoAccess,
    unsaved::{replay_early_input, track_unsaved},
    SIGN_IN_TO_TAB, TAB,
};
use crate::{
    api::{self, LimitInput, SaveAutomaticFallback, SaveModelLimits},
    domain::parse_eur_input,
    error::ApiError,
    report::ModelRowView,
};

/// What the administrator changed in the tab's forms and has not saved yet.
///
/// A successful save reloads the tab's numbers, and its sections are drawn
/// again from them: without these, a save of one form would put the other's
/// fields back to their saved values, and the changes typed there would be
/// lost without a word. A form's own successful save drops its drafts. Each
/// draft keeps the version it was made from, which its save sends: a change
/// saved meanwhile by someone else is then refused (409), not overwritten.
///
/// A save sends the drafts of its form as they are when it starts (`sent_*`);
/// its success drops only those, so a change made while it was on its way is
/// kept. Such a change to a row the save itself changed is then rebased on
/// the version that save wrote, once the numbers are reloaded (`rebase`).
#[derive(Clone, Copy)]
struct Drafts {
    /// By model id.
    limits: RwSignal<HashMap<String, LimitDraft>>,
    /// The fallback switch, and the settings version it was changed from.
    fallback: RwSignal<Option<(bool, i64)>>,
    /// The limit drafts the last save of the limits form sent.
    sent_limits: StoredValue<HashMap<String, LimitDraft>>,
    /// The fallback draft the last save of the fallback form sent.
    sent_fallback: StoredValue<Option<(bool, i64)>>,
}

/// A model's limit row as changed: what is unchanged is `None`.
#[derive(Clone, Debug, PartialEq)]
struct LimitDraft {
    /// The limit field's text.
    limit: Option<String>,
    /// The Enabled switch.
    enabled: Option<bool>,
    /// The limit's version when the change began.
    version: i64,
}

impl LimitDraft {
    /// Drops from the draft what holds the saved `row` again (the same amount,
    /// however written; the same switch), and says whether anything is left.
    fn differs_from(&mut self, row: &ModelRowView) -> bool {
        if self
            .limit
            .as_deref()
            .is_some_and(|text| same_amount(text, &row.limit_input))
        {
            self.limit = None;
        }
        if self.enabled == Some(row.limit_enabled) {
            self.enabled = None;
        }
        self.limit.is_some() || self.enabled.is_some()
    }

    /// Whether `other` is the same change: the same amount however written,
    /// the same switch, on the same version.
    fn same_change(&self, other: &LimitDraft) -> bool {
        let same_limit = match (&self.limit, &other.limit) {
            (Some(a), Some(b)) => same_amount(a, b),
            (a, b) => a == b,
        };
        same_limit && self.enabled == other.enabled && self.version == other.version
    }
}

/// Whether a draft begun on `draft_version`, kept because it changed while a
/// save sent on `sent_version` was on its way, is to be moved to `current`,
/// the version of the reloaded numbers: only if they hold what was sent
/// (`holds_sent`) at exactly one version past it, which that save wrote.
fn written_by_the_save(
    draft_version: i64,
    sent_version: i64,
    current: i64,
    holds_sent: bool,
) -> bool {
    draft_version == sent_version && current == sent_version + 1 && holds_sent
}

impl Drafts {
    fn new() -> Drafts {
        Drafts {
            limits: RwSignal::new(HashMap::new()),
            fallback: RwSignal::new(None),
            sent_limits: StoredValue::new(HashMap::new()),
            sent_fallback: StoredValue::new(None),
        }
    }

    /// Records `apply` to the draft of the limit row `row`, begun on `version`;
    /// a draft that then holds the saved row again (the same amount, however
    /// written, and the same switch) is dropped: nothing is left to save.
    /// While a save that sent this row is on its way, the draft stays even
    /// then: that save may change what is saved.
    fn change_limit(self, row: &ModelRowView, version: i64, apply: impl FnOnce(&mut LimitDraft)) {
        let in_flight = self
            .sent_limits
            .with_value(|sent| sent.contains_key(&row.id));
        self.limits.update(|drafts| {
            let draft = drafts.entry(row.id.clone()).or_insert(LimitDraft {
                limit: None,
                enabled: None,
                version,
            });
            apply(draft);
            if !in_flight && !draft.differs_from(row) {
                drafts.remove(&row.id);
            }
        });
    }

    /// Records the fallback switch turned to `on` from the settings `version`
    /// shown with `saved`; turned back to `saved`, no draft is left (unless a
    /// save of the switch is on its way, which may change what is saved).
    fn change_fallback(self, on: bool, saved: bool, version: i64) {
        let in_flight = self.sent_fallback.with_value(Option::is_some);
        self.fallback
            .set((on != saved || in_flight).then_some((on, version)));
    }

    /// A save of the limits form has succeeded: drops the drafts it sent,
    /// keeping those changed since (to another amount: `20.00` typed while
    /// `20` was on its way is what was saved).
    fn limits_saved(self) {
        let sent = self.sent_limits.get_value();
        self.limits.update(|drafts| {
            drafts.retain(|id, draft| !sent.get(id).is_some_and(|was| draft.same_change(was)))
        });
    }

    /// A save of the fallback form has succeeded: drops the draft it sent,
    /// unless the switch was turned since.
    fn fallback_saved(self) {
        let sent = self.sent_fallback.get_value();
        if self.fallback.get_untracked() == sent {
            self.fallback.set(None);
        }
    }

    /// A save of the limits form has been refused: nothing it sent was saved.
    fn limits_refused(self) {
        self.sent_limits.set_value(HashMap::new());
    }

    /// A save of the fallback form has been refused: nothing it sent was saved.
    fn fallback_refused(self) {
        self.sent_fallback.set_value(None);
    }

    /// [`Drafts::rebase`] for the fallback switch, saved as `saved` at the
    /// settings `version` in the reloaded numbers.
    fn rebase_fallback(self, saved: bool, version: i64, pending: bool) {
        if pending {
            return;
        }
        let Some((sent_on, sent_version)) = self.sent_fallback.get_value() else {
            return;
        };
        self.sent_fallback.set_value(None);
        self.fallback.update_untracked(|draft| {
            if let Some((_, draft_version)) = draft {
                if written_by_the_save(*draft_version, sent_version, version, saved == sent_on) {
                    *draft_version = version;
                }
            }
        });
    }

    /// Once the numbers are reloaded after a save of the limits form: a draft
    /// kept because it changed while the save was on its way, on a row that
    /// save changed, is moved to the version that save wrote, if the row
    /// holds what the save sent at exactly one version past the one it was
    /// sent on (anything else was changed by someone else too, and the draft
    /// keeps its version, to be refused as a conflict). Not while the save is
    /// still on its way (the other form's save drew the tab again).
    fn rebase(self, rows: &[ModelRowView], pending: bool) {
        if pending {
            return;
        }
        let sent = self.sent_limits.get_value();
        if sent.is_empty() {
            return;
        }
        self.sent_limits.set_value(HashMap::new());
        self.limits.update_untracked(|drafts| {
            for (id, draft) in drafts.iter_mut() {
                let (Some(was), Some(row)) = (sent.get(id), rows.iter().find(|r| &r.id == id))
                else {
                    continue;
                };
                let holds_sent = was
                    .limit
                    .as_deref()
                    .is_none_or(|text| same_amount(text, &row.limit_input))
                    && was.enabled.is_none_or(|on| on == row.limit_enabled);
                if written_by_the_save(draft.version, was.version, row.limit_version, holds_sent) {
                    draft.version = row.limit_version;
                }
            }
        });
    }

    /// Whether either form holds a change not saved (tracked).
    fn any(self) -> bool {
        self.fallback.with(Option::is_some) || self.limits.with(|d| !d.is_empty())
    }

    /// Takes the rows of a Model limits form refused without JavaScript
    /// (`TabView::refused_limits`) as changes: each that differs from its saved
    /// row in `rows` and has no change yet, on the version it was typed on, so
    /// that saved again it is still refused if someone changed it meanwhile.
    /// A row whose version or switch the page could not have sent is left out.
    fn take_refused(self, rows: &[ModelRowView], refused: &[LimitInput]) {
        if refused.is_empty() {
            return;
        }
        self.limits.update_untracked(|drafts| {
            for typed in refused {
                let Some(row) = rows.iter().find(|row| row.id == typed.model) else {
                    continue;
                };
                let Ok(version) = typed.version.trim().parse() else {
                    continue;
                };
                let Some(on) = api::checkbox_state(typed.enabled.as_deref()) else {
                    continue;
                };
                let mut draft = LimitDraft {
                    limit: Some(typed.limit.clone()),
                    enabled: Some(on),
                    version,
                };
                if draft.differs_from(row) {
                    drafts.entry(row.id.clone()).or_insert(draft);
                }
            }
        });
    }
}

/// Whether two texts of the Limit field are the same limit: both empty (the
/// shared pool), or the same amount however written (`5`, `€5.00`, `5,0`).
fn same_amount(a: &str, b: &str) -> bool {
    match (a.trim().is_empty(), b.trim().is_empty()) {
        (true, true) => true,
        (false, false) => match (parse_eur_input(a), parse_eur_input(b)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        },
        _ => false,
    }
}

/// Takes what was typed or switched in the tab's forms before the page came
/// alive as changes, once the forms are live (`unsaved::replay_early_input`).
#[component]
fn KeepEarlyInput() -> impl IntoView {
    Effect::new(move |_| replay_early_input());
}

/// Gives the keyboard's focus to the element whose id `target` holds, once
/// the sections before it are drawn and the ones they replace are gone, and
/// empties `target`.
#[component]
fn RestoreFocus(target: RwSignal<Option<String>>) -> impl IntoView {
    Effect::new(move |_| {
        let Some(id) = target.get_untracked() else {
            return;
        };
        target.set(None);
        // At the next frame: until then the sections drawn before may still be
        // in the page, holding elements of the same ids.
        request_animation_frame(move || focus_by_id(&id));
    });
}

/// The Admin Panel with the Token Limits tab open.
#[component]
pub fn TokenLimitsPage() -> impl IntoView {
    let user = use_current_user();
    let save_fallback = ServerAction::<SaveAutomaticFallback>::new();
    let save_limits = ServerAction::<SaveModelLimits>::new();
    // Reload the numbers after a successful save only: after a refused one the
    // form keeps what the administrator typed, next to its error. One effect
    // per form, each reading only its own answer: an effect tracks what its
    // last run read, so one that read the fallback's success first (`||`) and
    // stopped there stopped hearing the limits' saves, and the limits form
    // kept versions that its next save was refused (409) for.
    let saved = RwSignal::new(0u32);
    let drafts = Drafts::new();
    // Leaving with changes not saved asks first.
    track_unsaved(move || drafts.any());
    // A successful save draws the sections again, which would leave the
    // keyboard's focus on the page's body: the element that had it (the Save
    // button, or the field Enter was pressed in) takes it back once drawn.
    let refocus = RwSignal::new(None::<String>);
    // What each save sends: its form's drafts as they are when it starts.
    Effect::new(move |_| {
        if save_fallback.pending().get() {
            drafts
                .sent_fallback
                .set_value(drafts.fallback.get_untracked());
        }
    });
    Effect::new(move |_| {
        if save_limits.pending().get() {
            drafts.sent_limits.set_value(drafts.limits.get_untracked());
        }
    });
    Effect::new(move |_| {
        if matches!(save_fallback.value().get(), Some(Err(_))) {
            drafts.fallback_refused();
        }
        if matches!(save_fallback.value().get(), Some(Ok(()))) {
            drafts.fallback_saved();
            refocus.set(Some(
                focused_id().unwrap_or_else(|| spending::SAVE_ID.to_owned()),
            ));
            saved.update(|n| *n += 1);
        }
    });
    Effect::new(move |_| {
        if matches!(save_limits.value().get(), Some(Err(_))) {
            drafts.limits_refused();
        }
        if matches!(save_limits.value().get(), Some(Ok(()))) {
            drafts.limits_saved();
            refocus.set(Some(
                focused_id().unwrap_or_else(|| model_limits::SAVE_ID.to_owned()),
            ));
            saved.update(|n| *n += 1);
        }
    });
    let report = Resource::new(move || saved.get(), |_| api::token_limits());

    view! {
        <Title text="Token Limits"/>
        <Suspense fallback=|| view! { <p>"Loading…"</p> }>
            {move || Suspend::new(async move {
                let user = user.await.ok().flatten();
                let report = report.await;
                let tab = match report {
                    Ok(report) => view! {
                        <spending::SpendingAndBudget view=report.clone() save=save_fallback drafts=drafts/>
                        <model_limits::ModelLimits view=report.clone() save=save_limits drafts=drafts/>
                        <spend_by_model::SpendByModel view=report/>
                        <RestoreFocus target=refocus/>
                        <KeepEarlyInput/>
                    }.into_any(),
                    // The role was taken away while the tab was open.
                    Err(ApiError::Forbidden) => {
                        return view! {
                            <AppShell user=user current=Section::Admin>
                                <NoAccess/>
                            </AppShell>
                        }.into_any();
                    }
                    Err(ApiError::Unauthorized) => view! {
                        <p><a href=SIGN_IN_TO_TAB>"Sign in"</a>" to see the token limits."</p>
                    }.into_any(),
                    Err(e) => view! {
                        <p class="form-error" role="alert">{e.to_string()}</p>
                    }.into_any(),
                };
                view! {
                    <AppShell user=user current=Section::Admin>
                        <main>
                            <h1>"Admin Panel"</h1>
                            <nav class="tabs" aria-label="Admin Panel">
                                <a href=TAB aria-current="page">"Token Limits"</a>
                            </nav>
                            {tab}
                        </main>
                    </AppShell>
                }.into_any()
            })}
        </Suspense>
    }
}
