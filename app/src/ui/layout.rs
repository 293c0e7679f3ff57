//! The app shell: sidebar (with *Admin* at the bottom, for administrators only) and
//! the content area.

use leptos::prelude::*;

use crate::{
    api::{self, Logout},
    auth::{CurrentUser, Role},
};

/// Which sidebar entry is current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// The start page.
    Home,
    /// The Admin Panel.
    Admin,
}

/// The shell around a page, for the signed-in `user`, or for a visitor signed
/// out (`None`).
#[component]
pub fn AppShell(user: Option<CurrentUser>, current: Section, children: Children) -> impl IntoView {
    let is_admin = user.as_ref().is_some_and(|u| u.role == Role::Admin);
    let logout = ServerAction::<Logout>::new();
    // Signed out (the session ended while the page was open, or Back after
    // signing out): no email and no Sign out, but the way back in.
    let account = match user {
        Some(user) => view! {
            <p class="signed-in">{user.email}</p>
            <ActionForm action=logout>
                <button type="submit" class="link-button">"Sign out"</button>
            </ActionForm>
        }
        .into_any(),
        None => view! { <a href="/login">"Sign in"</a> }.into_any(),
    };
    let aria = move |section: Section| (current == section).then_some("page");
    view! {
        <div class="shell">
            <nav class="sidebar" aria-label="Main">
                <a class="brand" href="/">"Tollgate"</a>
                <ul class="nav">
                    <li><a href="/" aria-current=aria(Section::Home)>"Home"</a></li>
                </ul>
                <div class="sidebar-bottom">
                    <Show when=move || is_admin>
                        <a class="nav-admin" href=super::TAB aria-current=aria(Section::Admin)>"Admin"</a>
                    </Show>
                    {account}
                </div>
            </nav>
            <div class="content">{children()}</div>
        </div>
    }
}

/// The signed-in user for the shell, loaded with the page.
pub fn use_current_user() -> Resource<Result<Option<CurrentUser>, crate::error::ApiError>> {
    Resource::new(|| (), |_| api::me())
}
