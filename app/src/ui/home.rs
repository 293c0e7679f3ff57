//! The start page: who is signed in and how to reach the gateway.

use leptos::prelude::*;
use leptos_meta::Title;

use super::layout::{use_current_user, AppShell, Section};

/// The start page, for every signed-in user.
#[component]
pub fn HomePage() -> impl IntoView {
    let user = use_current_user();
    view! {
        <Title text="Home"/>
        <Suspense fallback=|| view! { <p>"Loading…"</p> }>
            {move || Suspend::new(async move {
                let user = user.await.ok().flatten();
                view! {
                    <AppShell user=user current=Section::Home>
                        <main>
                            <h1>"Tollgate"</h1>
                            <p>
                                "Every request of the workspace to a language model goes through this gateway, "
                                "which prices it in euros and keeps the workspace within its plan and model limits."
                            </p>
                            <h2>"Using the gateway"</h2>
                            <p>
                                "Point any OpenAI SDK at this server's " <code>"/v1"</code>
                                " path and use the API key an operator created for you with "
                                <code>"tollgate key create"</code> "."
                            </p>
                        </main>
                    </AppShell>
                }
            })}
        </Suspense>
    }
}
