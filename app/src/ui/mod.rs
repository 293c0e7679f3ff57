//! Components and pages.

use leptos::prelude::*;
use leptos_meta::{provide_meta_context, Link, MetaTags, Stylesheet, Title};
use leptos_router::{
    components::{Route, Router, Routes},
    StaticSegment,
};

use crate::api;

/// The HTML document around the app, rendered on the server only.
pub fn shell(options: LeptosOptions) -> impl IntoView {
    view! {
        <!DOCTYPE html>
        <html lang="en">
            <head>
                <meta charset="utf-8"/>
                <meta name="viewport" content="width=device-width, initial-scale=1"/>
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

/// The root component: metadata and routes.
#[component]
pub fn App() -> impl IntoView {
    provide_meta_context();
    view! {
        <Stylesheet id="leptos" href="/pkg/tollgate.css"/>
        <Link rel="icon" type_="image/svg+xml" href="/favicon.svg"/>
        <Title text="Tollgate"/>
        <Router>
            <Routes fallback=|| view! { <p>"Page not found."</p> }>
                <Route path=StaticSegment("") view=HomePage/>
            </Routes>
        </Router>
    }
}

/// The landing page: proves the whole path (render, hydrate, server function,
/// store, database) works.
#[component]
fn HomePage() -> impl IntoView {
    // Effects run only in the browser, so this flips once hydration has happened;
    // tests wait for the attribute instead of sleeping.
    let hydrated = RwSignal::new(false);
    Effect::new(move |_| hydrated.set(true));

    let load = Action::new(|_: &()| api::workspace());
    let answer = move || match load.value().get() {
        None => String::new(),
        Some(Ok(view)) => format!("Workspace: {}", view.name),
        Some(Err(e)) => format!("Could not read the workspace: {e}"),
    };

    view! {
        <main data-hydrated=move || hydrated.get().to_string()>
            <h1>"Tollgate"</h1>
            <button on:click=move |_| {
                load.dispatch(());
            }>"Check database"</button>
            <p role="status" id="workspace-answer">{answer}</p>
        </main>
    }
}
