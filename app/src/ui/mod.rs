//! Components and pages.

mod home;
mod layout;
mod login;
mod no_access;
mod token_limits;
mod unsaved;

#[cfg(feature = "ssr")]
pub use no_access::no_access_document;
pub use unsaved::{EarlyInput, LEAVE_QUESTION};

use leptos::prelude::*;
use leptos_meta::{provide_meta_context, MetaTags, Title};
use leptos_router::{
    components::{Route, Router, Routes},
    path, SsrMode,
};

use crate::error::ApiError;

/// The error a server function returned to a form posted without JavaScript: the
/// server redirects back with it in the URL (`__path`, `__err`). `None` when the
/// URL carries no error, or one of another function than `path`. Anyone can
/// write such a URL, so the error's sentences are replaced by the fixed ones of
/// its codes ([`ApiError::with_fixed_text`]).
pub(crate) fn error_in_url(
    path: &'static str,
) -> impl Fn() -> Option<ApiError> + Copy + Send + Sync + 'static {
    let query = leptos_router::hooks::use_query_map();
    move || {
        let query = query.read();
        (query.get("__path").as_deref() == Some(path))
            .then(|| query.get("__err"))
            .flatten()
            .map(|err| {
                server_fn::error::ServerFnUrlError::<ApiError>::decode_err(&err).with_fixed_text()
            })
    }
}

/// What a form's server function answered, to show beside the form: the
/// answer of the last submission made on this page or, before any, the answer
/// to one posted without JavaScript: its error from the URL ([`error_in_url`]),
/// or its success when the page was read just after it (`saved_form`, from
/// `TabView::saved_form`, which the server tells once). The action's own value
/// before a submission is that same URL's error as the server read it, with
/// the sentences the URL carried, so it is not used.
pub(crate) fn form_outcome<S>(
    action: ServerAction<S>,
    saved_form: Option<&str>,
) -> impl Fn() -> Option<Result<(), ApiError>> + Copy + Send + Sync + 'static
where
    S: server_fn::ServerFn<Output = (), Error = ApiError> + Clone + Send + Sync + 'static,
{
    let error = error_in_url(S::PATH);
    let saved = saved_form == Some(S::PATH);
    move || {
        if action.version().get() == 0 {
            error().map(Err).or_else(|| saved.then_some(Ok(())))
        } else {
            action.value().get()
        }
    }
}

/// The `reason` in the login page's address when a form was posted by a
/// visitor found signed out (`/login?next=…&reason=signed_out`): the page
/// says the change was not saved.
pub const SIGNED_OUT_REASON: &str = "signed_out";

/// The Token Limits tab's address.
pub const TAB: &str = "/admin/token-limits";

/// Where a visitor found signed out on the tab signs in, to come back to it.
pub(crate) const SIGN_IN_TO_TAB: &str = "/login?next=%2Fadmin%2Ftoken-limits";

/// A form's status line, `id`: its answer ([`form_outcome`]), as "Saved." or
/// the error's sentence, with the way back in for a visitor found signed out
/// (the session ended, or was closed in another tab), and a link to the
/// current values after a conflict: the tab's address alone, loaded whole
/// (`rel="external"`), so that without JavaScript it is not the address that
/// carries the conflict, which a reload would show again. Empty before any
/// answer. Once the form holds changes made after the save, or while it was
/// on its way (`edited`), "Saved." says that those are not saved yet: alone
/// beside them it would call them saved. An error stays until the next
/// answer.
#[component]
pub(crate) fn FormStatus(
    id: &'static str,
    outcome: impl Fn() -> Option<Result<(), ApiError>> + Copy + Send + Sync + 'static,
    edited: impl Fn() -> bool + Copy + Send + Sync + 'static,
) -> impl IntoView {
    let class = move || match outcome() {
        Some(Ok(())) => "form-ok",
        Some(Err(_)) => "form-error",
        None => "",
    };
    let text = move || match outcome()? {
        Ok(()) if edited() => {
            Some(view! { "Saved. The changes made since are not saved yet." }.into_any())
        }
        Ok(()) => Some(view! { "Saved." }.into_any()),
        Err(ApiError::Unauthorized) => Some(
            view! {
                "You are signed out, so nothing was saved. "
                <a href=SIGN_IN_TO_TAB>"Sign in again"</a>
            }
            .into_any(),
        ),
        Err(ApiError::Conflict { message, .. }) => Some(
            view! {
                {message} " "
                <a href=TAB rel="external">"Load the current values"</a>
            }
            .into_any(),
        ),
        Err(e) => Some(e.to_string().into_any()),
    };
    view! { <p role="status" id=id class=class>{text}</p> }
}

/// The id of the element that has the keyboard's focus, if it has one (in
/// the browser; for effects and event handlers).
pub(crate) fn focused_id() -> Option<String> {
    document()
        .active_element()
        .map(|element| element.id())
        .filter(|id| !id.is_empty())
}

/// Gives the keyboard's focus to the element `id`, if the page has it and it
/// can take focus (in the browser; for effects and event handlers).
pub(crate) fn focus_by_id(id: &str) {
    use leptos::{wasm_bindgen::JsCast, web_sys::HtmlElement};
    let element = document()
        .get_element_by_id(id)
        .and_then(|element| element.dyn_into::<HtmlElement>().ok());
    if let Some(element) = element {
        // Refused only for an element that cannot take focus.
        let _ = element.focus();
    }
}

/// A form's submit button, named `label` for assistive technology and shown as
/// "Save". While the form's save is `pending` it reads "Saving…", says it is
/// unavailable (`aria-disabled`) and takes no click, Enter in a field included
/// (the browser submits a form from the keyboard by clicking its button): a
/// second click (a double click) would send the same versions again, and the
/// save that came second would be refused as stale (409). It is not
/// `disabled`, which would throw the keyboard's focus out of the form.
#[component]
pub(crate) fn SaveButton(
    id: &'static str,
    label: &'static str,
    #[prop(into)] pending: Signal<bool>,
) -> impl IntoView {
    let held_back = move |ev: leptos::ev::MouseEvent| {
        if pending.get_untracked() {
            ev.prevent_default();
        }
    };
    view! {
        <button
            type="submit"
            id=id
            aria-label=label
            aria-disabled=move || pending.get().then_some("true")
            on:click=held_back
        >
            {move || if pending.get() { "Saving…" } else { "Save" }}
        </button>
    }
}

/// The HTML document around the app, rendered on the server only.
pub fn shell(options: LeptosOptions) -> impl IntoView {
    view! {
        <!DOCTYPE html>
        <html lang="en">
            <head>
                <meta charset="utf-8"/>
                <meta name="viewport" content="width=device-width, initial-scale=1"/>
                // Static links belong to the server-rendered document only: the
                // browser's bundle need not carry components that never change.
                <link rel="stylesheet" id="leptos" href="/pkg/tollgate.css"/>
                <link rel="icon" type="image/svg+xml" href="/favicon.svg"/>
                <AutoReload options=options.clone()/>
                <HydrationScripts options/>
                <MetaTags/>
            </head>
            <body>
                <App/>
            </body>
        </html>
    }
}

/// The root component: metadata and routes. Pages that show data render on the
/// server only once their data is there (`SsrMode::Async`), so they read complete
/// without JavaScript.
#[component]
pub fn App() -> impl IntoView {
    provide_meta_context();
    unsaved::provide_leave_guard();
    // Effects run only in the browser: the attribute tells tests (and nothing else)
    // that the page has hydrated, so they never sleep.
    let hydrated = RwSignal::new(false);
    Effect::new(move |_| hydrated.set(true));
    view! {
        <Title formatter=|page: String| if page.is_empty() { "Tollgate".to_string() } else { format!("{page} · Tollgate") }/>
        <div id="app" data-hydrated=move || hydrated.get().to_string()>
            <Router>
                <Routes fallback=|| view! { <main class="centered"><h1>"Page not found"</h1><p><a href="/">"Go to the start page"</a></p></main> }>
                    <Route path=path!("/") view=home::HomePage ssr=SsrMode::Async/>
                    <Route path=path!("/login") view=login::LoginPage/>
                    <Route path=path!("/admin") view=token_limits::TokenLimitsPage ssr=SsrMode::Async/>
                    <Route path=path!("/admin/token-limits") view=token_limits::TokenLimitsPage ssr=SsrMode::Async/>
                </Routes>
            </Router>
        </div>
    }
}
