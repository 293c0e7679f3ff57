//! The admin panel over HTTP (DESIGN.md §3, §5): who may call what, CSRF, login
//! rate limiting, and saving limits through the server functions. Requests go
//! through the real router with `tower::ServiceExt::oneshot`.
#![allow(
    clippy::unwrap_used,
    reason = "a broken fixture should stop the test at once"
)]

mod common;

use std::sync::Arc;

use app::{
    error::ApiError,
    store::{Role, SharedStore},
};
use axum::{
    body::Body,
    http::{header, HeaderValue, Method, Request, StatusCode},
    Router,
};
use chrono::Utc;
use common::{lock::WriteLockHolder, TestDb};
use http_body_util::BodyExt;
use server::{config, db, http};
use tower::ServiceExt;

const PASSWORD: &str = "correct horse battery";

/// How long a request may take before the test fails: far more than any takes
/// on a debug build, far less than a CI run's time limit.
const PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

struct Panel {
    router: Router,
    store: SharedStore,
    sessions: server::auth::sessions::SessionBackend,
    db: TestDb,
    _config: Option<tempfile::NamedTempFile>,
}

impl Panel {
    /// The panel on the embedded default config (the demo catalog).
    async fn new() -> Panel {
        Panel::with_config(None).await
    }

    /// The panel on the config file `text`, or on the embedded default.
    async fn with_config(text: Option<&str>) -> Panel {
        let db = TestDb::sqlite();
        let url = db.url.clone();
        Panel::on(text, db, url).await
    }

    /// The panel on the config file `text` (or the embedded default) and the
    /// database `db`, reached at `url`.
    async fn on(text: Option<&str>, db: TestDb, url: String) -> Panel {
        let file = text.map(|text| {
            let mut file = tempfile::NamedTempFile::new().unwrap();
            std::io::Write::write_all(&mut file, text.as_bytes()).unwrap();
            file
        });
        let config = config::Config::load(
            file.as_ref().map(|f| f.path()),
            &config::Overrides {
                listen: None,
                database_url: Some(url),
            },
        )
        .unwrap();
        let database = db::open(&config.database_url, config.durability)
            .await
            .unwrap();
        database
            .store
            .apply_setup(&config.setup, chrono::Utc::now())
            .await
            .unwrap();
        for (email, role) in [
            ("ada@example.com", Role::Admin),
            ("bob@example.com", Role::Member),
        ] {
            let hash = server::auth::hash_password(PASSWORD).unwrap();
            database
                .store
                .create_user(&app::store::Actor::Cli, email, &hash, role, Utc::now())
                .await
                .unwrap();
        }
        let state = http::AppState::new(Arc::new(config), database.store.clone());
        Panel {
            router: http::router(state, database.sessions.clone()),
            store: database.store,
            sessions: database.sessions,
            db,
            _config: file,
        }
    }

    /// A new API key of the user `email`.
    async fn api_key(&self, email: &str) -> String {
        common::another_key(&self.store, email).await
    }

    /// `GET /api/v1/spend` with the API key `key`, as JSON.
    async fn spend(&self, key: &str) -> serde_json::Value {
        let request = Request::get("/api/v1/spend")
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .body(Body::empty())
            .unwrap();
        let (status, _, body) = self.send(request).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The answer to `request`, its body read whole. A request unanswered after
    /// [`PATIENCE`] fails the test, naming it, instead of hanging the suite.
    async fn send(&self, request: Request<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
        let what = format!("{} {}", request.method(), request.uri());
        let answer = async {
            let response = self.router.clone().oneshot(request).await.unwrap();
            let (parts, body) = response.into_parts();
            (parts, body.collect().await.unwrap().to_bytes())
        };
        let (response, body) = tokio::time::timeout(PATIENCE, answer)
            .await
            .unwrap_or_else(|_| panic!("{what} was not answered within {PATIENCE:?}"));
        let (status, headers) = (response.status, response.headers);
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    /// The Token Limits tab as the session `cookie` sees it, which must open it.
    async fn open_tab(&self, cookie: &str) -> String {
        let (status, _, body) = self.send(get("/admin/token-limits", Some(cookie))).await;
        assert_eq!(status, StatusCode::OK, "the tab opens: {body}");
        body
    }

    /// Asserts that the session `cookie` is over: the tab sends it to sign in.
    async fn assert_signed_out(&self, cookie: &str) {
        let (status, headers, _) = self.send(get("/admin/token-limits", Some(cookie))).await;
        assert_eq!(status, StatusCode::FOUND, "the session is over");
        let location = headers[header::LOCATION].to_str().unwrap();
        assert!(location.starts_with("/login"), "{location}");
    }

    /// The workspace's settings as stored now.
    async fn settings(&self) -> app::store::SettingsRecord {
        self.store
            .spend_snapshot(Utc::now())
            .await
            .unwrap()
            .settings
    }

    /// The audit log's rows of settings changes, newest first: without the rows
    /// the fixture's users and keys left.
    async fn settings_audit(&self) -> Vec<app::store::AuditRecord> {
        let mut audit = self.store.audit_log(100).await.unwrap();
        audit.retain(|row| !row.action.starts_with("user.") && !row.action.starts_with("api_key."));
        audit
    }

    /// Sign in as `email` and return the session cookie.
    async fn sign_in(&self, email: &str) -> String {
        let (status, headers, body) = self
            .send(post(
                "/fn/login",
                &format!("email={email}&password={}", PASSWORD.replace(' ', "+")),
                None,
            ))
            .await;
        assert!(
            status.is_success() || status.is_redirection(),
            "{status} {body}"
        );
        let cookie = headers.get(header::SET_COOKIE).unwrap().to_str().unwrap();
        cookie.split(';').next().unwrap().to_owned()
    }
}

fn post(path: &str, form: &str, cookie: Option<&str>) -> Request<Body> {
    let mut builder = Request::post(path)
        .header(header::HOST, "tollgate.test")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(header::ACCEPT, "application/json")
        .header(header::ORIGIN, "http://tollgate.test");
    if let Some(cookie) = cookie {
        builder = builder.header(header::COOKIE, cookie);
    }
    builder.body(Body::from(form.to_owned())).unwrap()
}

fn get(path: &str, cookie: Option<&str>) -> Request<Body> {
    let mut builder = Request::get(path).header(header::HOST, "tollgate.test");
    if let Some(cookie) = cookie {
        builder = builder.header(header::COOKIE, cookie);
    }
    builder.body(Body::empty()).unwrap()
}

/// Server functions anyone may call; every other one must refuse anonymous
/// callers and members. A new server function is covered without touching this test.
const PUBLIC: [&str; 3] = ["/fn/login", "/fn/me", "/fn/logout"];

fn server_functions() -> Vec<String> {
    let paths: Vec<String> = leptos::server_fn::axum::server_fn_paths()
        .map(|(path, _)| path.to_owned())
        .collect();
    assert!(
        paths.len() >= 6,
        "server functions not registered: {paths:?}"
    );
    assert!(paths.iter().all(|p| p.starts_with("/fn/")), "{paths:?}");
    paths
}

#[tokio::test]
async fn every_server_function_refuses_anonymous_and_member_callers() {
    let panel = Panel::new().await;
    let member = panel.sign_in("bob@example.com").await;
    let before = panel.store.spend_snapshot(Utc::now()).await.unwrap();
    // Bodies that would change something if accepted.
    let body = "automatic_fallback=on&settings_version=1&rows[0][model]=gpt-5&rows[0][limit]=1&rows[0][enabled]=on&rows[0][version]=0";
    for path in server_functions()
        .iter()
        .filter(|p| !PUBLIC.contains(&p.as_str()))
    {
        let (status, _, text) = panel.send(post(path, body, None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path} anonymous: {text}");
        assert!(text.contains("\"code\":\"unauthorized\""), "{path}: {text}");
        let (status, _, text) = panel.send(post(path, body, Some(&member))).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path} member: {text}");
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (json["code"].as_str(), json["message"].as_str()),
            (
                Some("forbidden"),
                Some("Only administrators can see and change token limits.")
            ),
            "{path}: {text}"
        );
        assert!(
            !text.contains("€") && !text.contains("gpt-5"),
            "{path} leaked: {text}"
        );
    }
    let after = panel.store.spend_snapshot(Utc::now()).await.unwrap();
    assert_eq!(before, after);
    assert!(panel.settings_audit().await.is_empty());
}

#[tokio::test]
async fn pages_redirect_anonymous_users_and_refuse_members() {
    let panel = Panel::new().await;
    let (status, headers, body) = panel.send(get("/admin/token-limits", None)).await;
    assert_eq!(status, StatusCode::FOUND);
    assert_eq!(
        headers[header::LOCATION],
        "/login?next=%2Fadmin%2Ftoken-limits"
    );
    assert!(!body.contains("€"));

    let member = panel.sign_in("bob@example.com").await;
    let (status, _, body) = panel.send(get("/admin/token-limits", Some(&member))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(!body.contains("€") && !body.contains("GPT-5"), "{body}");
    assert!(body.contains("<h1>No access</h1>"), "{body}");
    assert!(body.contains("Go to the start page"), "{body}");
    let (status, _, body) = panel.send(get("/", Some(&member))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        !body.contains("href=\"/admin/token-limits\""),
        "members see no Admin link"
    );

    let admin = panel.sign_in("ada@example.com").await;
    let body = panel.open_tab(&admin).await;
    for text in [
        "Spending &amp; Budget",
        "Model limits",
        "Spend by model (this cycle)",
        "€500.00",
        "Within plan budget",
    ] {
        assert!(body.contains(text), "missing {text}");
    }
    let (_, _, body) = panel.send(get("/", Some(&admin))).await;
    assert!(
        body.contains("href=\"/admin/token-limits\""),
        "administrators see the Admin link"
    );
}

#[tokio::test]
async fn wrong_passwords_are_refused_and_rate_limited() {
    let panel = Panel::new().await;
    let (status, headers, body) = panel
        .send(post(
            "/fn/login",
            "email=ada@example.com&password=wrong",
            None,
        ))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("invalid_credentials"));
    assert!(
        headers.get(header::SET_COOKIE).is_none(),
        "a failed login opened a session"
    );
    let mut limited = false;
    for _ in 0..15 {
        let (status, headers, body) = panel
            .send(post(
                "/fn/login",
                "email=ada@example.com&password=wrong",
                None,
            ))
            .await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            limited = true;
            assert!(body.contains("rate_limited"), "{body}");
            // One attempt comes back every 6 s: the client is told when.
            let retry_after: u64 = headers[header::RETRY_AFTER]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=6).contains(&retry_after), "Retry-After: {retry_after}");
            assert!(
                body.contains(&format!("try again in {retry_after} s")),
                "{body}"
            );
            // In the shape the page's script reads, with the wait in seconds.
            let error: ApiError = serde_json::from_str(&body).unwrap();
            assert!(
                matches!(error, ApiError::RateLimited { seconds } if seconds == retry_after),
                "{error:?}"
            );
            break;
        }
    }
    assert!(limited, "15 quick wrong logins were never rate limited");
    // A sign-in posted without JavaScript comes back to its page with the error,
    // as the function's own errors do.
    let mut request = post("/fn/login", "email=ada@example.com&password=wrong", None);
    let page = "http://tollgate.test/login";
    request
        .headers_mut()
        .insert(header::ACCEPT, "text/html,*/*".parse().unwrap());
    request
        .headers_mut()
        .insert(header::REFERER, page.parse().unwrap());
    let (status, headers, _) = panel.send(request).await;
    assert_eq!(status, StatusCode::FOUND);
    let location = headers[header::LOCATION].to_str().unwrap();
    assert!(
        location.starts_with(&format!("{page}?__path=%2Ffn%2Flogin&__err=")),
        "{location}"
    );
}

#[tokio::test]
async fn cross_site_posts_are_refused() {
    let panel = Panel::new().await;
    let admin = panel.sign_in("ada@example.com").await;
    let version = panel.settings().await.version;
    let body = format!("settings_version={version}");
    let mut request = post("/fn/save_automatic_fallback", &body, Some(&admin));
    request
        .headers_mut()
        .insert(header::ORIGIN, "https://evil.example".parse().unwrap());
    let (status, _, text) = panel.send(request).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
    let mut request = post("/fn/save_automatic_fallback", &body, Some(&admin));
    request
        .headers_mut()
        .insert("sec-fetch-site", "cross-site".parse().unwrap());
    let (status, _, _) = panel.send(request).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // A post whose page (`Referer`) is not this site's is refused too, whatever
    // else it says: a no-JS error would send the browser back there, and none
    // of the panel's pages, with JavaScript or without, sends another's.
    for (referer, fetch_site, accept) in [
        ("http://evil.example/login", None, "text/html"),
        (
            "http://evil.example/login",
            Some("same-origin"),
            "text/html",
        ),
        ("http://evil.example/login", None, "application/json"),
        ("http://evil.example/login", None, ""),
        ("http://tollgate.test.evil.example/login", None, "text/html"),
        ("javascript:alert(1)", None, "text/html"),
        ("//evil.example/x", Some("same-origin"), "text/html"),
    ] {
        for path in ["/fn/save_automatic_fallback", "/fn/login"] {
            let mut request = post(path, &body, Some(&admin));
            let headers = request.headers_mut();
            if !accept.is_empty() {
                headers.insert(header::ACCEPT, accept.parse().unwrap());
            }
            headers.insert(header::REFERER, referer.parse().unwrap());
            if let Some(site) = fetch_site {
                headers.insert("sec-fetch-site", site.parse().unwrap());
            }
            let (status, headers, text) = panel.send(request).await;
            assert_eq!(
                status,
                StatusCode::FORBIDDEN,
                "{path} from {referer}: {headers:?} {text}"
            );
        }
    }
    // Bytes that are not visible ASCII in either header are read as server_fn
    // reads them (lossily), not taken for an absent header.
    for (accept, referer) in [
        (&b"text/html"[..], &b"http://evil.example/\xff"[..]),
        (&b"text/html,\xff"[..], &b"http://evil.example/page"[..]),
    ] {
        for path in ["/fn/save_automatic_fallback", "/fn/login"] {
            let mut request = post(path, &body, Some(&admin));
            let headers = request.headers_mut();
            headers.insert(header::ACCEPT, HeaderValue::from_bytes(accept).unwrap());
            headers.insert(header::REFERER, HeaderValue::from_bytes(referer).unwrap());
            let (status, headers, text) = panel.send(request).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {headers:?} {text}");
        }
    }
    assert!(panel.settings().await.automatic_fallback);
    // The same request from the panel itself goes through: fallback off.
    let (status, _, text) = panel
        .send(post("/fn/save_automatic_fallback", &body, Some(&admin)))
        .await;
    assert!(status.is_success(), "{status} {text}");
    assert!(!panel.settings().await.automatic_fallback);
}

#[tokio::test]
async fn model_limits_save_all_or_nothing_with_field_errors() {
    let panel = Panel::new().await;
    let admin = panel.sign_in("ada@example.com").await;
    let form = |rows: &[(&str, &str, bool)]| {
        rows.iter()
            .enumerate()
            .map(|(i, (model, limit, enabled))| {
                let limit: String =
                    url::form_urlencoded::byte_serialize(limit.as_bytes()).collect();
                let on = if *enabled {
                    format!("&rows[{i}][enabled]=on")
                } else {
                    String::new()
                };
                format!(
                    "rows[{i}][model]={model}&rows[{i}][limit]={limit}&rows[{i}][version]=0{on}"
                )
            })
            .collect::<Vec<_>>()
            .join("&")
    };
    // One valid row and four invalid ones: nothing is saved, each error is named.
    let body = form(&[
        ("gpt-5", "12,50", true),
        ("gpt-4o", "-5", true),
        ("gpt-5-mini", "abc", true),
        ("gpt-5.4-mini", "1.234", true),
        ("claude-sonnet-4-5", "", true),
    ]);
    let (status, _, text) = panel
        .send(post("/fn/save_model_limits", &body, Some(&admin)))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{text}");
    let error: serde_json::Value = serde_json::from_str(&text).unwrap();
    let code_of = |model: &str| {
        error["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["field"] == model)
            .map(|f| f["code"].as_str().unwrap().to_owned())
    };
    assert_eq!(code_of("gpt-5"), None);
    assert_eq!(code_of("gpt-4o").as_deref(), Some("negative"));
    assert_eq!(code_of("gpt-5-mini").as_deref(), Some("not_a_number"));
    assert_eq!(
        code_of("gpt-5.4-mini").as_deref(),
        Some("ambiguous_separator")
    );
    assert_eq!(
        code_of("claude-sonnet-4-5").as_deref(),
        Some("enabled_without_amount")
    );
    assert!(
        panel.settings_audit().await.is_empty(),
        "a refused save wrote something"
    );

    let (status, _, text) = panel
        .send(post(
            "/fn/save_model_limits",
            &form(&[("gpt-5", "12,50", true)]),
            Some(&admin),
        ))
        .await;
    assert!(status.is_success(), "{status} {text}");
    let audit = panel.settings_audit().await;
    assert_eq!(audit.len(), 1);
    assert_eq!(
        (audit[0].actor.as_str(), audit[0].subject.as_str()),
        ("ada@example.com", "gpt-5")
    );
    assert_eq!(audit[0].new_value, r#"{"enabled":true,"limit_eur":"12.5"}"#);

    // A second administrator's save based on the old version conflicts.
    let (status, _, text) = panel
        .send(post(
            "/fn/save_model_limits",
            &form(&[("gpt-5", "20", true)]),
            Some(&admin),
        ))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{text}");
    assert_eq!(panel.settings_audit().await.len(), 1);
    // The row changed meanwhile is named, with the sentence its code has in
    // the page's URL, so the answer reads the same without JavaScript.
    let error: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(error["code"], "conflict", "{text}");
    assert_eq!(error["message"], app::error::CONFLICT_MESSAGE, "{text}");
    assert_eq!(error["fields"][0]["field"], "gpt-5", "{text}");
    assert_eq!(
        error["fields"][0]["message"],
        app::error::FieldError::fixed("gpt-5", "conflict").message,
        "{text}"
    );

    // One model twice in a save (only a hand-made request can): a field error, not
    // a conflict, and nothing is written.
    let (status, _, text) = panel
        .send(post(
            "/fn/save_model_limits",
            &form(&[("gpt-4o", "3", true), ("gpt-4o", "4", true)]),
            Some(&admin),
        ))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{text}");
    let error: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(error["fields"][0]["code"], "duplicate_model", "{text}");
    assert_eq!(error["fields"][0]["field"], "gpt-4o", "{text}");
    assert_eq!(panel.settings_audit().await.len(), 1);

    // More rows than the catalog has models (only a hand-made request can): one
    // error for the whole save, not one per row, and nothing is written.
    let models = config::Config::load(None, &config::Overrides::default())
        .unwrap()
        .setup
        .catalog
        .models()
        .len();
    let rows = vec![("gpt-4o", "3", true); models + 1];
    let (status, _, text) = panel
        .send(post("/fn/save_model_limits", &form(&rows), Some(&admin)))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{text}");
    let error: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(error["fields"].as_array().map(Vec::len), Some(1), "{text}");
    assert_eq!(error["fields"][0]["code"], "too_many_rows", "{text}");
    assert_eq!(error["fields"][0]["field"], "rows", "{text}");
    assert_eq!(panel.settings_audit().await.len(), 1);

    // A row naming no model (only a hand-made request can) is told so.
    let (status, _, text) = panel
        .send(post(
            "/fn/save_model_limits",
            &form(&[("gpt-4o", "3", true), ("", "4", true)]),
            Some(&admin),
        ))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{text}");
    let error: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (&error["fields"][0]["field"], &error["fields"][0]["code"]),
        (
            &serde_json::json!("model"),
            &serde_json::json!("missing_model")
        ),
        "{text}"
    );
    assert_eq!(panel.settings_audit().await.len(), 1);

    // A model the catalog does not have (only a hand-made request can name one)
    // is repeated on one line, escaped and cut, as the gateway repeats names.
    let unknown = format!("a\nb\u{1b}[2J\u{202e}{}", "m".repeat(300));
    let (status, _, text) = panel
        .send(post(
            "/fn/save_model_limits",
            &form(&[("gpt-4o", "3", true), (unknown.as_str(), "4", true)]),
            Some(&admin),
        ))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{text}");
    let error: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(error["fields"][0]["code"], "unknown_model", "{text}");
    let shown = format!("a\\u{{a}}b\\u{{1b}}[2J\\u{{202e}}{}…", "m".repeat(56));
    assert_eq!(error["fields"][0]["field"], shown, "{text}");
    assert_eq!(
        error["fields"][0]["message"],
        format!("{shown} is not a model of the catalog."),
        "{text}"
    );
    assert_eq!(panel.settings_audit().await.len(), 1);

    let (status, _, text) = panel.send(post("/fn/token_limits", "", Some(&admin))).await;
    assert_eq!(status, StatusCode::OK);
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    let gpt5 = report["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "gpt-5")
        .unwrap();
    assert_eq!(
        (
            gpt5["limit_input"].as_str(),
            gpt5["limit_enabled"].as_bool()
        ),
        (Some("€12.50"), Some(true))
    );
}

#[tokio::test]
async fn spend_api_answers_administrators_keys_with_exact_decimals() {
    let panel = Panel::new().await;
    let admin_key = panel.api_key("ada@example.com").await;
    let member_key = panel.api_key("bob@example.com").await;
    // 1,000,000 input + 100,000 output tokens of GPT-5 at 1.075 / 8.6 EUR per 1M.
    let catalog = config::Config::load(None, &config::Overrides::default())
        .unwrap()
        .setup
        .catalog;
    let usage = app::domain::Usage {
        prompt_tokens: 1_000_000,
        cached_tokens: 0,
        completion_tokens: 100_000,
        reasoning_tokens: 0,
    };
    let record = app::store::UsageRecord {
        idempotency_key: "k".into(),
        model: catalog.resolve("gpt-5").unwrap(),
        model_as_sent: "gpt-5",
        usage,
    };
    panel
        .store
        .record_usage(&[record], app::store::Spender::default(), Utc::now())
        .await
        .unwrap();

    let request = |key: Option<&str>| {
        let mut builder = Request::get("/api/v1/spend");
        if let Some(key) = key {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        builder.body(Body::empty()).unwrap()
    };
    let (status, _, body) = panel.send(request(None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, _, body) = panel.send(request(Some(&member_key))).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(!body.contains("1.935"), "{body}");
    // Shaped and worded as the gateway's other errors.
    let refused: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        refused,
        serde_json::json!({"error": {
            "message": "Only administrators' API keys can read the workspace's spend.",
            "type": "permission_error",
            "param": null,
            "code": "forbidden",
        }})
    );

    let (status, _, body) = panel.send(request(Some(&admin_key))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["status"], "within_plan_budget");
    assert_eq!(json["plan_budget_eur"], "500");
    assert_eq!(json["overage_limit_eur"], "100");
    assert_eq!(json["spent_eur"], "1.935");
    assert_eq!(json["automatic_fallback"], true);
    assert!(json["cycle"]["start"].as_str().unwrap().ends_with('Z'));
    assert_eq!(json["cycle"]["first_day"].as_str().unwrap().len(), 10);
    let models = json["models"].as_array().unwrap();
    assert_eq!(
        models.len(),
        catalog.models().len(),
        "every catalog model is listed"
    );
    assert_eq!(models[0]["id"], "gpt-5");
    assert_eq!(models[0]["spent_eur"], "1.935");
    assert_eq!(models[0]["share_percent"], "100.0");
    assert_eq!(models[1]["spent_eur"], "0");
    assert_eq!(models[1]["share_percent"], "0.0");
    // Amounts are strings, never JSON numbers (DESIGN.md §4).
    for model in models {
        assert!(
            model["spent_eur"].is_string() && model["share_percent"].is_string(),
            "{model}"
        );
    }
    assert!(json["reserved_eur"].is_string());
}

/// R8 lists every model with spend: a model the config stopped listing keeps its
/// row under Spend by model (and in the spend API), its spend counts in the shares,
/// and the Model limits form offers no limit for it.
#[tokio::test]
async fn spend_on_a_model_no_longer_in_the_catalog_keeps_its_row() {
    // The demo catalog without GPT-5: the workspace spent on it before.
    let example = config::EXAMPLE;
    let without_gpt5 = &example[..example.find("[[models]]").unwrap()];
    let mini = &example[example.find("id = \"gpt-5-mini\"").unwrap()..];
    let text = format!("{without_gpt5}[[models]]\n{mini}");
    let panel = Panel::with_config(Some(&text)).await;
    let demo = config::Config::load(None, &config::Overrides::default())
        .unwrap()
        .setup
        .catalog;
    let usage = |prompt_tokens| app::domain::Usage {
        prompt_tokens,
        cached_tokens: 0,
        completion_tokens: 0,
        reasoning_tokens: 0,
    };
    // 3M input tokens of GPT-5 at the demo's 1.075 EUR per 1M: €3.225; 1M of
    // GPT-5 Mini at 0.215: €0.215. Shares 93.75 / 6.25: the tenth left over goes
    // to the larger amount.
    let records = [("gpt-5", 3_000_000), ("gpt-5-mini", 1_000_000)].map(|(id, tokens)| {
        app::store::UsageRecord {
            idempotency_key: id.into(),
            model: demo.resolve(id).unwrap(),
            model_as_sent: id,
            usage: usage(tokens),
        }
    });
    panel
        .store
        .record_usage(&records, app::store::Spender::default(), Utc::now())
        .await
        .unwrap();

    let json = panel.spend(&panel.api_key("ada@example.com").await).await;
    assert_eq!(json["spent_eur"], "3.44");
    let models = json["models"].as_array().unwrap();
    let ids: Vec<_> = models.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["gpt-5", "gpt-5-mini"], "{json}");
    assert_eq!(models[0]["spent_eur"], "3.225");
    assert_eq!(models[0]["display_name"], "gpt-5");
    assert_eq!(models[0]["in_catalog"], false);
    assert_eq!(models[1]["in_catalog"], true);
    let shares: Vec<_> = models
        .iter()
        .map(|m| m["share_percent"].as_str().unwrap())
        .collect();
    assert_eq!(shares, ["93.8", "6.2"], "shares over the whole spend");

    let admin = panel.sign_in("ada@example.com").await;
    let body = panel.open_tab(&admin).await;
    let (limits_at, by_model_at) = (
        body.find("id=\"limits-title\"").unwrap(),
        body.find("id=\"by-model-title\"").unwrap(),
    );
    let by_model = &body[by_model_at..];
    assert!(by_model.contains("data-model=\"gpt-5\""), "{by_model}");
    assert!(by_model.contains("No longer in the catalog"), "{by_model}");
    let limits = &body[limits_at..by_model_at];
    assert!(!limits.contains("data-model=\"gpt-5\""), "{limits}");
    assert!(limits.contains("data-model=\"gpt-5-mini\""), "{limits}");
}

/// Saved limits that do other than they may seem to are taken, and the tab
/// says what they do under their field: €0.00 enabled lets nothing through,
/// and a limit above the allowance (€600.00 on the demo plan) stops nothing.
#[tokio::test]
async fn limits_of_nothing_or_beyond_the_allowance_are_explained_on_their_row() {
    let panel = Panel::new().await;
    let admin = panel.sign_in("ada@example.com").await;
    let body = "rows[0][model]=gpt-5&rows[0][limit]=0&rows[0][version]=0&rows[0][enabled]=on\
                &rows[1][model]=gpt-4o&rows[1][limit]=5000&rows[1][version]=0&rows[1][enabled]=on\
                &rows[2][model]=gpt-5-mini&rows[2][limit]=50&rows[2][version]=0&rows[2][enabled]=on";
    let (status, _, text) = panel
        .send(post("/fn/save_model_limits", body, Some(&admin)))
        .await;
    assert!(status.is_success(), "{status} {text}");
    let html = panel.open_tab(&admin).await;
    let row = |id: &str| {
        let start = html.find(&format!("data-model=\"{id}\"")).unwrap();
        let end = start + html[start..].find("</tr>").unwrap();
        html[start..end].to_owned()
    };
    let nothing = row("gpt-5");
    assert!(nothing.contains("lets no request through"), "{nothing}");
    assert!(
        nothing.contains(r#"aria-describedby="limit-error-gpt-5 limit-note-gpt-5""#),
        "{nothing}"
    );
    let beyond = row("gpt-4o");
    assert!(
        beyond.contains("may spend in a cycle (€600.00)"),
        "{beyond}"
    );
    let within = row("gpt-5-mini");
    assert!(!within.contains("limit-note"), "{within}");
}

/// The Model limits rows keep the order of their names as a person reads them,
/// whatever their case: "Gemini 2.5 Flash" before "GPT-4o", not after every
/// capital "GPT".
#[tokio::test]
async fn the_limits_rows_are_in_the_order_of_their_names() {
    let panel = Panel::new().await;
    let admin = panel.sign_in("ada@example.com").await;
    let body = panel.open_tab(&admin).await;
    let limits = &body
        [body.find("id=\"limits-title\"").unwrap()..body.find("id=\"by-model-title\"").unwrap()];
    let names: Vec<&str> = limits
        .split("<th scope=\"row\">")
        .skip(1)
        .map(|row| row.split('<').next().unwrap().trim())
        .collect();
    assert!(names.len() >= 10, "{names:?}");
    let gemini = names.iter().position(|n| *n == "Gemini 2.5 Flash").unwrap();
    let gpt = names.iter().position(|n| *n == "GPT-4o").unwrap();
    assert!(gemini < gpt, "{names:?}");
    let mut sorted = names.clone();
    sorted.sort_by(|a, b| app::domain::by_display_name(a, b));
    assert_eq!(names, sorted);
}

/// What is held for requests in flight counts against the allowance (R6, R7), so
/// the tab shows it, exactly, as the spend API does.
#[tokio::test]
async fn the_tab_shows_what_is_held_for_requests_in_flight() {
    let panel = Panel::new().await;
    let catalog = config::Config::load(None, &config::Overrides::default())
        .unwrap()
        .setup
        .catalog;
    // 1,000 prompt tokens at 1.075 and 1,000 output tokens at 8.6 EUR per 1M.
    let outcome = panel
        .store
        .reserve(app::store::ReserveRequest {
            catalog,
            model: app::domain::ModelId::new("gpt-5"),
            estimate: app::domain::TokenEstimate {
                prompt_tokens: 1_000,
                output_cap: Some(1_000),
                n: 1,
            },
            spender: app::store::Spender::default(),
            owner: "panel-test".into(),
            lease_until: Utc::now() + chrono::Duration::seconds(60),
            now: Utc::now(),
        })
        .await
        .unwrap();
    assert!(matches!(outcome, app::store::ReserveOutcome::Admitted(_)));
    let json = panel.spend(&panel.api_key("ada@example.com").await).await;
    assert_eq!(json["reserved_eur"], "0.009675");
    let admin = panel.sign_in("ada@example.com").await;
    let body = panel.open_tab(&admin).await;
    // The tab shows cents, like its other figures (R2).
    assert!(body.contains("<span id=\"reserved\">€0.01<"), "{body}");
}

/// A page asked for with a method other than GET or HEAD gets a short page
/// saying so (405, with `Allow`), not the router's empty answer; the tab is
/// unchanged. Its sign-in rule still comes first.
#[tokio::test]
async fn pages_with_another_method_say_so() {
    let panel = Panel::new().await;
    let admin = panel.sign_in("ada@example.com").await;
    let before = panel.settings().await;
    for method in [Method::PUT, Method::POST, Method::DELETE, Method::PATCH] {
        for path in ["/admin/token-limits", "/login", "/"] {
            let mut request = post(path, "automatic_fallback=false", Some(&admin));
            *request.method_mut() = method.clone();
            let (status, headers, body) = panel.send(request).await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert_eq!(headers[header::ALLOW], "GET,HEAD", "{method} {path}");
            let content_type = headers[header::CONTENT_TYPE].to_str().unwrap();
            assert!(content_type.starts_with("text/html"), "{content_type}");
            assert!(body.contains("<h1>Method not allowed</h1>"), "{body}");
        }
    }
    assert_eq!(panel.settings().await, before, "nothing changed");
    let mut anonymous = post("/admin/token-limits", "", None);
    *anonymous.method_mut() = Method::PUT;
    let (status, headers, _) = panel.send(anonymous).await;
    assert_eq!(status, StatusCode::FOUND);
    assert!(headers[header::LOCATION]
        .to_str()
        .unwrap()
        .starts_with("/login?"));
}

#[tokio::test]
async fn unknown_api_paths_answer_json_not_html() {
    let panel = Panel::new().await;
    // Paths that only begin like the API's are the panel's.
    let pages = ["/apix", "/v10/models", "/x/v1"];
    for path in [
        "/api/v1/nope",
        "/api/v1/spend/extra",
        "/api/v1",
        "/api/v1/",
        "/api/v2/spend",
        "/api",
        "/api/",
        "/v1/embeddings",
        // An API path in another case or spelling.
        "/V1/models",
        "/V1/chat/completions",
        "/API/v1/spend",
        "/Api",
        "//v1//models/",
        "/v%31/models",
        "/%761/models",
        "/v1%2fmodels",
        "/api%2Fv1%2Fspend",
    ]
    .into_iter()
    .chain(pages)
    {
        let (status, headers, body) = panel.send(get(path, None)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        let page = pages.contains(&path);
        let content_type = headers[header::CONTENT_TYPE].to_str().unwrap();
        let expected = if page {
            "text/html"
        } else {
            "application/json"
        };
        assert!(content_type.starts_with(expected), "{path}: {content_type}");
        if !page {
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(json["error"]["code"], "unknown_url", "{path}: {body}");
        }
    }
    // The spend API, the health probe and the metrics with the wrong method say
    // so in the same shape, and which method they take.
    for path in ["/api/v1/spend", "/healthz", "/metrics"] {
        let (status, headers, body) = panel.send(post(path, "", None)).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{path}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            json["error"]["code"], "method_not_allowed",
            "{path}: {body}"
        );
        assert_eq!(headers[header::ALLOW], "GET,HEAD", "{path}");
    }
}

#[tokio::test]
async fn the_site_is_served_compressed_to_browsers_that_accept_it() {
    let panel = Panel::new().await;
    let request = Request::get("/login")
        .header(header::ACCEPT_ENCODING, "gzip")
        .body(Body::empty())
        .unwrap();
    let response = panel.router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_ENCODING], "gzip");
}

/// A form posted without JavaScript is sent back to its page: with the error in
/// its address when refused (the last one only, when refused again), without
/// any earlier error (and without a bare `?`) once saved, and then the page
/// says "Saved." once, not again on a reload.
#[tokio::test]
async fn forms_posted_without_javascript_return_to_their_page() {
    let panel = Panel::new().await;
    let admin = panel.sign_in("ada@example.com").await;
    let page = "http://tollgate.test/admin/token-limits";
    let browser_post = |body: String, referer: &str| {
        let mut request = post("/fn/save_automatic_fallback", &body, Some(&admin));
        let headers = request.headers_mut();
        headers.insert(header::ACCEPT, "text/html,*/*".parse().unwrap());
        headers.insert(header::REFERER, referer.parse().unwrap());
        request
    };
    let version = panel.settings().await.version;
    let (status, headers, body) = panel
        .send(browser_post(
            format!("automatic_fallback=maybe&settings_version={version}"),
            page,
        ))
        .await;
    assert_eq!(status, StatusCode::FOUND);
    // The redirect alone: server_fn's JSON result is not sent beside it.
    assert_eq!(body, "");
    assert!(headers.get(header::CONTENT_TYPE).is_none(), "{headers:?}");
    let refused = headers[header::LOCATION].to_str().unwrap().to_owned();
    assert!(refused.starts_with(&format!("{page}?__path=")), "{refused}");
    assert!(refused.contains("&__err="), "{refused}");
    // Refused again from there: the address holds the last error only.
    let (_, headers, _) = panel
        .send(browser_post(
            format!("automatic_fallback=perhaps&settings_version={version}"),
            &refused,
        ))
        .await;
    let again = headers[header::LOCATION].to_str().unwrap().to_owned();
    assert_eq!(again.matches("__path=").count(), 1, "{again}");
    assert_eq!(again.matches("__err=").count(), 1, "{again}");
    let (status, headers, body) = panel
        .send(browser_post(
            format!("automatic_fallback=off&settings_version={version}"),
            &again,
        ))
        .await;
    // Saved: back to the page with neither error, which says so once.
    assert_eq!(status, StatusCode::FOUND);
    assert_eq!(body, "");
    let saved = headers[header::LOCATION].to_str().unwrap().to_owned();
    assert_eq!(saved, page);
    assert!(!panel.settings().await.automatic_fallback);
    let (status, _, html) = panel.send(get(&saved, Some(&admin))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        html.contains(r#"id="fallback-result" class="form-ok">Saved."#),
        "{html}"
    );
    // Only the form that was saved says so.
    assert!(
        !html.contains(r#"id="limits-result" class="form-ok""#),
        "{html}"
    );
    // A reload of the same address is no new save: it says nothing.
    let (_, _, html) = panel.send(get(&saved, Some(&admin))).await;
    assert!(!html.contains("Saved."), "{html}");
    // Refused after that: the error, and no word of a success.
    let version = panel.settings().await.version;
    let (_, headers, _) = panel
        .send(browser_post(
            format!("automatic_fallback=maybe&settings_version={version}"),
            &saved,
        ))
        .await;
    let refused = headers[header::LOCATION].to_str().unwrap().to_owned();
    assert!(refused.contains("__err="), "{refused}");
    let (_, _, html) = panel.send(get(&refused, Some(&admin))).await;
    assert!(!html.contains("Saved."), "{html}");
    // A script's save reads its own answer: the page keeps no word of it.
    let (status, _, _) = panel
        .send(post(
            "/fn/save_model_limits",
            "rows[0][model]=gpt-4o&rows[0][limit]=12&rows[0][version]=0",
            Some(&admin),
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    let html = panel.open_tab(&admin).await;
    assert!(!html.contains("Saved."), "{html}");
}

/// A Model limits form refused without JavaScript comes back showing what was
/// typed, every row changed (not only the refused one), on the versions it was
/// typed on, the first refused field with the focus; once only, and only for a
/// browser's form: a script's refused call leaves nothing for the page.
#[tokio::test]
async fn a_limits_form_refused_without_javascript_comes_back_as_typed() {
    let panel = Panel::new().await;
    let admin = panel.sign_in("ada@example.com").await;
    let page = "http://tollgate.test/admin/token-limits";
    let body = "rows[0][model]=gpt-5&rows[0][limit]=1.234&rows[0][version]=0\
                &rows[1][model]=gpt-4o&rows[1][limit]=44,50&rows[1][version]=0&rows[1][enabled]=on";
    // A script's call: refused, and nothing kept for the page.
    let (status, _, _) = panel
        .send(post("/fn/save_model_limits", body, Some(&admin)))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let html = panel.open_tab(&admin).await;
    assert!(!html.contains("value=\"44,50\""), "{html}");

    let mut request = post("/fn/save_model_limits", body, Some(&admin));
    let headers = request.headers_mut();
    headers.insert(header::ACCEPT, "text/html,*/*".parse().unwrap());
    headers.insert(header::REFERER, page.parse().unwrap());
    let (status, headers, _) = panel.send(request).await;
    assert_eq!(status, StatusCode::FOUND);
    let refused = headers[header::LOCATION].to_str().unwrap().to_owned();
    assert!(refused.contains("__err="), "{refused}");
    assert!(
        !refused.contains("44"),
        "what was typed is not in the address: {refused}"
    );
    // Nor in the error written into it: its sentences are the fixed ones of
    // its codes, not "\"1.234\" is ambiguous…".
    let encoded = url::Url::parse(&refused)
        .unwrap()
        .query_pairs()
        .find(|(name, _)| name == "__err")
        .map(|(_, value)| value.into_owned())
        .unwrap();
    let error =
        leptos::server_fn::error::ServerFnUrlError::<app::error::ApiError>::decode_err(&encoded);
    let error = serde_json::to_string(&error).unwrap();
    assert!(error.contains("ambiguous_separator"), "{error}");
    assert!(!error.contains("1.234"), "{error}");
    let (status, _, html) = panel.send(get(&refused, Some(&admin))).await;
    assert_eq!(status, StatusCode::OK);
    let row = |html: &str, id: &str| {
        let start = html.find(&format!("data-model=\"{id}\"")).unwrap();
        let end = start + html[start..].find("</tr>").unwrap();
        html[start..end].to_owned()
    };
    let gpt5 = row(&html, "gpt-5");
    assert!(gpt5.contains("value=\"1.234\""), "{gpt5}");
    assert!(gpt5.contains("autofocus"), "{gpt5}");
    assert!(gpt5.contains(r#"aria-invalid="true""#), "{gpt5}");
    let gpt4o = row(&html, "gpt-4o");
    assert!(gpt4o.contains("value=\"44,50\""), "{gpt4o}");
    assert!(!gpt4o.contains("autofocus"), "{gpt4o}");
    let switch = |row: &str, id: &str| {
        let start = row.find(&format!("id=\"enabled-{id}\"")).unwrap();
        row[start..start + row[start..].find('>').unwrap()].to_owned()
    };
    assert!(switch(&gpt4o, "gpt-4o").contains("checked"), "{gpt4o}");
    assert!(!switch(&gpt5, "gpt-5").contains("checked"), "{gpt5}");
    // Rows not changed show their saved values.
    let mini = row(&html, "gpt-5-mini");
    assert!(mini.contains("value=\"\""), "{mini}");
    // Once: a reload shows the saved values.
    let (_, _, html) = panel.send(get(&refused, Some(&admin))).await;
    assert!(row(&html, "gpt-4o").contains("value=\"\""), "{html}");
}

/// A form posted without JavaScript once the session has ended (signed out in
/// another tab, say) changes nothing and goes to the sign-in page, which says
/// the change was not saved and leads back to the page the form was on. A
/// script's call is still answered 401 in the functions' shape.
#[tokio::test]
async fn a_form_posted_once_signed_out_goes_to_sign_in_and_says_why() {
    let panel = Panel::new().await;
    let admin = panel.sign_in("ada@example.com").await;
    let (status, _, _) = panel.send(post("/fn/logout", "", Some(&admin))).await;
    assert!(status.is_success() || status.is_redirection(), "{status}");
    let version = panel.settings().await.version;
    let form = format!("automatic_fallback=off&settings_version={version}");
    let mut request = post("/fn/save_automatic_fallback", &form, Some(&admin));
    let headers = request.headers_mut();
    headers.insert(header::ACCEPT, "text/html,*/*".parse().unwrap());
    headers.insert(
        header::REFERER,
        "http://tollgate.test/admin/token-limits?__path=%2Ffn%2Fsave_model_limits&__err=x"
            .parse()
            .unwrap(),
    );
    let (status, headers, _) = panel.send(request).await;
    assert_eq!(status, StatusCode::FOUND);
    let location = headers[header::LOCATION].to_str().unwrap();
    assert_eq!(
        location,
        "/login?next=%2Fadmin%2Ftoken-limits&reason=signed_out"
    );
    assert!(panel.settings().await.automatic_fallback, "nothing changed");
    let (status, _, html) = panel.send(get(location, None)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("id=\"signed-out\""), "{html}");
    assert!(html.contains("your change was not saved"), "{html}");
    assert!(
        html.contains(r#"name="next" value="/admin/token-limits""#),
        "{html}"
    );
    // Only then: a visitor sent to sign in for another reason is not told so.
    let (_, _, html) = panel
        .send(get("/login?next=%2Fadmin%2Ftoken-limits", None))
        .await;
    assert!(!html.contains("id=\"signed-out\""), "{html}");

    let (status, _, body) = panel
        .send(post("/fn/save_automatic_fallback", &form, Some(&admin)))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("\"code\":\"unauthorized\""), "{body}");
}

/// Every kind of the panel's answers tells browsers: never in another site's
/// frame, never run as another type, never send its addresses elsewhere, and
/// never keep a page.
#[tokio::test]
async fn panel_answers_keep_browsers_safe() {
    let panel = Panel::new().await;
    let admin = panel.sign_in("ada@example.com").await;
    let answers = [
        ("the sign-in page", get("/login", None)),
        ("the tab", get("/admin/token-limits", Some(&admin))),
        ("a redirect to sign in", get("/admin/token-limits", None)),
        ("an unknown page", get("/nope", Some(&admin))),
        (
            "a refused sign-in",
            post("/fn/login", "email=x&password=y", None),
        ),
        (
            "a refused save",
            post(
                "/fn/save_automatic_fallback",
                "settings_version=x",
                Some(&admin),
            ),
        ),
        ("the stylesheet", get("/pkg/tollgate.css", None)),
    ];
    for (what, request) in answers {
        let (status, headers, body) = panel.send(request).await;
        assert!(
            status != StatusCode::INTERNAL_SERVER_ERROR,
            "{what}: {body}"
        );
        for (name, value) in [
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::CONTENT_SECURITY_POLICY, "frame-ancestors 'none'"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "same-origin"),
        ] {
            assert_eq!(
                headers.get(&name).map(|v| v.to_str().unwrap()),
                Some(value),
                "{what} ({status}): {name}"
            );
        }
        // A page or an answer about the books is never kept by the browser,
        // where Back after signing out would show it again; the site's files
        // are kept, and asked after each time (a build without them answers
        // 404, which is not kept either).
        let kept = if what == "the stylesheet" && status.is_success() {
            "no-cache"
        } else {
            "no-store"
        };
        assert_eq!(
            headers
                .get(header::CACHE_CONTROL)
                .map(|v| v.to_str().unwrap()),
            Some(kept),
            "{what} ({status}): cache-control"
        );
    }
}

/// server_fn ignores a field its arguments do not take: such a call (a typo in
/// a script, a field meant for another function) is refused before it runs,
/// naming the field, and changes nothing; a caller who may not make the call
/// is told that first.
#[tokio::test]
async fn a_call_with_a_field_its_arguments_do_not_take_changes_nothing() {
    let panel = Panel::new().await;
    let admin = panel.sign_in("ada@example.com").await;
    let member = panel.sign_in("bob@example.com").await;
    let before = panel.store.spend_snapshot(Utc::now()).await.unwrap();
    let version = before.settings.version;
    let row = "rows[0][model]=gpt-5&rows[0][limit]=5&rows[0][enabled]=on&rows[0][version]=0";
    for (path, body, field) in [
        (
            "/fn/save_model_limits",
            format!("{row}&settings_version={version}"),
            "settings_version",
        ),
        (
            "/fn/save_model_limits",
            format!("{row}&rows[0][enabeld]=on"),
            "rows[0][enabeld]",
        ),
        (
            "/fn/save_automatic_fallback",
            format!("automatic_fallback=on&settings_version={version}&rows[0][model]=gpt-5"),
            "rows",
        ),
        (
            "/fn/login",
            "email=ada@example.com&password=x&remember=on".to_owned(),
            "remember",
        ),
    ] {
        let (status, _, text) = panel.send(post(path, &body, Some(&admin))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body}: {text}");
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["code"], "bad_request", "{text}");
        assert!(
            json["message"]
                .as_str()
                .unwrap()
                .contains(&format!("unknown field `{field}`")),
            "{body}: {text}"
        );
    }
    let body = format!("{row}&settings_version={version}");
    let (status, _, text) = panel
        .send(post("/fn/save_model_limits", &body, Some(&member)))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
    let (status, _, text) = panel.send(post("/fn/save_model_limits", &body, None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
    let after = panel.store.spend_snapshot(Utc::now()).await.unwrap();
    assert_eq!(after.settings, before.settings);
    assert_eq!(after.models, before.models);
    assert!(panel.settings_audit().await.is_empty());
    // The same row alone saves.
    let (status, _, text) = panel
        .send(post("/fn/save_model_limits", row, Some(&admin)))
        .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(panel.settings_audit().await.len(), 1);
    // A row without its Limit or version field (which the page always sends)
    // is refused, naming it: not read as clearing the limit, nor as a change
    // made on a stale page.
    let saved = panel.store.spend_snapshot(Utc::now()).await.unwrap();
    let version = saved
        .models
        .iter()
        .find(|m| m.id.as_str() == "gpt-5")
        .unwrap()
        .limit
        .version;
    for (body, missing) in [
        (
            format!("rows[0][model]=gpt-5&rows[0][version]={version}"),
            "missing field `limit`",
        ),
        (
            "rows[0][model]=gpt-5&rows[0][limit]=55".to_owned(),
            "missing field `version`",
        ),
    ] {
        let (status, _, text) = panel
            .send(post("/fn/save_model_limits", &body, Some(&admin)))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {text}");
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["code"], "bad_request", "{text}");
        assert!(
            json["message"].as_str().unwrap().contains(missing),
            "the missing field is named: {text}"
        );
    }
    let after = panel.store.spend_snapshot(Utc::now()).await.unwrap();
    assert_eq!(after.models, saved.models);
    assert_eq!(panel.settings_audit().await.len(), 1);
}

#[tokio::test]
async fn malformed_server_function_calls_get_400_not_a_crash() {
    let panel = Panel::new().await;
    let admin = panel.sign_in("ada@example.com").await;
    let (status, _, text) = panel
        .send(post("/fn/login", "email=ada@example.com", None))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["code"], "bad_request", "{text}");
    assert!(
        json["message"].as_str().unwrap().contains("`password`"),
        "the missing field is named: {text}"
    );
    // An argument of the wrong shape is named, in the words of the form, not
    // of the parser's types.
    for (path, body, named) in [
        ("/fn/save_model_limits", "rows=1", "`rows`"),
        ("/fn/save_model_limits", "rows[0]=x", "`rows[0]`"),
        (
            "/fn/save_model_limits",
            "rows[0][model][a]=gpt-5",
            "`rows[0].model`",
        ),
        (
            "/fn/save_automatic_fallback",
            "settings_version[a]=5",
            "`settings_version`",
        ),
        ("/fn/login", "email[a]=x&password=p", "`email`"),
    ] {
        let (status, _, text) = panel.send(post(path, body, Some(&admin))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body}: {text}");
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["code"], "bad_request", "{text}");
        let message = json["message"].as_str().unwrap();
        assert!(message.contains(named), "{body}: {text}");
        assert!(!message.contains("QsDeserializer"), "{body}: {text}");
    }
    // A version that is not a number is named as the field at fault, and
    // nothing is saved.
    let before = panel.store.spend_snapshot(Utc::now()).await.unwrap();
    for (path, body, field) in [
        (
            "/fn/save_model_limits",
            "rows[0][model]=gpt-5&rows[0][limit]=5&rows[0][version]=abc",
            "gpt-5",
        ),
        (
            "/fn/save_model_limits",
            "rows[0][model]=gpt-5&rows[0][limit]=5&rows[0][version]=-1",
            "gpt-5",
        ),
        (
            "/fn/save_model_limits",
            "rows[0][model]=gpt-5&rows[0][limit]=5&rows[0][version]=%2B0",
            "gpt-5",
        ),
        (
            "/fn/save_automatic_fallback",
            "settings_version=x",
            "settings_version",
        ),
        (
            "/fn/save_automatic_fallback",
            "settings_version=%2B0",
            "settings_version",
        ),
        (
            "/fn/save_automatic_fallback",
            "automatic_fallback=on&settings_version=",
            "settings_version",
        ),
    ] {
        let (status, _, text) = panel.send(post(path, body, Some(&admin))).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{path}: {text}");
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["code"], "invalid", "{path}: {text}");
        assert_eq!(json["fields"][0]["field"], field, "{path}: {text}");
        assert_eq!(
            json["fields"][0]["code"], "invalid_version",
            "{path}: {text}"
        );
    }
    let after = panel.store.spend_snapshot(Utc::now()).await.unwrap();
    assert_eq!(after.settings, before.settings);
    assert_eq!(after.models, before.models);
    // The Enabled toggle is on or off, never guessed: a value but `on`, `true`,
    // `off` or `false` refuses the save; `off` saves the limit disabled.
    let gpt5 = |snapshot: &app::store::SpendSnapshot| {
        snapshot
            .models
            .iter()
            .find(|m| m.id.as_str() == "gpt-5")
            .map(|m| m.limit)
            .unwrap_or_default()
    };
    let save = |enabled: &str| {
        format!(
            "rows[0][model]=gpt-5&rows[0][limit]=5&rows[0][enabled]={enabled}&rows[0][version]={}",
            gpt5(&after).version
        )
    };
    let (status, _, text) = panel
        .send(post("/fn/save_model_limits", &save("maybe"), Some(&admin)))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{text}");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["fields"][0]["field"], "gpt-5", "{text}");
    assert_eq!(json["fields"][0]["code"], "invalid_enabled", "{text}");
    assert_eq!(
        panel.store.spend_snapshot(Utc::now()).await.unwrap().models,
        after.models
    );
    let (status, _, text) = panel
        .send(post("/fn/save_model_limits", &save("off"), Some(&admin)))
        .await;
    assert!(status.is_success(), "{status}: {text}");
    let saved = gpt5(&panel.store.spend_snapshot(Utc::now()).await.unwrap());
    assert_eq!(
        saved.limit,
        app::domain::ModelLimit {
            limit: Some(app::domain::Nanos::new(5_000_000_000)),
            enabled: false
        }
    );
    // The automatic fallback toggle is read the same way: `off` and `false` save
    // it off, any value but the four refuses the save.
    let fallback = |value: &str, version: i64| {
        format!("automatic_fallback={value}&settings_version={version}")
    };
    let settings = panel.settings().await;
    assert!(settings.automatic_fallback, "on by default");
    let (status, _, text) = panel
        .send(post(
            "/fn/save_automatic_fallback",
            &fallback("maybe", settings.version),
            Some(&admin),
        ))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{text}");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["fields"][0]["field"], "automatic_fallback", "{text}");
    assert_eq!(json["fields"][0]["code"], "invalid_enabled", "{text}");
    assert_eq!(panel.settings().await, settings);
    for (value, on) in [
        ("off", false),
        ("true", true),
        ("false", false),
        ("on", true),
    ] {
        let version = panel.settings().await.version;
        let (status, _, text) = panel
            .send(post(
                "/fn/save_automatic_fallback",
                &fallback(value, version),
                Some(&admin),
            ))
            .await;
        assert!(status.is_success(), "{value}: {status}: {text}");
        assert_eq!(panel.settings().await.automatic_fallback, on, "{value}");
    }
    // A body that is not UTF-8 is an error in the call's arguments (server_fn
    // reports it in the words of a client reading results).
    let mut request = post("/fn/save_automatic_fallback", "", Some(&admin));
    *request.body_mut() = Body::from(b"automatic_fallback=\xff\xfe".to_vec());
    let (status, _, text) = panel.send(request).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["code"], "bad_request", "{text}");
    let message = json["message"].as_str().unwrap();
    assert!(
        message.contains("arguments") && !message.contains("results"),
        "{text}"
    );
}

/// A server function's arguments come form-encoded: a body of another type (JSON,
/// plain text) is refused with 415 `unsupported_media_type` and nothing saved,
/// instead of being read as a form and reported as missing the fields it has; a
/// form with a charset is a form. A compressed body is refused with 415
/// `unsupported_content_encoding`, one past 1 MiB with 413 `payload_too_large`. A server function called with GET is told so
/// in JSON (405 `method_not_allowed`, `Allow: POST`), not with an empty body.
#[tokio::test]
async fn server_functions_take_forms_by_post_and_say_so() {
    use header::{HeaderName, HeaderValue};
    let panel = Panel::new().await;
    let admin = panel.sign_in("ada@example.com").await;
    let version = panel.settings().await.version;
    // A save of the fallback toggle (off) with `name: value` among its headers.
    let save_with = |name: HeaderName, value: HeaderValue, body: &str| {
        let mut request = post("/fn/save_automatic_fallback", body, Some(&admin));
        request.headers_mut().insert(name, value);
        panel.send(request)
    };
    let form = format!("settings_version={version}");
    for (content_type, body) in [
        (
            "application/json",
            format!(r#"{{"settings_version":"{version}"}}"#),
        ),
        ("text/plain", form.clone()),
        ("nonsense", form.clone()),
    ] {
        let (status, _, text) = save_with(
            header::CONTENT_TYPE,
            HeaderValue::from_static(content_type),
            &body,
        )
        .await;
        assert_eq!(
            status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type}: {text}"
        );
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["code"], "unsupported_media_type", "{text}");
    }
    // Compressed, or larger than a form of the tab can be: refused alike.
    let gzip = HeaderValue::from_static("gzip");
    let (status, _, text) = save_with(header::CONTENT_ENCODING, gzip, &form).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{text}");
    assert!(text.contains("unsupported_content_encoding"), "{text}");
    let big = format!("{form}&pad={}", "x".repeat(2 << 20));
    let length = HeaderValue::from(big.len());
    let (status, _, text) = save_with(header::CONTENT_LENGTH, length, &big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
    assert!(text.contains("payload_too_large"), "{text}");
    assert!(
        panel.settings().await.automatic_fallback,
        "nothing was saved"
    );
    let charset = HeaderValue::from_static("application/x-www-form-urlencoded; charset=UTF-8");
    let (status, _, text) = save_with(header::CONTENT_TYPE, charset, &form).await;
    assert!(status.is_success(), "{status}: {text}");
    assert!(!panel.settings().await.automatic_fallback, "saved");

    let (status, headers, text) = panel.send(get("/fn/token_limits", Some(&admin))).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{text}");
    assert_eq!(headers[header::ALLOW], "POST");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["code"], "method_not_allowed", "{text}");
}

/// An administrator calling a server function that does not exist gets JSON
/// with a code and a message, not the HTML page.
#[tokio::test]
async fn unknown_server_functions_answer_json() {
    let panel = Panel::new().await;
    let admin = panel.sign_in("ada@example.com").await;
    for path in [
        "/fn/nope",
        "/fn//nope",
        "/fn/token_limits/extra",
        "/fn/",
        "/fn",
    ] {
        let (status, _, text) = panel.send(post(path, "", Some(&admin))).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {text}");
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["code"], "unknown_server_function", "{path}");
        assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
}

/// Signed in already (Back after signing in, an old link), the login page
/// leads on to where a sign-in would have; a member sent to sign in by an
/// Admin Panel page lands on the start page, not on its refusal.
#[tokio::test]
async fn signed_in_users_are_led_past_the_login_page_to_what_they_may_open() {
    let panel = Panel::new().await;
    let admin = panel.sign_in("ada@example.com").await;
    let member = panel.sign_in("bob@example.com").await;
    for (cookie, url, landing) in [
        (&admin, "/login", "/admin/token-limits"),
        (&admin, "/login?next=%2F", "/"),
        (
            &admin,
            "/login?next=%2F%2Fevil.example",
            "/admin/token-limits",
        ),
        (&member, "/login?next=%2Fadmin%2Ftoken-limits", "/"),
        (&member, "/login?next=%2F%3Fa%3Db", "/?a=b"),
    ] {
        let (status, headers, _) = panel.send(get(url, Some(cookie))).await;
        assert_eq!(status, StatusCode::FOUND, "{url}");
        assert_eq!(headers[header::LOCATION], landing, "{url}");
    }
    let (status, _, html) = panel.send(get("/login", None)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("Sign in to Tollgate"), "{html}");

    let form = format!(
        "email=bob%40example.com&password={}&next=%2Fadmin%2Ftoken-limits",
        PASSWORD.replace(' ', "+")
    );
    let (status, headers, body) = panel.send(post("/fn/login", &form, None)).await;
    assert!(
        status.is_success() || status.is_redirection(),
        "{status} {body}"
    );
    assert_eq!(headers[header::LOCATION], "/", "{body}");
    let form = form.replace("bob%40", "ada%40");
    let (_, headers, body) = panel.send(post("/fn/login", &form, None)).await;
    assert_eq!(headers[header::LOCATION], "/admin/token-limits", "{body}");
}

#[tokio::test]
async fn members_can_sign_out() {
    let panel = Panel::new().await;
    let member = panel.sign_in("bob@example.com").await;
    let (status, _, text) = panel.send(post("/fn/logout", "", Some(&member))).await;
    assert!(
        status.is_success() || status.is_redirection(),
        "{status} {text}"
    );
    // The old cookie no longer opens the start page.
    let (status, _, _) = panel.send(get("/", Some(&member))).await;
    assert_eq!(status, StatusCode::FOUND);
}

/// A session signed in by a version without session epochs, whose disables did
/// not end sessions for good, is signed out: it may be one such a disable should
/// have ended.
/// A sign-in while another program holds SQLite's write lock past the wait is
/// answered 503 `unavailable` (try again), not a bare 500 from the session layer,
/// and leaves no session behind; once the lock is let go, the same sign-in works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_in_under_a_long_lock_gets_503_and_no_session() {
    let panel = Panel::new().await;
    let form = format!(
        "email=ada@example.com&password={}",
        PASSWORD.replace(' ', "+")
    );

    let holder = WriteLockHolder::take(&panel.db.url).await;
    let (status, headers, body) = panel.send(post("/fn/login", &form, None)).await;
    holder.release().await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["code"], "unavailable", "{body}");
    assert!(
        headers.get(header::SET_COOKIE).is_none(),
        "no session for a failed sign-in: {headers:?}"
    );

    let cookie = panel.sign_in("ada@example.com").await;
    panel.open_tab(&cookie).await;
}

/// A panel on PostgreSQL (`None` when `TEST_DATABASE_URL` is unset) reached
/// through a [`common::cut::Link`], with an administrator signed in who has
/// opened the tab: the panel, the link, the session cookie and the settings'
/// version.
async fn admin_through_link() -> Option<(Panel, common::cut::Link, String, i64)> {
    let db = TestDb::postgres().await?;
    let link = common::cut::Link::to_server_of(&db.url).await;
    let url = link.url_through(&db.url);
    let panel = Panel::on(None, db, url).await;
    let admin = panel.sign_in("ada@example.com").await;
    panel.open_tab(&admin).await;
    let version = panel.settings().await.version;
    Some((panel, link, admin, version))
}

/// A PostgreSQL database renamed under the panel (its role refused would do
/// the same): the session store's error does not say that the database is out
/// of reach, but a signed-in administrator is not taken for signed out all the
/// same: the tab answers 503 and a save 503 `database_unavailable`; once the
/// database has its name again, the same session opens the tab.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_renamed_is_not_a_sign_out() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let url = db.url.clone();
    let name = url::Url::parse(&url).unwrap().path()[1..].to_owned();
    let panel = Panel::on(None, db, url.clone()).await;
    let admin = panel.sign_in("ada@example.com").await;
    panel.open_tab(&admin).await;
    let version = panel.settings().await.version;
    let mut maintenance = url::Url::parse(&url).unwrap();
    maintenance.set_path("/postgres");
    let server = sqlx::PgPool::connect(maintenance.as_str()).await.unwrap();
    let rename = |from: String, to: String| {
        let server = server.clone();
        async move {
            // The panel's pools connect again now and then: ended, then renamed,
            // until no connection comes in between.
            for _ in 0..50 {
                sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = $1 AND pid <> pg_backend_pid()",
                )
                .bind(&from)
                .execute(&server)
                .await
                .unwrap();
                let renamed = sqlx::query(&format!("ALTER DATABASE \"{from}\" RENAME TO \"{to}\""))
                    .execute(&server)
                    .await;
                if renamed.is_ok() {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            panic!("{from} could not be renamed");
        }
    };
    let moved = format!("{name}_moved");
    rename(name.clone(), moved.clone()).await;
    let (status, _, body) = panel.send(get("/admin/token-limits", Some(&admin))).await;
    let (save_status, _, save) = panel
        .send(post(
            "/fn/save_automatic_fallback",
            &format!("settings_version={version}"),
            Some(&admin),
        ))
        .await;
    rename(moved, name).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(save_status, StatusCode::SERVICE_UNAVAILABLE, "{save}");
    let error: serde_json::Value = serde_json::from_str(&save).unwrap();
    assert_eq!(error["code"], "database_unavailable", "{save}");
    panel.open_tab(&admin).await;
    assert!(
        panel.settings().await.automatic_fallback,
        "nothing was saved"
    );
}

/// While the database is out of reach (PostgreSQL; here the link to it is cut),
/// a signed-in administrator is not taken for signed out: the tab answers 503
/// with the reason instead of sending them to sign in, a save is refused with
/// 503 `database_unavailable` instead of 401, and so is a sign-in. Once the
/// database is back, the same session opens the tab again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_out_of_reach_is_not_a_sign_out() {
    let Some((panel, link, admin, version)) = admin_through_link().await else {
        return;
    };

    link.cut();
    let (status, headers, body) = panel.send(get("/admin/token-limits", Some(&admin))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(headers.contains_key(header::RETRY_AFTER));
    assert!(
        body.contains("cannot reach or write to its database"),
        "{body}"
    );
    let body = format!("settings_version={version}");
    let (status, _, body) = panel
        .send(post("/fn/save_automatic_fallback", &body, Some(&admin)))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["code"], "database_unavailable", "{body}");
    let (status, _, body) = panel.send(post("/fn/me", "", Some(&admin))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let form = format!(
        "email=ada@example.com&password={}",
        PASSWORD.replace(' ', "+")
    );
    let (status, _, body) = panel.send(post("/fn/login", &form, None)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["code"], "database_unavailable", "{body}");

    link.mend().await;
    panel.open_tab(&admin).await;
    assert!(
        panel.settings().await.automatic_fallback,
        "nothing was saved"
    );
}

/// When the network to PostgreSQL stops carrying packets without closing a
/// connection (here the link is frozen), a signed-in administrator's tab and
/// saves are answered 503 once the pool has waited its 10 s for a connection
/// that answers (each is checked before use), instead of waiting for TCP to
/// give up; once the network carries again, the same session opens the tab,
/// nothing saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_stops_answering_holds_the_tab_up_for_seconds_not_minutes() {
    let Some((panel, link, admin, version)) = admin_through_link().await else {
        return;
    };

    link.freeze();
    let sent = std::time::Instant::now();
    let body = format!("settings_version={version}");
    let ((page, _, _), (save, _, saved)) = tokio::join!(
        panel.send(get("/admin/token-limits", Some(&admin))),
        panel.send(post("/fn/save_automatic_fallback", &body, Some(&admin))),
    );
    let waited = sent.elapsed();
    assert_eq!(page, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(save, StatusCode::SERVICE_UNAVAILABLE, "{saved}");
    let error: serde_json::Value = serde_json::from_str(&saved).unwrap();
    assert_eq!(error["code"], "database_unavailable", "{saved}");
    assert!(waited < std::time::Duration::from_secs(20), "{waited:?}");

    link.mend().await;
    panel.open_tab(&admin).await;
    assert!(
        panel.settings().await.automatic_fallback,
        "nothing was saved"
    );
}

#[tokio::test]
async fn a_session_from_before_session_epochs_is_signed_out() {
    use tower_sessions::SessionStore;
    let panel = Panel::new().await;
    let cookie = panel.sign_in("ada@example.com").await;
    panel.open_tab(&cookie).await;

    // The record as such a version left it: the user's id and no epoch.
    let id: tower_sessions::session::Id = cookie.split_once('=').unwrap().1.parse().unwrap();
    let mut record = panel.sessions.load(&id).await.unwrap().unwrap();
    assert!(record.data.remove(app::auth::SESSION_EPOCH).is_some());
    assert!(record.data.contains_key(app::auth::SESSION_USER_ID));
    panel.sessions.save(&record).await.unwrap();

    panel.assert_signed_out(&cookie).await;
}

/// An administrator the operator disables is signed out at their next request,
/// their open session saves nothing, and they cannot sign in again.
#[tokio::test]
async fn a_disabled_administrator_is_signed_out_and_stays_out() {
    let panel = Panel::new().await;
    let admin = panel.sign_in("ada@example.com").await;
    panel.open_tab(&admin).await;
    let version = panel.settings().await.version;

    panel
        .store
        .disable_user(&app::store::Actor::Cli, "ada@example.com", Utc::now())
        .await
        .unwrap();
    panel.assert_signed_out(&admin).await;
    let body = format!("settings_version={version}");
    let (status, _, text) = panel
        .send(post("/fn/save_automatic_fallback", &body, Some(&admin)))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
    assert!(
        panel.settings().await.automatic_fallback,
        "nothing was saved"
    );
    let (status, headers, text) = panel
        .send(post(
            "/fn/login",
            &format!(
                "email=ada@example.com&password={}",
                PASSWORD.replace(' ', "+")
            ),
            None,
        ))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
    assert!(text.contains("invalid_credentials"), "{text}");
    assert!(headers.get(header::SET_COOKIE).is_none());
}

/// A session signed in before its user was disabled stays ended once the user is
/// enabled again: only a new sign-in opens the tab.
#[tokio::test]
async fn a_session_ended_by_a_disable_stays_ended_after_enable() {
    let panel = Panel::new().await;
    let before = panel.sign_in("ada@example.com").await;
    panel.open_tab(&before).await;

    let cli = app::store::Actor::Cli;
    panel
        .store
        .disable_user(&cli, "ada@example.com", Utc::now())
        .await
        .unwrap();
    panel
        .store
        .enable_user(&cli, "ADA@example.com", Utc::now())
        .await
        .unwrap();
    panel.assert_signed_out(&before).await;
    let version = panel.settings().await.version;
    let body = format!("settings_version={version}");
    let (status, _, text) = panel
        .send(post("/fn/save_automatic_fallback", &body, Some(&before)))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");

    let after = panel.sign_in("ada@example.com").await;
    panel.open_tab(&after).await;
}

/// A page's path with a trailing slash is sent to the path without it (the
/// panel's router would otherwise render the tab under the fallback's 404); a
/// path that would then name another host is not.
#[tokio::test]
async fn trailing_slashes_redirect_to_the_page() {
    let panel = Panel::new().await;
    let admin = panel.sign_in("ada@example.com").await;
    for (path, location) in [
        ("/admin/token-limits/", "/admin/token-limits"),
        ("/admin/token-limits//?tab=1", "/admin/token-limits?tab=1"),
    ] {
        let (status, headers, _) = panel.send(get(path, Some(&admin))).await;
        assert_eq!(status, StatusCode::PERMANENT_REDIRECT, "{path}");
        assert_eq!(headers[header::LOCATION], location, "{path}");
    }
    // A path that would start with `//` (another host, to a browser) is sent
    // to a path of this host.
    let (status, headers, _) = panel.send(get("//evil.example/", Some(&admin))).await;
    assert_eq!(status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(headers[header::LOCATION], "/evil.example");
    panel.open_tab(&admin).await;
}

/// However its path is spelled (`/./`, `/../`, `//`, `%2e`, `%61`), a page gets
/// its access rule before anything renders, and then one address (DESIGN.md §5).
#[tokio::test]
async fn every_spelling_of_a_page_gets_its_access_rule() {
    let panel = Panel::new().await;
    let member = panel.sign_in("bob@example.com").await;
    let admin = panel.sign_in("ada@example.com").await;
    for path in [
        "/./admin/token-limits",
        "/foo/../admin/token-limits",
        "//admin/token-limits",
        "/%2e/admin/token-limits",
        "/%61dmin/token-limits",
    ] {
        let (status, headers, _) = panel.send(get(path, None)).await;
        assert_eq!(status, StatusCode::FOUND, "{path} anonymous");
        assert!(
            headers[header::LOCATION]
                .to_str()
                .unwrap()
                .starts_with("/login"),
            "{path}"
        );
        let (status, _, text) = panel.send(get(path, Some(&member))).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path} member");
        assert!(!text.contains("Token Limits ·"), "{path} member: {text}");
        // Dot-segments and empty segments are another spelling of the page:
        // the administrator is sent to its one address. A percent-encoded
        // letter makes another path, which the router does not know.
        let (status, headers, _) = panel.send(get(path, Some(&admin))).await;
        if path.contains("%61") {
            assert_eq!(status, StatusCode::NOT_FOUND, "{path} admin");
        } else {
            assert_eq!(status, StatusCode::PERMANENT_REDIRECT, "{path} admin");
            assert_eq!(headers[header::LOCATION], "/admin/token-limits", "{path}");
        }
    }
}
