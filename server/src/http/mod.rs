//! The axum router: Leptos pages and server functions, the embedded site, health.

use app::{
    shell,
    store::{SharedStore, StoreError},
    App,
};
use axum::{
    body::Body,
    extract::{FromRef, Request, State},
    http::{header, HeaderName, HeaderValue, Method, StatusCode, Uri},
    middleware::{self, Next},
    response::{IntoResponse, Redirect, Response},
    routing::get,
    Router,
};
use leptos::{config::LeptosOptions, prelude::provide_context};
use leptos_axum::{generate_route_list, AxumRouteListing, LeptosRoutes};

use tower_http::{compression::CompressionLayer, set_header::SetResponseHeaderLayer};
use tower_sessions::{cookie::SameSite, Expiry, SessionManagerLayer};

mod drain;
mod serve;
mod spend;

pub use serve::{serve, ServeOptions};

use crate::{
    assets,
    auth::{
        middleware::{authorize, AuthState},
        sessions::SessionBackend,
    },
};

/// What every handler can reach.
#[derive(Clone, FromRef)]
pub struct AppState {
    /// Leptos rendering options (output name, site folders).
    pub leptos_options: LeptosOptions,
    /// The database behind the `Store` port.
    pub store: SharedStore,
    /// The operator's configuration.
    pub config: std::sync::Arc<crate::config::Config>,
    /// The OpenAI-compatible gateway, the usage API and the metrics.
    pub gateway: crate::gateway::SharedGateway,
}

impl AppState {
    /// The state for `config` over `store`. Tests and `tollgate serve` build it the
    /// same way.
    pub fn new(config: std::sync::Arc<crate::config::Config>, store: SharedStore) -> AppState {
        AppState {
            leptos_options: assets::leptos_options(config.listen),
            gateway: crate::gateway::Gateway::from_env(&config, store.clone()),
            store,
            config,
        }
    }
}

/// The panel's routes, generated once per process.
///
/// Leptos generates them by running the app with resource loading switched off
/// for the whole process (`SuppressResourceLoad`, one global flag): a page that
/// another router of the same process rendered meanwhile would wait forever for
/// its resources (leptos-rs/leptos#4773). `tollgate serve` builds one router before
/// it serves, but the tests build one each while others render, and hung now and
/// then. Generated once, before any router exists, the flag is never set while a
/// page renders.
fn panel_routes() -> Vec<AxumRouteListing> {
    static ROUTES: std::sync::LazyLock<Vec<AxumRouteListing>> =
        std::sync::LazyLock::new(|| generate_route_list(App));
    ROUTES.clone()
}

/// Build the whole HTTP surface over `state`: the admin panel (pages and server
/// functions, behind sessions and the access middleware) and health.
pub fn router(state: AppState, sessions: SessionBackend) -> Router {
    let routes = panel_routes();
    let context = leptos_context(&state);
    let options = state.leptos_options.clone();
    let auth = AuthState::new(state.store.clone());
    let session_layer = SessionManagerLayer::new(sessions)
        .with_name("tollgate_session")
        .with_http_only(true)
        .with_same_site(SameSite::Strict)
        .with_secure(state.config.secure_cookies)
        .with_expiry(Expiry::OnInactivity(time::Duration::hours(8)));
    let mut panel = Router::new()
        .leptos_routes_with_context(&state, routes, context, move || shell(options.clone()))
        .fallback(fallback)
        .layer(middleware::from_fn_with_state(auth, authorize))
        .layer(middleware::from_fn(tidy_location))
        .layer(session_layer)
        // Pages and the site (the wasm shrinks to about a third) are compressed;
        // the gateway's routes are not, so a stream's events are never held back.
        .layer(CompressionLayer::new());
    for (name, value) in PANEL_HEADERS {
        panel = panel.layer(SetResponseHeaderLayer::if_not_present(
            name,
            HeaderValue::from_static(value),
        ));
    }
    Router::new()
        .route(
            "/healthz",
            get(healthz).fallback(crate::gateway::method_not_allowed),
        )
        .route(
            "/api/v1/spend",
            get(spend::spend).fallback(crate::gateway::method_not_allowed),
        )
        .merge(crate::gateway::routes())
        .merge(panel)
        .layer(middleware::from_fn_with_state(
            drain::Limits::of(&state.config),
            drain::drain_unread,
        ))
        .with_state(state)
}

/// Headers on every answer of the panel (pages, server functions, the site's
/// files), for browsers:
/// - no other site may show the panel in a frame, where a click on it could be
///   stolen (`X-Frame-Options`, and `frame-ancestors` for browsers that read
///   only the policy);
/// - a file is only ever run as the type it is served as (`nosniff`);
/// - the panel's addresses are never sent to other sites, while its own forms
///   keep theirs: a form posted without JavaScript is sent back to the page it
///   came from (its `Referer`), with any error;
/// - pages and server functions' answers are never stored (`no-store`): Back
///   after signing out would otherwise show the tab from the browser's cache.
///   The site's files say otherwise themselves (`assets::serve`).
const PANEL_HEADERS: [(HeaderName, &str); 5] = [
    (header::X_FRAME_OPTIONS, "DENY"),
    (header::CONTENT_SECURITY_POLICY, "frame-ancestors 'none'"),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::REFERRER_POLICY, "same-origin"),
    (header::CACHE_CONTROL, "no-store"),
];

/// Tidies the address a form posted without JavaScript is sent back to
/// (server_fn's redirect to its `Referer`, see [`tidied_location`]), and sends
/// the redirect without a body.
async fn tidy_location(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let sent_to_sign_in = response
        .extensions()
        .get::<crate::auth::middleware::SentToSignIn>()
        .is_some();
    if !response.status().is_redirection() || sent_to_sign_in {
        return response;
    }
    // server_fn answers a form's post with its result in JSON beside the
    // redirect, which no browser shows: the redirect goes without it.
    *response.body_mut() = Body::empty();
    response.headers_mut().remove(header::CONTENT_TYPE);
    response.headers_mut().remove(header::CONTENT_LENGTH);
    let tidied = response
        .headers()
        .get(header::LOCATION)
        .and_then(|location| location.to_str().ok())
        .and_then(|location| {
            let tidied = tidied_location(location);
            (tidied != location).then_some(tidied)
        })
        .and_then(|location| HeaderValue::from_str(&location).ok());
    if let Some(location) = tidied {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

/// `location` with the error of the last post only, its sentences the fixed
/// ones of its codes ([`app::error::ApiError::fixed_in_address`]). A save that
/// succeeded is told to its page through the session, not the address, so that
/// a reload does not say it again (`app::api`, `TabView::saved_form`).
///
/// server_fn adds a refused post's error (`__path` and `__err`) to the page's
/// address and takes them out when a post succeeds: a page refused again kept
/// every earlier error in its address, which grew by some 350 characters each
/// time, until the browser sent too long a `Referer` no more and the form's
/// next error was lost. A bare `?` (the address held only an error, taken out)
/// goes as well.
fn tidied_location(location: &str) -> String {
    let (page, query) = location.split_once('?').unwrap_or((location, ""));
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let last = |key: &str| pairs.iter().rposition(|(name, _)| name == key);
    let (last_path, last_error) = (last("__path"), last("__err"));
    // The error's own sentences may quote what was typed: the address gets
    // the fixed ones, which are all the page shows.
    let fixed = last_error.and_then(|at| app::error::ApiError::fixed_in_address(&pairs[at].1));
    let kept: Vec<(&str, &str)> = pairs
        .iter()
        .enumerate()
        .filter(|(at, (name, _))| match name.as_str() {
            "__path" => Some(*at) == last_path,
            "__err" => Some(*at) == last_error,
            _ => true,
        })
        .map(|(at, (name, value))| match &fixed {
            Some(fixed) if Some(at) == last_error => (name.as_str(), fixed.as_str()),
            _ => (name.as_str(), value.as_str()),
        })
        .collect();
    if kept.is_empty() {
        return page.to_owned();
    }
    let query = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(kept)
        .finish();
    format!("{page}?{query}")
}

/// What server functions and pages find in the Leptos context.
fn leptos_context(state: &AppState) -> impl Fn() + Clone + Send + Sync + 'static {
    let store = state.store.clone();
    let catalog = state.config.setup.catalog.clone();
    move || {
        provide_context(store.clone());
        provide_context(catalog.clone());
    }
}

/// How long `/healthz` waits for the database.
pub const HEALTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Answer a health probe: `ok` (200) while the process serves HTTP, its
/// database answers a read within [`HEALTH_TIMEOUT`], no write of the process
/// has been held up that long (`Store::write_held_for`), the write lock a
/// write of the process found held by another process is free again and a
/// database a write found unable to take writes takes them again
/// (`Store::check_write_lock`); otherwise 503 Service
/// Unavailable with the reason in a line of text, so that a load balancer stops
/// sending requests that could only fail (nothing can be admitted without the
/// books).
async fn healthz(State(state): State<AppState>) -> Response {
    if let Some(held) = state
        .store
        .write_held_for()
        .filter(|held| *held >= HEALTH_TIMEOUT)
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "writes to the database have been held up for {} s",
                held.as_secs()
            ),
        )
            .into_response();
    }
    match tokio::time::timeout(HEALTH_TIMEOUT, state.store.check_write_lock()).await {
        Ok(Ok(())) => {}
        Ok(Err(StoreError::Busy(_))) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "another process holds the database's write lock",
            )
                .into_response()
        }
        Ok(Err(StoreError::Unavailable(e))) => {
            tracing::warn!(error = %e, "health check: the database cannot take writes");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "the database cannot be reached or cannot take writes",
            )
                .into_response();
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "health check: the database failed a write-lock check");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "the database failed a write-lock check",
            )
                .into_response();
        }
        Err(_) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the database did not take a write check within {} s",
                    HEALTH_TIMEOUT.as_secs()
                ),
            )
                .into_response()
        }
    }
    let problem = match tokio::time::timeout(HEALTH_TIMEOUT, state.store.workspace()).await {
        Ok(Ok(_)) => return "ok".into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "health check: the database failed a read");
            "the database failed a read".to_owned()
        }
        Err(_) => format!(
            "the database did not answer within {} s",
            HEALTH_TIMEOUT.as_secs()
        ),
    };
    (StatusCode::SERVICE_UNAVAILABLE, problem).into_response()
}

/// Serve an embedded file, answer an unknown server function in JSON (404,
/// code `unknown_server_function`), send a page's path written another way (a
/// trailing slash, `//`, `/./`, `/../`) to its canonical path (308), or render
/// the app's "not found" page with status 404.
async fn fallback(State(state): State<AppState>, request: Request<Body>) -> Response {
    if let Some(response) = assets::serve(request.uri().path(), request.headers()) {
        return response;
    }
    let canonical = crate::auth::middleware::canonical_path(request.uri().path());
    if canonical == "/fn" || canonical.starts_with("/fn/") {
        // Callers of server functions read JSON errors, not the HTML page.
        return (
            StatusCode::NOT_FOUND,
            axum::Json(serde_json::json!({
                "code": "unknown_server_function",
                "message": "There is no server function at this path.",
            })),
        )
            .into_response();
    }
    if is_api_path(&crate::auth::middleware::access_path(request.uri().path())) {
        // An API client's path in another case or spelling (`/V1/models`,
        // `/API/v1/spend`, `//v1//models`, `/v%31/models`) reads the
        // gateway's JSON 404 too, which lists the paths served.
        return crate::gateway::unknown_endpoint(
            State(state.gateway.clone()),
            request.method().clone(),
            request.uri().clone(),
        )
        .await;
    }
    if matches!(*request.method(), Method::GET | Method::HEAD) {
        if let Some(location) = canonical_location(request.uri(), canonical) {
            // The panel's router would match `/admin/token-limits/` to the tab
            // and render it under this fallback's 404: one page, one address.
            return Redirect::permanent(&location).into_response();
        }
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

/// Whether `canonical` (a canonical path, percent-decoded) is under `/v1` or
/// `/api` in any case: a path only the gateway's clients ask for.
fn is_api_path(canonical: &str) -> bool {
    let first = canonical.split('/').nth(1).unwrap_or_default();
    first.eq_ignore_ascii_case("v1") || first.eq_ignore_ascii_case("api")
}

/// `canonical`, `uri`'s canonical path (`auth::middleware::canonical_path`),
/// with `uri`'s query, when the path is written otherwise. Never starts with
/// `//`, which a browser would read as another host.
fn canonical_location(uri: &Uri, canonical: String) -> Option<String> {
    if canonical == uri.path() {
        return None;
    }
    Some(match uri.query() {
        Some(query) => format!("{canonical}?{query}"),
        None => canonical,
    })
}
