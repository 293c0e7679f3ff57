//! The Token Limits tab of the Admin Panel (DESIGN.md §3): Spending & Budget, Model
//! limits, Spend by model (this cycle). One section a file.

mod model_limits;
mod spend_by_model;
mod spending;

use leptos::prelude::*;
use leptos_meta::Title;

use super::layout::{use_current_user, AppShell, Section};
use crate::{
    api::{self, SaveAutomaticFallback, SaveModelLimits},
    error::ApiError,
};

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
    Effect::new(move |_| {
        if matches!(save_fallback.value().get(), Some(Ok(()))) {
            saved.update(|n| *n += 1);
        }
    });
    Effect::new(move |_| {
        if matches!(save_limits.value().get(), Some(Ok(()))) {
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
                view! {
                    <AppShell user=user current=Section::Admin>
                        <main>
                            <h1>"Admin Panel"</h1>
                            <nav class="tabs" aria-label="Admin Panel">
                                <a href="/admin/token-limits" aria-current="page">"Token Limits"</a>
                            </nav>
                            {match report {
                                Ok(report) => view! {
                                    <spending::SpendingAndBudget view=report.clone() save=save_fallback/>
                                    <model_limits::ModelLimits view=report.clone() save=save_limits/>
                                    <spend_by_model::SpendByModel view=report/>
                                }.into_any(),
                                Err(ApiError::Forbidden) => view! {
                                    <h2>"No access"</h2>
                                    <p>"The Admin Panel is for administrators of the workspace."</p>
                                }.into_any(),
                                Err(ApiError::Unauthorized) => view! {
                                    <p><a href="/login?next=%2Fadmin%2Ftoken-limits">"Sign in"</a>" to see the token limits."</p>
                                }.into_any(),
                                Err(e) => view! {
                                    <p class="form-error" role="alert">{e.to_string()}</p>
                                }.into_any(),
                            }}
                        </main>
                    </AppShell>
                }
            })}
        </Suspense>
    }
}
