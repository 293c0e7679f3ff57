//! Access control before anything renders (DESIGN.md §5, STYLE.md): the session's
//! user is looked up once, put into the request's extensions for the server
//! functions, and the route's rule is applied:
//! - `/admin...` pages: anonymous → 302 to the login page, members → 403;
//! - `/` (the start page): anonymous → 302 to the login page;
//! - `/fn/...` server functions (but `login`, `me`, `logout`): anonymous → 401,
//!   members → 403;
//! - state-changing requests to `/fn/...` from another site → 403 (CSRF);
//! - `POST /fn/login`: at most a few attempts per client address per minute.

use std::{net::SocketAddr, num::NonZeroU32, sync::Arc};

use app::{
    auth::{CurrentUser, SESSION_EPOCH, SESSION_USER_ID},
    error::ApiError,
    store::{SharedStore, StoreError},
};
use axum::{
    extract::{ConnectInfo, Request, State},
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    middleware::Next,
    response::{Html, IntoResponse, Response},
    Json,
};
use governor::{
    clock::{Clock, DefaultClock},
    DefaultKeyedRateLimiter, Quota, RateLimiter,
};
use tower_sessions::Session;

use super::arguments;

/// What the access middleware needs.
#[derive(Clone)]
pub struct AuthState {
    /// Where users are looked up.
    pub store: SharedStore,
    /// Login attempts per client IP address.
    pub login_attempts: Arc<DefaultKeyedRateLimiter<std::net::IpAddr>>,
}

impl AuthState {
    /// Login attempts allowed per address: a burst of 10, then one every
    /// [`app::error::SIGN_IN_INTERVAL_SECONDS`] (6 s).
    pub fn new(store: SharedStore) -> AuthState {
        let quota = Quota::with_period(std::time::Duration::from_secs(
            app::error::SIGN_IN_INTERVAL_SECONDS,
        ))
        .expect("the sign-in interval is not zero")
        .allow_burst(NonZeroU32::MIN.saturating_add(9));
        AuthState {
            store,
            login_attempts: Arc::new(RateLimiter::keyed(quota)),
        }
    }
}

/// The server functions anyone may call: signing in, asking who is signed in,
/// and signing out (which only ends the caller's own session).
const PUBLIC_FUNCTIONS: [&str; 3] = ["/fn/login", "/fn/me", "/fn/logout"];

enum Access {
    Public,
    SignedInPage,
    AdminPage,
    AdminFunction,
}

/// The page or function `path` names, as the panel's router reads it: its
/// dot-segments resolved as a browser resolves them (`/./a`, `/b/../a`, and
/// `%2e` for a dot; WHATWG's rules, by the `url` crate) and its empty segments
/// dropped (`//a//b/` → `/a/b`). Access is decided on this path, never on the
/// raw one, so no spelling of `/admin/token-limits` escapes its rule.
pub(crate) fn canonical_path(path: &str) -> String {
    // A fixed host: only the path of what is parsed is kept.
    let resolved = url::Url::parse(&format!("http://panel.invalid{path}"));
    let resolved = resolved.as_ref().map_or(path, url::Url::path);
    let segments: Vec<&str> = resolved.split('/').filter(|s| !s.is_empty()).collect();
    format!("/{}", segments.join("/"))
}

/// The path access is decided on: [`canonical_path`] of the percent-decoded
/// canonical path, so that `/%61dmin/token-limits` and `/%2Fadmin` are `/admin`
/// pages too.
pub(crate) fn access_path(path: &str) -> String {
    let canonical = canonical_path(path);
    canonical_path(&percent_encoding::percent_decode_str(&canonical).decode_utf8_lossy())
}

fn access(path: &str) -> Access {
    if path == "/admin" || path.starts_with("/admin/") {
        Access::AdminPage
    } else if path.starts_with("/fn/") {
        if PUBLIC_FUNCTIONS.contains(&path) {
            Access::Public
        } else {
            Access::AdminFunction
        }
    } else if path == "/" {
        Access::SignedInPage
    } else {
        Access::Public
    }
}

/// Authenticate the session and apply the route's access rule.
pub async fn authorize(
    State(state): State<AuthState>,
    session: Session,
    mut request: Request,
    next: Next,
) -> Response {
    let path = access_path(request.uri().path());
    let unsafe_method = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    // The page a form posted without JavaScript came from: checked here, and
    // where a call refused below is sent back to.
    let page = path
        .starts_with("/fn/")
        .then(|| form_page(request.headers()))
        .flatten();
    if path.starts_with("/fn/") && unsafe_method && is_cross_site(request.headers()) {
        return refuse(
            StatusCode::FORBIDDEN,
            "cross_site_request",
            "Requests from other sites cannot change anything here.",
        );
    }
    // Kept to name the argument at fault should the call be refused as malformed.
    let mut call_body = None;
    if path.starts_with("/fn/") && unsafe_method {
        (request, call_body) = match check_call(&path, request).await {
            Ok(checked) => checked,
            Err(refused) => return refused,
        };
    }
    let refused = |e: &ApiError| refuse_call(page.as_deref(), &path, e);
    if path == "/fn/login" && unsafe_method {
        let ip = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip())
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        if let Err(not_until) = state.login_attempts.check_key(&ip) {
            // Whole seconds, rounded up, as `Retry-After` counts them.
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let seconds = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
            let mut response = refused(&ApiError::RateLimited { seconds });
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            return response;
        }
    }

    let user = match current_user(&state.store, &session).await {
        Ok(user) => user,
        // Who is signed in cannot be told: every server function is refused for
        // now (503; `/fn/me` would say "signed out", and signing in or out needs
        // the database too), and so is a page that needs a user, rather than
        // sent to sign in again.
        Err(e) if path.starts_with("/fn/") => return refused(&e),
        Err(e) => match access(&path) {
            Access::Public => None,
            _ => return unavailable_page(&e),
        },
    };
    if let Some(user) = &user {
        request.extensions_mut().insert(user.clone());
    }
    let is_admin = user
        .as_ref()
        .is_some_and(|u| u.role == app::auth::Role::Admin);
    // A field the call's arguments do not take would be ignored by server_fn,
    // and the call run as if it had not been sent: refused before it runs, once
    // the caller is known to be allowed the call.
    let unknown = call_body
        .as_deref()
        .and_then(|body| std::str::from_utf8(body).ok())
        .and_then(|body| arguments::unknown_argument(&path, body))
        .map(|field| {
            ApiError::bad_arguments(&format!(
                "unknown field `{}`",
                app::text::shown_text(&field)
            ))
        });
    let response = match (access(&path), &user, unknown) {
        // Signed in already (Back after signing in, an old link): on to where
        // the sign-in would have led, not a form that is of no use.
        // A `next` a header cannot carry as it is (not ASCII) gets the form.
        (Access::Public, Some(user), _) if path == "/login" && request.method() == Method::GET => {
            let query = request.uri().query().unwrap_or_default();
            let wanted = url::form_urlencoded::parse(query.as_bytes())
                .find(|(key, _)| key == "next")
                .map(|(_, wanted)| wanted.into_owned());
            match HeaderValue::from_str(&app::auth::landing(wanted.as_deref(), user.role)) {
                Ok(location) => (StatusCode::FOUND, [(header::LOCATION, location)]).into_response(),
                Err(_) => next.run(request).await,
            }
        }
        (Access::Public, _, Some(unknown)) => refused(&unknown),
        (Access::Public, _, None) => next.run(request).await,
        (Access::SignedInPage | Access::AdminPage, None, _) => to_login(&path),
        (Access::SignedInPage, Some(_), _) => next.run(request).await,
        (Access::AdminPage, Some(_), _) if !is_admin => forbidden_page(),
        (Access::AdminFunction, None, _) => refused(&ApiError::Unauthorized),
        (Access::AdminFunction, Some(_), _) if !is_admin => refused(&ApiError::Forbidden),
        (Access::AdminFunction, Some(_), Some(unknown)) => refused(&unknown),
        (Access::AdminPage | Access::AdminFunction, Some(_), _) => next.run(request).await,
    };
    if path.starts_with("/fn/") && response.status() == StatusCode::INTERNAL_SERVER_ERROR {
        let problem = call_body
            .as_deref()
            .and_then(|body| std::str::from_utf8(body).ok())
            .and_then(|body| arguments::argument_problem(&path, body));
        return malformed_call_as_bad_request(response, problem).await;
    }
    if response.status() == StatusCode::METHOD_NOT_ALLOWED {
        return method_not_allowed(&path, response.headers().get(header::ALLOW));
    }
    response
}

/// The router's own 405, which has no body, said in the shape its callers
/// read: JSON for a server function (code `method_not_allowed`), a short page
/// for a page (`PUT /admin/token-limits`). `allow` (the methods the path
/// takes) is kept.
fn method_not_allowed(path: &str, allow: Option<&HeaderValue>) -> Response {
    let mut answer = if path.starts_with("/fn/") {
        refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "Server functions are called with POST.",
        )
    } else {
        short_page(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed",
            "Pages are read with GET; nothing was changed.",
        )
    };
    if let Some(allow) = allow {
        answer.headers_mut().insert(header::ALLOW, allow.clone());
    }
    answer
}

/// What every server function call's body must be before anything runs: not
/// compressed (415 `unsupported_content_encoding`), form-encoded (415
/// `unsupported_media_type`), and for a function that takes arguments at most
/// [`arguments::MAX_CALL_BYTES`] (413 `payload_too_large`; 400 when it cannot
/// be read). Returns the request with, for such a function, its body, kept to
/// name the argument at fault should the call be refused as malformed, or to
/// find a field its arguments do not take ([`arguments::unknown_argument`]).
async fn check_call(
    path: &str,
    request: Request,
) -> Result<(Request, Option<axum::body::Bytes>), Response> {
    if is_encoded(request.headers()) {
        return Err(refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_content_encoding",
            "Server functions take their arguments uncompressed (no Content-Encoding); \
             nothing was changed.",
        ));
    }
    if !is_form_encoded(request.headers()) {
        return Err(refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Server functions take their arguments form-encoded \
             (application/x-www-form-urlencoded); nothing was changed.",
        ));
    }
    if !arguments::takes_arguments(path) {
        return Ok((request, None));
    }
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|length| length.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > arguments::MAX_CALL_BYTES as u64) {
        return Err(refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            &format!(
                "A server function call's body is at most {} bytes; nothing was changed.",
                arguments::MAX_CALL_BYTES
            ),
        ));
    }
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, arguments::MAX_CALL_BYTES).await else {
        return Err(api_error(&ApiError::bad_arguments(&format!(
            "the body could not be read, or is larger than {} bytes",
            arguments::MAX_CALL_BYTES
        ))));
    };
    let request = Request::from_parts(parts, axum::body::Body::from(bytes.clone()));
    Ok((request, Some(bytes)))
}

/// Whether a request's body says it is compressed (any `Content-Encoding` but
/// `identity`): server functions read it as it comes.
fn is_encoded(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|encoding| !encoding.as_bytes().eq_ignore_ascii_case(b"identity"))
}

/// Whether a request's body is form-encoded, as every server function's
/// arguments are (server_fn's `PostUrl`), or says no type: a JSON body would be
/// read as a form and reported as missing its fields.
fn is_form_encoded(headers: &HeaderMap) -> bool {
    let Some(content_type) = headers.get(header::CONTENT_TYPE) else {
        return true;
    };
    content_type
        .to_str()
        .ok()
        .and_then(|text| text.parse::<mime::Mime>().ok())
        .is_some_and(|parsed| {
            parsed.essence_str() == mime::APPLICATION_WWW_FORM_URLENCODED.essence_str()
        })
}

/// A server function whose arguments could not be decoded never runs, so it cannot
/// set its status, and the server-function layer answers 500. The caller sent a
/// malformed request: answer 400 with the same body, or with `problem` (the
/// argument at fault named, [`arguments::argument_problem`]) when there is one.
async fn malformed_call_as_bad_request(response: Response, problem: Option<String>) -> Response {
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 64 * 1024).await else {
        return (StatusCode::INTERNAL_SERVER_ERROR, Json(ApiError::Internal)).into_response();
    };
    match (serde_json::from_slice::<ApiError>(&bytes), problem) {
        (Ok(ApiError::BadRequest { .. }), Some(problem)) => {
            api_error(&ApiError::bad_arguments(&problem))
        }
        (Ok(ApiError::BadRequest { .. } | ApiError::Transport { .. }), _) => {
            parts.status = StatusCode::BAD_REQUEST;
            Response::from_parts(parts, axum::body::Body::from(bytes))
        }
        _ => Response::from_parts(parts, axum::body::Body::from(bytes)),
    }
}

/// The session's user, if it is signed in, enabled, and was not disabled nor given
/// a new password since it signed in (its session epoch is the user's). A session
/// without an epoch was signed in by a version that kept none, whose sessions a
/// disable did not end for good: it is signed out, and its user signs in again.
/// A session or user that cannot be read is signed out, unless the database is
/// busy or out of reach: that is the error (503), since the session may well
/// be valid. The session store tells only some such failures apart by its
/// words; for any other, the store is asked for the workspace, whose error
/// says whether the database can be reached (a role refused, a database
/// renamed or emptied: 503).
async fn current_user(
    store: &SharedStore,
    session: &Session,
) -> Result<Option<CurrentUser>, ApiError> {
    let read = async {
        let id: Option<i64> = session.get(SESSION_USER_ID).await?;
        let epoch: Option<i64> = session.get(SESSION_EPOCH).await?;
        Ok::<_, tower_sessions::session::Error>(id.zip(epoch))
    };
    let (id, epoch) = match read.await {
        Ok(Some(signed_in)) => signed_in,
        Ok(None) => return Ok(None),
        Err(e) => {
            tracing::warn!(error = %e, "could not read the session");
            return match ApiError::from_session_store(&e) {
                ApiError::Internal => match store.workspace().await {
                    Err(e @ (StoreError::Busy(_) | StoreError::Unavailable(_))) => Err(e.into()),
                    _ => Ok(None),
                },
                held_up => Err(held_up),
            };
        }
    };
    match store.user_by_id(id).await {
        Ok(Some(user)) if user.session_epoch != epoch => Ok(None),
        Ok(Some(user)) => Ok(Some(CurrentUser {
            id: user.id,
            email: user.email,
            role: user.role,
        })),
        Ok(None) => Ok(None),
        Err(e @ (StoreError::Busy(_) | StoreError::Unavailable(_))) => Err(e.into()),
        Err(e) => {
            tracing::warn!(error = %e, "could not load the session's user");
            Ok(None)
        }
    }
}

/// True for a request a browser sent from another site (the approach of Go's
/// `http.CrossOriginProtection`): `Sec-Fetch-Site` when the browser sends it, else
/// an `Origin` that is not this host. Requests with neither header do not come
/// from a browser's cross-site form or script.
///
/// Also true, whatever the other headers say, for a request whose `Referer` is
/// not a page of this host: a form posted without JavaScript ([`form_page`]) is
/// sent back to its `Referer` with its error (by [`refuse_call`] and by
/// server_fn), which must never be another site, and no call of the panel's
/// own pages, with JavaScript or without, sends another site's page. A
/// browser's own post sends this site's page, or no `Referer` at all. Read
/// lossily, as server_fn reads it, so that bytes that are not UTF-8 do not
/// make it absent.
fn is_cross_site(headers: &HeaderMap) -> bool {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let referer = headers
        .get(header::REFERER)
        .map(|page| String::from_utf8_lossy(page.as_bytes()));
    if referer.is_some_and(|page| !is_on_host(&page, host)) {
        return true;
    }
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return !matches!(site, "same-origin" | "none");
    }
    headers
        .get(header::ORIGIN)
        .is_some_and(|v| v.to_str().map_or(true, |origin| !is_on_host(origin, host)))
}

/// True when `address` (an origin or a page's URL) is an http(s) address whose
/// host and port are `host` (the request's `Host`).
fn is_on_host(address: &str, host: &str) -> bool {
    let Ok(url) = url::Url::parse(address) else {
        return false;
    };
    let address_host = match url.port() {
        Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_owned(),
    };
    matches!(url.scheme(), "http" | "https") && address_host.eq_ignore_ascii_case(host)
}

fn to_login(path: &str) -> Response {
    to_login_because(path, None)
}

/// Marks a redirect to the login page in its response's extensions: it is not
/// a form's return to its page, whose address the panel tidies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SentToSignIn;

/// To the login page, which sends the user on to `path` once signed in, and
/// says why they are there when there is a `reason`.
fn to_login_because(path: &str, reason: Option<&str>) -> Response {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query.append_pair("next", path);
    if let Some(reason) = reason {
        query.append_pair("reason", reason);
    }
    let location = format!("/login?{}", query.finish());
    // 302 Found, as DESIGN.md §5 names it (axum's `Redirect::to` answers 303).
    let mut response = (StatusCode::FOUND, [(header::LOCATION, location)]).into_response();
    response.extensions_mut().insert(SentToSignIn);
    response
}

/// The app's own No access page (403), the one the tab shows when refused
/// while open.
fn forbidden_page() -> Response {
    static PAGE: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(app::ui::no_access_document);
    (StatusCode::FORBIDDEN, Html(PAGE.as_str())).into_response()
}

/// A page that cannot be shown for now: `error` (503) as a line of HTML, with
/// `Retry-After`.
fn unavailable_page(error: &ApiError) -> Response {
    let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let mut page = short_page(status, "Unavailable for now", &error.to_string());
    page.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    page
}

/// A page of one heading and one paragraph, answered with `status`. `text` is
/// escaped.
fn short_page(status: StatusCode, heading: &str, text: &str) -> Response {
    let text = html_escape::encode_text(text);
    let body = format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>{heading} · Tollgate</title></head>\
         <body><main class=\"centered\"><h1>{heading}</h1><p>{text}</p>\
         </main></body></html>"
    );
    (status, Html(body)).into_response()
}

/// The page a form posted without JavaScript was sent from: its `Referer`, when
/// the request asks for HTML as a browser's form post does. `None` for a call
/// made by a script.
///
/// Both headers are read as server_fn reads them, bytes that are not UTF-8
/// replaced (U+FFFD): a header this took for absent, server_fn would still
/// follow, past [`is_cross_site`]'s check of the page.
fn form_page(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::REFERER)
        .filter(|_| app::auth::asks_for_html(headers))
        .map(|page| String::from_utf8_lossy(page.as_bytes()).into_owned())
}

/// A server function call refused with `e` before the function ran: for a form
/// posted without JavaScript from `page` ([`form_page`]), a redirect back to
/// that page with the error in its address, as server_fn answers the functions'
/// own errors ([`ApiError::back_to_form`]); for any other caller, the error as
/// the function would have encoded it.
///
/// A form posted by a visitor found signed out (the session ended, or was
/// closed in another tab) is sent to sign in instead, with the page to return
/// to and the reason ([`app::ui::SIGNED_OUT_REASON`]): back on the page, the page itself would
/// send it there without a word.
fn refuse_call(page: Option<&str>, path: &str, e: &ApiError) -> Response {
    if let (ApiError::Unauthorized, Some(page)) = (e, page) {
        if let Ok(page) = url::Url::parse(page) {
            return to_login_because(page.path(), Some(app::ui::SIGNED_OUT_REASON));
        }
    }
    let back = page
        .and_then(|page| e.back_to_form(path, page))
        .and_then(|location| HeaderValue::from_str(&location).ok());
    match back {
        Some(location) => (StatusCode::FOUND, [(header::LOCATION, location)]).into_response(),
        None => api_error(e),
    }
}

/// A server function's error, as the function itself would have encoded it.
fn api_error(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(e)).into_response()
}

fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(serde_json::json!({ "code": code, "message": message })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_a_path_is_decided_as_the_path() {
        for spelling in [
            "/admin/token-limits",
            "/admin/token-limits/",
            "/./admin/token-limits",
            "/foo/../admin/token-limits",
            "/%2e/admin/token-limits",
            "/x/%2E%2E/admin/token-limits",
            "//admin//token-limits",
            "/%61dmin/token-limits",
            "/%2Fadmin/token-limits",
        ] {
            assert_eq!(access_path(spelling), "/admin/token-limits", "{spelling}");
            assert!(matches!(access(&access_path(spelling)), Access::AdminPage));
        }
        assert_eq!(
            access_path("/fn//save_model_limits"),
            "/fn/save_model_limits"
        );
        assert_eq!(access_path("/../.."), "/");
        assert_eq!(access_path(""), "/");
        // Redirects keep the encoding; only the spelling of the path changes.
        assert_eq!(canonical_path("/a%20b/./c/"), "/a%20b/c");
        assert_eq!(canonical_path("//evil.example/"), "/evil.example");
    }
}
