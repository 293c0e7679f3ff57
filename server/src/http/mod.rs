//! The axum router: Leptos pages and server functions, the embedded site, health.

use app::{shell, store::SharedStore, App};
use axum::{
    body::Body,
    extract::{FromRef, Request, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use leptos::{config::LeptosOptions, prelude::provide_context};
use leptos_axum::{generate_route_list, LeptosRoutes};

use crate::assets;

/// What every handler can reach.
#[derive(Clone, FromRef)]
pub struct AppState {
    /// Leptos rendering options (output name, site folders).
    pub leptos_options: LeptosOptions,
    /// The database behind the `Store` port.
    pub store: SharedStore,
    /// The operator's configuration.
    pub config: std::sync::Arc<crate::config::Config>,
}

/// Build the whole HTTP surface over `state`.
pub fn router(state: AppState) -> Router {
    let routes = generate_route_list(App);
    let context = leptos_context(&state);
    let options = state.leptos_options.clone();
    Router::new()
        .route("/healthz", get(healthz))
        .leptos_routes_with_context(&state, routes, context, move || shell(options.clone()))
        .fallback(fallback)
        .with_state(state)
}

/// What server functions and pages find in the Leptos context.
fn leptos_context(state: &AppState) -> impl Fn() + Clone + Send + Sync + 'static {
    let store = state.store.clone();
    move || provide_context(store.clone())
}

/// Answer a liveness probe: `ok` while the process serves HTTP.
async fn healthz() -> &'static str {
    "ok"
}

/// Serve an embedded file, or the app's "not found" page with status 404.
async fn fallback(State(state): State<AppState>, request: Request<Body>) -> Response {
    if let Some(response) = assets::serve(request.uri().path(), request.headers()) {
        return response;
    }
    let options = state.leptos_options.clone();
    let render =
        leptos_axum::render_app_to_stream_with_context(leptos_context(&state), move || {
            shell(options.clone())
        });
    let mut response = render(request).await.into_response();
    if response.status() == StatusCode::OK {
        *response.status_mut() = StatusCode::NOT_FOUND;
    }
    response
}
