//! The login page (DESIGN.md §5).

use leptos::prelude::*;
use leptos_meta::Title;
use leptos_router::{
    hooks::{use_navigate, use_query_map},
    NavigateOptions,
};

use crate::api::{self, Login};

/// Email and password form; sends the user on to `?next=` after signing in,
/// when their role may open it, else to their start page
/// ([`crate::auth::landing`]). Says why when a save was refused as signed
/// out (`?reason=signed_out`), and leads a user signed in already straight on.
#[component]
pub fn LoginPage() -> impl IntoView {
    let login = ServerAction::<Login>::new();
    let query = use_query_map();
    let next = move || {
        query
            .read()
            .get("next")
            .unwrap_or_else(|| crate::ui::TAB.into())
    };
    let signed_out =
        move || query.read().get("reason").as_deref() == Some(crate::ui::SIGNED_OUT_REASON);
    // Signed in already, the page leads on as the server does for a request
    // (Back after signing in, which the browser's router answers without
    // one): the form would only let someone else replace the session.
    let me = LocalResource::new(api::me);
    let navigate = use_navigate();
    Effect::new(move |_| {
        if let Some(Ok(Some(user))) = me.get() {
            let landing = crate::auth::landing(Some(&next()), user.role);
            navigate(
                &landing,
                NavigateOptions {
                    replace: true,
                    ..Default::default()
                },
            );
        }
    });
    let outcome = crate::ui::form_outcome(login, None);
    let error = move || outcome().and_then(|r| r.err()).map(|e| e.to_string());
    view! {
        <Title text="Sign in"/>
        <main class="centered login">
            <h1>"Sign in to Tollgate"</h1>
            <Show when=signed_out>
                <p class="notice" role="status" id="signed-out">
                    "You were signed out, so your change was not saved. Sign in, then make it again."
                </p>
            </Show>
            <ActionForm action=login>
                <input type="hidden" name="next" value=next/>
                <label for="email">"Email"</label>
                // Text, not `type="email"`: browsers refuse an address whose
                // local part has a letter outside ASCII (`zoë@…`), which the
                // workspace's users may have (README).
                <input
                    id="email"
                    name="email"
                    type="text"
                    inputmode="email"
                    autocomplete="username"
                    autocapitalize="none"
                    spellcheck="false"
                    required
                />
                <label for="password">"Password"</label>
                <input id="password" name="password" type="password" autocomplete="current-password" required/>
                <p class="form-error" role="alert" id="login-error">{error}</p>
                <button type="submit">"Sign in"</button>
            </ActionForm>
        </main>
    }
}
