//! What a signed-in user who is not an administrator sees of the Admin Panel
//! (DESIGN.md §5): one page, whether the server refused the address (403) or
//! the tab found its call refused while open.

use leptos::prelude::*;

/// "No access", why, and the way to the start page.
#[component]
pub fn NoAccess() -> impl IntoView {
    view! {
        <main class="centered">
            <h1>"No access"</h1>
            <p>"The Admin Panel is for administrators of the workspace."</p>
            <p><a href="/">"Go to the start page"</a></p>
        </main>
    }
}

/// The whole HTML document of [`NoAccess`], which the server answers with 403
/// before any page of the panel is rendered (DESIGN.md §5).
#[cfg(feature = "ssr")]
pub fn no_access_document() -> String {
    let main = view! { <NoAccess/> }.to_html();
    format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>No access · Tollgate</title>\
         <link rel=\"stylesheet\" href=\"/pkg/tollgate.css\"></head><body>{main}</body></html>"
    )
}
