//! The OpenAI-compatible gateway, the usage API and the metrics (DESIGN.md §4, §7).
//!
//! Routes (see [`routes`]):
//! - `POST /v1/chat/completions`, streamed (SSE) or not ([`chat`]);
//! - `GET /v1/models`, `GET /v1/models/{model}` ([`models`]);
//! - any other `/v1/...`: an OpenAI-shaped 404, never an HTML page;
//! - `POST /api/v1/admissions`, `.../{id}/settle`, `.../{id}/release`,
//!   `.../{id}/renew`, `POST /api/v1/usage` ([`usage_api`]);
//! - `GET /metrics`: Prometheus text ([`metrics`]).
//!
//! Every spending route goes through admission (R6) in the store's atomic step;
//! every hold is settled or released exactly once (R7, [`hold`]).

pub mod caller;
pub mod chat;
pub mod error;
pub mod hold;
mod json;
pub mod metrics;
pub mod models;
pub mod request;
pub mod spool;
pub mod sse;
pub mod upstream;
pub mod usage_api;

use std::{collections::HashMap, sync::Arc, time::Duration};

use app::domain::Catalog;
use app::store::SharedStore;
use axum::{
    body::{Body, Bytes},
    extract::{FromRef, State},
    http::{header, HeaderMap, HeaderValue, Method, Uri},
    response::{IntoResponse, Response},
    routing::{any, get, post},
    Router,
};

pub use error::GatewayError;
pub use metrics::Metrics;

use crate::config::Config;
use upstream::{Secret, Target};

/// The header naming the model that served a request (DESIGN.md R6).
pub const SERVED_MODEL_HEADER: &str = "x-tollgate-model";
/// How long to wait for an upstream connection, whatever the upstream's timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How the owner of a usage-API admission begins (`usage-api-<pid>-<uuid>`; a
/// chat completion's hold is `gateway-<pid>-<uuid>`). The usage API settles,
/// releases and renews only those: the gateway's own holds end with their
/// exchange, which bills what the upstream reported (R7).
const USAGE_API_OWNER_PREFIX: &str = "usage-api-";

/// Which of the process's routes takes a reservation, written on it as its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Taker {
    /// A chat completion's exchange, which ends its own hold.
    Exchange,
    /// A usage-API admission, which its caller ends through the usage API.
    UsageApi,
}

impl Taker {
    /// Who took the reservation whose owner id is `owner`, this process or
    /// any other.
    pub(crate) fn of_owner(owner: &str) -> Taker {
        if owner.starts_with(USAGE_API_OWNER_PREFIX) {
            Taker::UsageApi
        } else {
            Taker::Exchange
        }
    }
}

/// Everything the gateway's handlers share: the store, the catalog, the upstreams
/// with their keys, the HTTP client, the metrics, and this process's owner id for
/// leases.
pub struct Gateway {
    store: SharedStore,
    catalog: Arc<Catalog>,
    max_request_bytes: usize,
    request_body_timeout: Duration,
    upstreams: HashMap<String, Target>,
    http: reqwest::Client,
    /// Written on the holds of this process's chat completions.
    owner: String,
    /// Written on this process's usage-API admissions: [`USAGE_API_OWNER_PREFIX`]
    /// and the same process id.
    usage_api_owner: String,
    metrics: Metrics,
    /// Callers authenticated a moment ago, for the routes that spend.
    callers: caller::CallerCache,
    /// The upstream exchanges in flight, each settling its own reservation
    /// (`chat`): a shutdown waits for them ([`Gateway::finish_exchanges`]).
    exchanges: tokio_util::task::TaskTracker,
    /// Settlements the database has not taken yet, on disk ([`spool`]).
    spool: spool::Spool,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("owner", &self.owner)
            .field("upstreams", &self.upstreams)
            .finish_non_exhaustive()
    }
}

/// The gateway as it sits in the router's state.
pub type SharedGateway = Arc<Gateway>;

impl Gateway {
    /// A gateway over `store` for `config`'s catalog and upstreams, reading each
    /// upstream's key with `env` (the name in `api_key_env` → its value, as
    /// `std::env::var` answers). A variable unset, empty or not UTF-8 is logged
    /// by name, once, and the upstream is called without a key.
    ///
    /// Infallible by design, so that the router state can always be built: the
    /// metric names are fixed, and the rustls client with compiled-in roots has no
    /// failing part; should building it fail all the same, reqwest's default
    /// client is used, which reports the cause at start-up.
    pub fn new(
        config: &Config,
        store: SharedStore,
        env: impl Fn(&str) -> Result<String, std::env::VarError>,
    ) -> Gateway {
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| {
                let key = u.api_key_env.as_deref().and_then(|var| {
                    // A secret file's trailing line break is not part of the key.
                    let key = match env(var) {
                        Ok(key) if !key.trim().is_empty() => key.trim().to_owned(),
                        Err(std::env::VarError::NotUnicode(_)) => {
                            tracing::error!(upstream = %u.name, variable = %var,
                                "the upstream's key variable is not valid UTF-8, so it cannot \
                                 be a key: calling it without a key");
                            return None;
                        }
                        _ => {
                            tracing::warn!(upstream = %u.name, variable = %var,
                                "the upstream's key variable is unset or empty: calling it without a key");
                            return None;
                        }
                    };
                    let secret = Secret::new(key);
                    if secret.is_none() {
                        tracing::error!(upstream = %u.name, variable = %var,
                            "the upstream's key holds a character an HTTP header cannot carry \
                             (a line break or another control character inside it): \
                             calling it without a key");
                    }
                    secret
                });
                let target = Target {
                    name: u.name.clone(),
                    chat_url: u.chat_completions_url.clone(),
                    key,
                    timeout: u.timeout,
                };
                (u.name.clone(), target)
            })
            .collect();
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            // An upstream's redirect is answered as its failure (`Target::failure`):
            // followed, a 301 or 302 would turn the completion into a GET.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "could not build the upstream HTTP client; using the default one");
                reqwest::Client::new()
            });
        // Tells this process's holds from those of another, or of its restart.
        let process = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
        Gateway {
            store,
            catalog: config.setup.catalog.clone(),
            max_request_bytes: config.max_request_bytes,
            request_body_timeout: config.request_body_timeout,
            upstreams,
            http,
            owner: format!("gateway-{process}"),
            usage_api_owner: format!("{USAGE_API_OWNER_PREFIX}{process}"),
            metrics: Metrics::for_models(
                config
                    .setup
                    .catalog
                    .models()
                    .iter()
                    .map(|model| model.id.as_str()),
            ),
            callers: caller::CallerCache::default(),
            exchanges: tokio_util::task::TaskTracker::new(),
            spool: spool::Spool::new(config.settlement_spool.clone()),
        }
    }

    /// Wait until every upstream exchange in flight has ended and settled its
    /// reservation (DESIGN.md R7), including those whose client has gone: the
    /// usage happened and the provider bills it. For a shutdown, after the
    /// server has stopped taking requests; each exchange is bounded by its
    /// upstream's timeout.
    pub async fn finish_exchanges(&self) {
        self.exchanges.close();
        if !self.exchanges.is_empty() {
            tracing::info!(
                in_flight = self.exchanges.len(),
                "waiting for upstream exchanges to finish and settle"
            );
        }
        self.exchanges.wait().await;
    }

    /// [`Gateway::new`] with the keys from the process environment, shared.
    pub fn from_env(config: &Config, store: SharedStore) -> SharedGateway {
        Arc::new(Gateway::new(config, store, |name| std::env::var(name)))
    }

    /// Settles what waits in the settlement spool (see [`hold::replay_spool`]).
    ///
    /// Errors: the I/O error when the spool's folder cannot be listed.
    pub async fn replay_spool(&self) -> std::io::Result<hold::Replayed> {
        hold::replay_spool(self).await
    }

    /// The settlement spool's folder.
    pub fn spool_dir(&self) -> &std::path::Path {
        self.spool.dir()
    }

    /// This process's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The owner id written on the holds of this process's chat completions.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The owner id written on reservations taken by `taker`.
    fn owner_for(&self, taker: Taker) -> &str {
        match taker {
            Taker::Exchange => &self.owner,
            Taker::UsageApi => &self.usage_api_owner,
        }
    }

    /// Counts `result` under `endpoint` and `model` and turns it into the answer.
    fn answer(
        &self,
        endpoint: &str,
        model: &str,
        result: Result<Response, GatewayError>,
    ) -> Response {
        match result {
            Ok(response) => {
                self.metrics.request(endpoint, model, "ok");
                response
            }
            Err(error) => {
                self.metrics.request(endpoint, model, error.code());
                error.into_response()
            }
        }
    }
}

/// The gateway's routes, for any router state that holds a [`SharedGateway`].
pub fn routes<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    SharedGateway: FromRef<S>,
{
    Router::new()
        .route(
            "/v1/chat/completions",
            post(chat::chat_completions).fallback(method_not_allowed),
        )
        .route(
            "/v1/models",
            get(models::list_models).fallback(method_not_allowed),
        )
        .route(
            "/v1/models/{*model}",
            get(models::retrieve_model).fallback(method_not_allowed),
        )
        .route("/v1", any(unknown_endpoint))
        .route("/v1/", any(unknown_endpoint))
        .route("/v1/{*rest}", any(unknown_endpoint))
        .route(
            "/api/v1/admissions",
            post(usage_api::admit).fallback(method_not_allowed),
        )
        .route(
            "/api/v1/admissions/{id}/settle",
            post(usage_api::settle).fallback(method_not_allowed),
        )
        .route(
            "/api/v1/admissions/{id}/release",
            post(usage_api::release).fallback(method_not_allowed),
        )
        .route(
            "/api/v1/admissions/{id}/renew",
            post(usage_api::renew).fallback(method_not_allowed),
        )
        .route(
            "/api/v1/usage",
            post(usage_api::record).fallback(method_not_allowed),
        )
        // Any other API path (the usage API's root, another version) answers
        // JSON too, never the panel's HTML 404 or its 308 to a path without
        // a trailing slash.
        .route("/api", any(unknown_endpoint))
        .route("/api/", any(unknown_endpoint))
        .route("/api/{*rest}", any(unknown_endpoint))
        .route("/metrics", get(render_metrics).fallback(method_not_allowed))
}

/// Answer an OpenAI-shaped 404 for an endpoint the gateway does not serve.
pub(crate) async fn unknown_endpoint(
    State(gateway): State<SharedGateway>,
    method: Method,
    uri: Uri,
) -> Response {
    gateway.answer(
        "unknown",
        "",
        Err(GatewayError::UnknownEndpoint {
            method: method.to_string(),
            path: uri.path().to_owned(),
        }),
    )
}

/// Answer an OpenAI-shaped 405 for a served path used with the wrong method.
pub(crate) async fn method_not_allowed(method: Method) -> Response {
    GatewayError::MethodNotAllowed(method.to_string()).into_response()
}

/// Serve the metrics in the Prometheus text format.
async fn render_metrics(State(gateway): State<SharedGateway>) -> Response {
    let mut response = gateway.metrics.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Reads a request body of at most `max_request_bytes` (DESIGN.md §4): a declared
/// `Content-Length` over the limit is refused before anything else, a body that
/// grows past it while read is refused too. The whole body must arrive within
/// `request_body_timeout_secs`. A compressed body is refused unread.
///
/// Errors: [`GatewayError::PayloadTooLarge`] (413),
/// [`GatewayError::UnsupportedContentEncoding`] (415) for a `Content-Encoding`
/// other than `identity`, [`GatewayError::UnreadableBody`] (400) when the client
/// breaks off, [`GatewayError::RequestTimeout`] (408).
async fn read_body(
    gateway: &Gateway,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, GatewayError> {
    let limit = gateway.max_request_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > u64::try_from(limit).unwrap_or(u64::MAX)) {
        return Err(GatewayError::PayloadTooLarge { limit });
    }
    for encoding in headers.get_all(header::CONTENT_ENCODING) {
        let encoding = String::from_utf8_lossy(encoding.as_bytes());
        let encoding = encoding.trim();
        if !encoding.is_empty() && !encoding.eq_ignore_ascii_case("identity") {
            return Err(GatewayError::UnsupportedContentEncoding(
                encoding.to_owned(),
            ));
        }
    }
    let read = tokio::time::timeout(
        gateway.request_body_timeout,
        axum::body::to_bytes(body, limit),
    );
    let Ok(read) = read.await else {
        return Err(GatewayError::RequestTimeout {
            seconds: gateway.request_body_timeout.as_secs(),
        });
    };
    read.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|source| source.is::<http_body_util::LengthLimitError>())
            || e.to_string().contains("length limit exceeded");
        if too_large {
            GatewayError::PayloadTooLarge { limit }
        } else {
            GatewayError::UnreadableBody
        }
    })
}

/// A route's one path parameter (a model name, a reservation id), refused in the
/// gateway's JSON error shape, 400 `invalid_value` with `param` `path`, when it is
/// not valid UTF-8 after percent-decoding, instead of axum's plain-text answer.
pub struct PathParam(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for PathParam {
    type Rejection = GatewayError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<String>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(PathParam(value)),
            Err(rejection) => Err(GatewayError::invalid_field("path", rejection.body_text())),
        }
    }
}
