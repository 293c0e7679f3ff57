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
    SIGN_IN_TO_TAB,
};
use crate::{
    api::{self, LimitInput, SaveAutomaticFallback, SaveModelLimits},
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
#[derive(Clone, Copy)]
struct Drafts {
    /// By model id.
    limits: RwSignal<HashMap<String, LimitDraft>>,
    /// The fallback switch, and the settings version it was changed from.
    fallback: RwSignal<Option<(bool, i64)>>,
}

/// A model's limit row as changed: what is unchanged is `None`.
#[derive(Clone, Debug)]
struct LimitDraft {
    /// The limit field's text.
    limit: Option<String>,
    /// The Enabled switch.
    enabled: Option<bool>,
    /// The limit's version when the change began.
    version: i64,
}

impl Drafts {
    fn new() -> Drafts {
        Drafts {
            limits: RwSignal::new(HashMap::new()),
            fallback: RwSignal::new(None),
        }
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
                let version = match typed.version.as_deref() {
                    None => 0,
                    Some(text) => match text.trim().parse() {
                        Ok(version) => version,
                        Err(_) => continue,
                    },
                };
                let Some(on) = api::checkbox_state(typed.enabled.as_deref()) else {
                    continue;
                };
                let limit = (typed.limit != row.limit_input).then(|| typed.limit.clone());
                let enabled = (on != row.limit_enabled).then_some(on);
                if limit.is_some() || enabled.is_some() {
                    drafts.entry(row.id.clone()).or_insert(LimitDraft {
                        limit,
                        enabled,
                        version,
                    });
                }
            }
        });
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
    Effect::new(move |_| {
        if matches!(save_fallback.value().get(), Some(Ok(()))) {
            drafts.fallback.set(None);
            refocus.set(Some(
                focused_id().unwrap_or_else(|| spending::SAVE_ID.to_owned()),
            ));
            saved.update(|n| *n += 1);
        }
    });
    Effect::new(move |_| {
        if matches!(save_limits.value().get(), Some(Ok(()))) {
            drafts.limits.update(HashMap::clear);
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
                                <a href="/admin/token-limits" aria-current="page">"Token Limits"</a>
                            </nav>
                            {tab}
                        </main>
                    </AppShell>
                }.into_any()
            })}
        </Suspense>
    }
}
